"""Offline pseudo-labelling (docs/methods.md#7-offline-teacher-student-self-training, steps 2-3): entropy quantisation, the set's files and
manifest, refusing / resuming an output set without writing a frame twice, DDP sharding, and the
`semivss pseudo-label` command end to end on a tiny synthetic dataset."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import semivss.inference.pseudo_label as pl
from semivss.data.transforms import MEAN, STD
from semivss.data.video import Frame, FrameRef, Video, VideoSet
from semivss.errors import ConfigError, DataError
from semivss.inference import EvalConfig, OutputExistsError, Predictor
from semivss.inference.pseudo_label import (
    dequantise_entropy,
    entropy,
    entropy_path,
    label_path,
    make_manifest,
    pseudo_label,
    quantise_entropy,
    read_pseudo_label,
    shard_frames,
    write_frame,
)

CLASSES = ["a", "b", "c", "d"]
PALETTE = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200], [90, 90, 90]], dtype=np.uint8)


class Soft(nn.Module):
    """Logits a smooth function of the red channel and the column: uncertain somewhere, sure
    elsewhere, different per frame."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("centres", torch.tensor([20.0, 80.0, 140.0, 200.0]).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        red = x[:, :1] * STD[0] + MEAN[0]
        col = torch.linspace(0, 1, x.shape[-1]).view(1, 1, 1, -1)
        return {"logits": -((red - self.centres) ** 2) / 800.0 + col * torch.arange(4.0).view(1, -1, 1, 1)}


def make_videoset(root: Path) -> VideoSet:
    """Two videos of different frame sizes (5 and 4 frames), every frame annotated."""
    rng = np.random.default_rng(0)
    vids = []
    for name, (h, w), n in (("v0", (10, 14), 5), ("v1", (8, 12), 4)):
        frames = []
        for i in range(n):
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            img_p, lab_p = root / name / f"{i:03d}.png", root / name / f"{i:03d}_label.png"
            img_p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(img_p)
            Image.fromarray(rng.integers(0, 4, (h, w), dtype=np.uint8)).save(lab_p)
            frames.append(Frame(name, 2 * i, image=img_p, label=lab_p))
        vids.append(Video(name, frames))
    return VideoSet("toy", vids, CLASSES, palette=PALETTE)


def manifest_for(frames: list[FrameRef], **kw) -> dict:
    args = dict(dataset={"format": "folder", "root": "/data/toy", "split": "train"}, classes=CLASSES,
                models=[{"path": "/ckpt/teacher.pt", "weight": 1.0}], scales=(1.0,), flip=False,
                eval_cfg=EvalConfig(size=None).model_dump(mode="json"), frames=frames)
    args.update(kw)
    return make_manifest(**args)


@pytest.fixture
def toy(tmp_path: Path):
    vs = make_videoset(tmp_path / "data")
    frames = vs.frames()
    return vs, frames, Predictor.single(Soft(), EvalConfig(size=None, batch_size=2))


def run(pred, vs, frames, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("manifest", manifest_for(frames))
    return pseudo_label(pred, vs, frames, out, len(CLASSES), **kw)


# ----------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("c", [2, 5, 19, 124])
def test_entropy_round_trip_within_quantisation(tmp_path: Path, c: int) -> None:
    rng = np.random.default_rng(c)
    p = rng.dirichlet(np.full(c, 0.3), size=(9, 11)).transpose(2, 0, 1)  # (C, H, W) float64
    p[:, 0, 0] = 0.0
    p[0, 0, 0] = 1.0  # a sure pixel: H = 0
    p[:, 0, 1] = 1.0 / c  # a uniform pixel: H = ln C
    h_true = -(p * np.log(np.where(p > 0, p, 1.0))).sum(0)
    probs = torch.from_numpy(p).float()
    torch.testing.assert_close(entropy(probs), torch.from_numpy(h_true).float(), rtol=0, atol=1e-5)
    q = quantise_entropy(entropy(probs), c)
    assert q.dtype == torch.uint8 and q[0, 0] == 0 and q[0, 1] == 255
    ref = FrameRef("vid", 7)
    write_frame(tmp_path, ref, probs.argmax(0).to(torch.uint8).numpy(), q.numpy())
    label, h_dec = read_pseudo_label(tmp_path, ref, c)
    assert np.abs(h_dec - h_true).max() <= math.log(c) / 510 + 1e-6
    np.testing.assert_array_equal(label, p.argmax(0))
    np.testing.assert_array_equal(h_dec, dequantise_entropy(q, c))


def test_entropy_single_class_and_batches() -> None:
    assert quantise_entropy(torch.zeros(3, 4), 1).eq(0).all()
    p = torch.softmax(torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0)), 1)
    assert entropy(p).shape == (2, 4, 5)
    torch.testing.assert_close(entropy(p)[1], entropy(p[1]))


# ----------------------------------------------------------------------------- sharding


def test_shard_frames_partitions_the_list() -> None:
    frames = [FrameRef(f"v{i // 4}", i % 4) for i in range(11)]
    for world in range(1, 6):
        shards = [shard_frames(frames, r, world) for r in range(world)]
        flat = [f for s in shards for f in s]
        assert sorted(flat) == sorted(frames) and len(flat) == len(frames)  # each frame once
        assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
        for s in shards:  # each shard keeps the list order
            assert s == sorted(s, key=frames.index)
    assert shard_frames(frames, 1, 3) == frames[1::3]
    with pytest.raises(ValueError, match="rank 3"):
        shard_frames(frames, 3, 3)


def test_ranks_label_disjoint_shards(toy, tmp_path: Path, monkeypatch) -> None:
    """Two ranks run one after the other (no process group): together they write every frame
    once, each its shard."""
    vs, frames, pred = toy
    calls: list[FrameRef] = []
    real = pl.write_frame
    monkeypatch.setattr(pl, "write_frame", lambda out, ref, *a: (calls.append(ref), real(out, ref, *a)))
    out = tmp_path / "set"
    c0 = run(pred, vs, frames, out, rank=0, world_size=2)
    assert c0["written"] == 5 and c0["done"] == 5 and not c0["complete"]
    c1 = run(pred, vs, frames, out, rank=1, world_size=2, num_workers=1)  # frames read in a worker
    assert c1["written"] == 4 and c1["done"] == 9 and c1["complete"]  # done counts both runs
    assert sorted(calls) == sorted(frames)
    assert calls[:5] == frames[0::2] and calls[5:] == frames[1::2]


# ----------------------------------------------------------------------------- the set


def test_pseudo_label_writes_labels_entropy_and_manifest(toy, tmp_path: Path) -> None:
    vs, frames, pred = toy
    out = tmp_path / "set"
    counts = run(pred, vs, frames, out)
    assert counts["frames"] == 9 and counts["written"] == 9 and counts["skipped"] == 0
    assert counts["complete"] is True
    for ref in frames:
        image = vs.read_image(ref)
        h, w = image.shape[:2]
        x = ((torch.from_numpy(image).permute(2, 0, 1).float() - torch.tensor(MEAN).view(3, 1, 1))
             / torch.tensor(STD).view(3, 1, 1))[None]
        probs = pred(x, (h, w))[0]
        with Image.open(label_path(out, ref)) as im:
            assert im.mode == "L" and im.size == (w, h)
            label = np.array(im)
        with Image.open(entropy_path(out, ref)) as im:
            assert im.mode == "L"
            q = np.array(im)
        np.testing.assert_array_equal(label, probs.argmax(0).numpy())
        np.testing.assert_array_equal(q, quantise_entropy(entropy(probs), 4).numpy())
        assert label_path(out, ref) == out / "labels" / ref.video / f"{ref.index:08d}.png"
    assert len(np.unique(np.concatenate([np.array(Image.open(p)).ravel()
                                         for p in (out / "entropy").rglob("*.png")]))) > 10
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "semivss-pseudo-labels" and m["version"] == 1
    assert m["dataset"] == {"format": "folder", "root": "/data/toy", "split": "train"}
    assert m["num_classes"] == 4 and m["classes"] == CLASSES
    assert m["models"] == [{"path": "/ckpt/teacher.pt", "weight": 1.0}]
    assert m["scales"] == [1.0] and m["flip"] is False and m["eval"]["size"] is None
    assert m["uncertainty"] == "entropy"
    assert m["quantisation"] == {"dtype": "uint8", "max": math.log(4)}
    assert m["frames"] == [{"video": r.video, "index": r.index} for r in frames]
    assert m["counts"]["written"] == 9 and m["counts"]["complete"] is True
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporary file


def test_prob_fn_and_frame_checks(toy, tmp_path: Path) -> None:
    vs, frames, _ = toy
    uniform_b = lambda x, size: torch.tensor([0.1, 0.6, 0.2, 0.1]).view(1, 4, 1, 1).expand(  # noqa: E731
        x.shape[0], 4, *size)
    counts = run(uniform_b, vs, frames[:3], tmp_path / "s", manifest=manifest_for(frames[:3]))
    label, h = read_pseudo_label(tmp_path / "s", frames[1], 4)
    assert counts["written"] == 3 and (label == 1).all()
    h_true = -sum(p * math.log(p) for p in (0.1, 0.6, 0.2, 0.1))
    assert np.abs(h - h_true).max() <= math.log(4) / 510 + 1e-6
    with pytest.raises(DataError, match="listed twice"):
        run(uniform_b, vs, [frames[0], frames[0]], tmp_path / "t")
    with pytest.raises(DataError, match="nope"):
        run(uniform_b, vs, [FrameRef("nope", 0)], tmp_path / "t")
    with pytest.raises(ConfigError, match="frames"):
        run(uniform_b, vs, frames[:2], tmp_path / "t", manifest=manifest_for(frames[:3]))


def test_refuses_non_empty_output(toy, tmp_path: Path) -> None:
    vs, frames, pred = toy
    out = tmp_path / "set"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        run(pred, vs, frames, out)
    with pytest.raises(DataError, match="manifest.json"):  # resume needs a pseudo-label set
        run(pred, vs, frames, out, resume=True)
    with pytest.raises(ConfigError, match="resume"):
        run(pred, vs, frames, out, resume=True, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and not (out / "labels").exists()
    assert run(pred, vs, frames, out, overwrite=True)["written"] == 9
    assert (out / "notes.txt").read_text() == "mine"  # overwrite replaces only the set's files
    # resume with other settings: a clear error naming the manifest and what changed
    other = manifest_for(frames, scales=(0.5, 1.0), flip=True)
    with pytest.raises(ConfigError, match=r"manifest.json: cannot resume.*scales.*flip"):
        run(pred, vs, frames, out, resume=True, manifest=other)
    weights = manifest_for(frames, models=[{"path": "/ckpt/teacher.pt", "weight": 0.5},
                                           {"path": "/ckpt/b.pt", "weight": 0.5}])
    with pytest.raises(ConfigError, match="models"):
        run(pred, vs, frames, out, resume=True, manifest=weights)
    with pytest.raises(ConfigError, match=r"frames \(9 listed, now 8\)"):
        run(pred, vs, frames[:8], out, resume=True, manifest=manifest_for(frames[:8]))
    assert run(pred, vs, frames, out, resume=True)["skipped"] == 9


@pytest.mark.parametrize("threads", [0, 2])
def test_resume_writes_no_frame_twice(toy, tmp_path: Path, monkeypatch, threads: int) -> None:
    vs, frames, pred = toy
    out = tmp_path / "set"
    written: list[FrameRef] = []
    budget = {"left": 4}
    lock = threading.Lock()
    real = pl.write_frame

    def counting_writer(out_dir, ref, label, ent):
        with lock:
            if budget["left"] == 0:
                raise KeyboardInterrupt  # the run is killed before this frame is written
            budget["left"] -= 1
        real(out_dir, ref, label, ent)
        written.append(ref)

    monkeypatch.setattr(pl, "write_frame", counting_writer)
    with pytest.raises(KeyboardInterrupt):
        run(pred, vs, frames, out, write_threads=threads)
    done = list(written)
    assert len(done) == 4 and set(done) <= set(frames)
    if threads == 0:
        assert done == frames[:4]
    # a frame interrupted between its entropy and label files counts as not done
    write_half = next(r for r in frames if r not in done and r.video == "v0")
    pl._write_png_atomic(entropy_path(out, write_half), np.zeros((10, 14), np.uint8))
    stamps = {r: (label_path(out, r).stat().st_mtime_ns, entropy_path(out, r).stat().st_mtime_ns)
              for r in done}
    budget["left"] = 10**6
    counts = run(pred, vs, frames, out, resume=True, write_threads=threads, limit=2)
    assert counts == {**counts, "written": 2, "skipped": 4, "complete": False}
    counts = run(pred, vs, frames, out, resume=True, write_threads=threads)
    assert counts["written"] == 3 and counts["skipped"] == 6 and counts["complete"]
    assert sorted(written) == sorted(frames) and len(written) == len(frames)  # each frame once
    for r in done:  # finished frames untouched
        assert (label_path(out, r).stat().st_mtime_ns, entropy_path(out, r).stat().st_mtime_ns) == stamps[r]
    assert run(pred, vs, frames, out, resume=True)["written"] == 0
    assert len(written) == len(frames)
    # the half-written frame got its real entropy map
    _, h = read_pseudo_label(out, write_half, 4)
    assert h.max() > 0


# ----------------------------------------------------------------------------- command line


# ----------------------------------------------------------------------------- quality
def _np_miou(pred: np.ndarray, gt: np.ndarray, c: int) -> float:
    """Independent oracle: mean IoU over the classes present in the ground truth (255 ignored)."""
    keep = gt != 255
    p, g = pred[keep], gt[keep]
    ious = [((p == k) & (g == k)).sum() / ((p == k) | (g == k)).sum() for k in range(c) if (g == k).any()]
    return float(np.mean(ious))


def test_pseudo_label_quality_matches_a_numpy_oracle(toy, tmp_path: Path) -> None:
    """All-pixel and reliable-pixel mIoU against the hidden labels, and the reliable share; frames
    without ground truth are skipped."""
    vs, frames, pred = toy
    out = tmp_path / "set"
    run(pred, vs, frames, out)
    unlabeled = Frame("v1", 6, image=vs.frame(FrameRef("v1", 6)).image, label=None)
    vs.video("v1").frames[3] = unlabeled  # this frame has no ground truth any more
    labels, gts, ents = [], [], []
    for ref in frames:
        if ref == FrameRef("v1", 6):
            continue
        lab, ent = read_pseudo_label(out, ref, 4)
        labels.append(lab.ravel())
        gts.append(vs.read_label(ref).ravel())
        ents.append(ent.ravel())
    lab, gt, ent = np.concatenate(labels), np.concatenate(gts), np.concatenate(ents)
    gamma = float(np.median(ent))
    keep = ent < gamma
    q = pl.pseudo_label_quality(out, vs, gamma=gamma, progress=False)
    assert 0 < keep.mean() < 1  # both reliable and unreliable pixels
    assert q["frames"] == len(frames) - 1 and q["gamma"] == gamma
    assert q["all"]["mIoU"] == pytest.approx(_np_miou(lab, gt, 4))
    assert q["all"]["pixel_acc"] == pytest.approx((lab == gt).mean())
    assert q["reliable"]["mIoU"] == pytest.approx(_np_miou(lab, np.where(keep, gt, 255), 4))
    assert q["reliable_share"] == pytest.approx(keep.mean())
    assert pl.pseudo_label_quality(out, vs, progress=False)["gamma"] == pytest.approx(0.5 * math.log(4))

    # the student's class-wise percentile rule, per frame: in each frame and pseudo-labeled class the
    # 60 % lowest-entropy pixels (exact count, ties broken by rank) are reliable
    from semivss.methods.self_training import ReliableConfig

    rule = ReliableConfig(mode="percentile", keep=0.6, classwise=True)
    qc = pl.pseudo_label_quality(out, vs, reliable_cfg=rule, progress=False)
    assert qc["gamma"] is None and qc["reliable_rule"]["classwise"] is True
    keeps = []
    for ref in frames:
        if ref == FrameRef("v1", 6):
            continue
        lab_f, ent_f = read_pseudo_label(out, ref, 4)
        keep_f = np.zeros(lab_f.shape, dtype=bool)
        for k in np.unique(lab_f):
            e = ent_f[lab_f == k]
            n_drop = int(np.floor(0.4 * e.size + 0.5))
            order = np.argsort(e, kind="stable")
            kept = np.zeros(e.size, dtype=bool)
            kept[order[: e.size - n_drop]] = True
            if n_drop and e.size - n_drop:  # the kept pixels are never less certain than the dropped
                assert e[kept].max() <= e[~kept].min()
            keep_f[lab_f == k] = kept
        keeps.append(keep_f.ravel())
    keep_c = np.concatenate(keeps)
    # the counts per class are exact (every toy pixel is annotated): 59.7 % here, 60.1 % with one
    # percentile over the whole frame; which of the pixels tied at a class's cut are kept may differ
    assert not (gt == 255).any()
    assert qc["reliable_share"] == pytest.approx(keep_c.mean(), abs=1e-9)
    assert qc["reliable"]["mIoU"] == pytest.approx(_np_miou(lab, np.where(keep_c, gt, 255), 4), abs=0.005)
    with pytest.raises(ConfigError, match="not both"):
        pl.pseudo_label_quality(out, vs, gamma=0.3, reliable_cfg=rule, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny synthetic set, a checkpoint trained by `semivss train` (2 iterations) and a second,
    randomly initialised one exported the way the trainer exports model.safetensors."""
    from safetensors.torch import save_file

    from semivss.cli import app
    from semivss.config import load_config
    from semivss.data import formats
    from semivss.experiment import make_meta
    from semivss.models import build_model

    root = tmp_path_factory.mktemp("plabel")
    data = root / "synth"
    runner = CliRunner()

    def invoke(args):
        res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert res.exit_code == 0, res.output

    invoke(["data", "synth", data, "--videos", "3", "--frames", "6", "--height", "32", "--width", "48", "--seed", "1"])
    cfg = {
        "name": "tiny", "out_dir": str(root / "run"),
        "data": {"format": "synthetic", "root": str(data), "split": {"mode": "every_kth", "k": 3},
                 "base_size": [32, 48], "crop_size": [32, 32], "batch_size": 2, "num_workers": 0},
        "model": {"backbone": "mobilenet_v2", "pretrained": None},
        "optim": {"lr": 0.01}, "schedule": {"iters": 2},
        "train": {"log_interval": 1, "eval_interval": 0, "ckpt_interval": 2, "precision": "fp32"},
        "eval": {"size": [32, 48]},
    }
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    invoke(["train", cfg_path])
    conf = load_config(cfg_path)
    vs = formats.load_dataset("synthetic", data, "train")
    paths = {}
    for name, classes in (("random", list(vs.classes)), ("renamed", ["x"] + list(vs.classes)[1:])):
        torch.manual_seed(5)
        meta = {**make_meta(conf, vs), "classes": classes}
        state = {k: v.contiguous() for k, v in build_model(conf.model, vs.num_classes).state_dict().items()}
        paths[name] = root / f"{name}.safetensors"
        save_file(state, str(paths[name]), metadata={"format": "pt", "semivss_meta": json.dumps(meta)})
    return {"root": root, "data": data, "trained": root / "run" / "model.safetensors", **paths}


def test_cli_pseudo_label_end_to_end(tiny) -> None:
    from semivss.cli import app
    from semivss.data import formats, splits

    runner = CliRunner()
    out = tiny["root"] / "set"
    args = ["pseudo-label", tiny["trained"], "--ensemble", tiny["random"], "--weights", "3,1",
            "--scales", "0.75,1,1.25", "--flip", "--data", tiny["data"], "--format", "synthetic",
            "--split", "train", "--out", out]
    res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    vs = formats.load_dataset("synthetic", tiny["data"], "train")
    unlabeled = splits.every_kth(vs, 3).unlabeled  # the rule the checkpoint was trained with
    m = json.loads((out / "manifest.json").read_text())
    assert m["frames"] == [{"video": r.video, "index": r.index} for r in unlabeled]
    assert [x["weight"] for x in m["models"]] == pytest.approx([0.75, 0.25])
    assert m["models"][0]["path"] == str(tiny["trained"].resolve())
    assert m["scales"] == [0.75, 1.0, 1.25] and m["flip"] is True
    assert m["dataset"]["format"] == "synthetic" and m["dataset"]["split"] == "train"
    assert m["counts"]["written"] == len(unlabeled) and m["counts"]["complete"] is True
    labeled = set(splits.every_kth(vs, 3).labeled)
    for ref in vs.frames():
        assert label_path(out, ref).is_file() == (ref not in labeled)
    lab, h = read_pseudo_label(out, unlabeled[0], vs.num_classes)
    assert lab.shape == (32, 48) and lab.max() < vs.num_classes
    assert 0 <= h.min() and h.max() <= math.log(vs.num_classes) + 1e-6

    # scored against the hidden labels; the JSON says which set, data and classes it scored
    qpath = tiny["root"] / "quality.json"
    q_args = ["pseudo-label-quality", out, "--data", tiny["data"], "--format", "synthetic", "--out", qpath]
    res = runner.invoke(app, [str(a) for a in q_args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    q = json.loads(qpath.read_text())
    assert (q["set"], q["format"], q["split"]) == (str(out), "synthetic", "train")
    assert q["class_names"] == list(vs.classes) and len(q["all"]["iou"]) == vs.num_classes
    assert q["frames"] == len(unlabeled) and 0 <= q["reliable"]["mIoU"] <= 1 and "commit" in q
    assert runner.invoke(app, [str(a) for a in q_args]).exit_code != 0  # never overwritten

    # refused without --resume/--overwrite; --resume with the same options does nothing more
    again = runner.invoke(app, [str(a) for a in args])
    assert again.exit_code != 0 and "not empty" in str(again.exception)
    res = runner.invoke(app, [str(a) for a in args + ["--resume"]], catch_exceptions=False)
    assert res.exit_code == 0 and "'written': 0" in res.output
    # --resume with other weights: the manifest does not match
    other = [a if a != "3,1" else "1,1" for a in args] + ["--resume"]
    res = runner.invoke(app, [str(a) for a in other])
    assert res.exit_code != 0 and "weight" in str(res.exception) and "manifest.json" in str(res.exception)

    # --all-frames / --label-every choose the frames; at most one rule
    out2 = tiny["root"] / "set_all"
    res = runner.invoke(app, [str(a) for a in ["pseudo-label", tiny["trained"], "--data", tiny["data"], "--format",
                                               "synthetic", "--all-frames", "--out", out2]], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert len(json.loads((out2 / "manifest.json").read_text())["frames"]) == len(vs.frames())
    res = runner.invoke(app, [str(a) for a in ["pseudo-label", tiny["trained"], "--data", tiny["data"], "--format",
                                               "synthetic", "--all-frames", "--label-every", "2", "--out", out2]])
    assert res.exit_code != 0 and "at most one" in str(res.exception)


def test_cli_ensemble_class_mismatch_and_evaluate_predict(tiny) -> None:
    from semivss.cli import app

    runner = CliRunner()
    res = runner.invoke(app, [str(a) for a in ["pseudo-label", tiny["trained"], "--ensemble", tiny["renamed"],
                                               "--data", tiny["data"], "--format", "synthetic",
                                               "--out", tiny["root"] / "bad"]])
    assert res.exit_code != 0 and "renamed.safetensors" in str(res.exception) and "classes" in str(res.exception)
    assert not (tiny["root"] / "bad").exists()
    res = runner.invoke(app, [str(a) for a in ["evaluate", tiny["trained"], "--ensemble", tiny["random"],
                                               "--weights", "1", "--data", tiny["data"], "--format", "synthetic",
                                               "--out", tiny["root"] / "ev_bad"]])
    assert res.exit_code != 0 and "weights" in str(res.exception)

    # evaluate: ensemble with weights (1, 0) == the trained model alone; TTA options accepted
    def metrics(out: Path, extra: list) -> dict:
        cmd = ["evaluate", tiny["trained"], "--data", tiny["data"], "--format", "synthetic", "--out", out, *extra]
        r = runner.invoke(app, [str(a) for a in cmd], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return json.loads((out / "metrics.json").read_text())["metrics"]

    alone = metrics(tiny["root"] / "ev1", [])
    pair = metrics(tiny["root"] / "ev2", ["--ensemble", tiny["random"], "--weights", "1,0"])
    assert pair == alone
    tta = metrics(tiny["root"] / "ev3", ["--ensemble", tiny["random"], "--scales", "0.5,1", "--flip"])
    assert 0.0 <= tta["mIoU"] <= 1.0 and tta["n_frames"] == alone["n_frames"]

    # predict with an ensemble + TTA
    video = (tiny["data"] / "val.txt").read_text().split()[0]
    out = tiny["root"] / "pred"
    cmd = ["predict", tiny["trained"], tiny["data"] / "videos" / video, out, "--ensemble", tiny["random"],
           "--scales", "1,1.5", "--flip"]
    r = runner.invoke(app, [str(a) for a in cmd], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert len(list((out / "labels").glob("*.png"))) == 6


def test_cli_evaluate_reads_labels_through_a_label_map(tiny) -> None:
    """--label-map: an identity table gives the same scores; a table onto fewer classes than the
    model predicts is refused with both class counts."""
    from semivss.cli import app
    from semivss.data import formats

    runner = CliRunner()
    classes = list(formats.load_dataset("synthetic", tiny["data"], "val").classes)
    ident = tiny["root"] / "identity.yaml"
    ident.write_text(yaml.safe_dump({"target_classes": classes,
                                     "map": {i: i for i in range(len(classes))}}))
    fewer = tiny["root"] / "fewer.yaml"
    fewer.write_text(yaml.safe_dump({"target_classes": ["a", "b"], "map": {0: 0, 1: 1}}))

    def run_eval(out: Path, extra: list):
        cmd = ["evaluate", tiny["trained"], "--data", tiny["data"], "--format", "synthetic",
               "--out", out, *extra]
        return runner.invoke(app, [str(a) for a in cmd])

    assert run_eval(tiny["root"] / "lm0", []).exit_code == 0
    assert run_eval(tiny["root"] / "lm1", ["--label-map", ident]).exit_code == 0
    m0 = json.loads((tiny["root"] / "lm0" / "metrics.json").read_text())["metrics"]
    m1 = json.loads((tiny["root"] / "lm1" / "metrics.json").read_text())["metrics"]
    assert m1 == m0
    res = run_eval(tiny["root"] / "lm2", ["--label-map", fewer])
    assert res.exit_code != 0
    assert f"predicts {len(classes)} classes" in str(res.exception) and "has 2" in str(res.exception)


def test_cli_resume_refuses_a_replaced_model_file(tiny, tmp_path) -> None:
    """Models are identified by content, not path: a checkpoint file replaced between runs would
    otherwise make one set from two models, marked complete."""
    import shutil

    from semivss.cli import app

    runner = CliRunner()
    model = tmp_path / "model.safetensors"
    shutil.copyfile(tiny["random"], model)
    args = [str(a) for a in ["pseudo-label", model, "--data", tiny["data"], "--format", "synthetic",
                             "--split", "train", "--out", tmp_path / "set"]]
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert len(manifest["models"][0]["sha256"]) == 64
    shutil.copyfile(tiny["trained"], model)  # same path, other weights
    res = runner.invoke(app, args + ["--resume"])
    assert res.exit_code != 0 and "sha256" in str(res.exception) and "manifest.json" in str(res.exception)
    assert json.loads((tmp_path / "set" / "manifest.json").read_text()) == manifest
