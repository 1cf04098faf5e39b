"""Offline self-training (docs/methods.md#7-offline-teacher-student-self-training steps 3-4, PVUW 2024 Eq. 4-6): the pseudo-label set reader and
dataset (alignment under augmentation, padding, manifest errors), the reliable / unreliable split,
the losses against hand computations, negatives, wiring into build_train_sets, and a run through
the real engine with exact resume of the memory bank."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_toy import TinySeg
from PIL import Image
from torch import Tensor, nn

from semivss.config import parse_config
from semivss.data.batch import LabeledBatch, PseudoBatch
from semivss.data.formats import load_dataset
from semivss.data.pseudo import PseudoLabeledFrames, read_pseudo_set
from semivss.data.requests import PseudoRequest
from semivss.data.splits import single_frame
from semivss.data.synthetic import generate_synthetic
from semivss.data.transforms import ClipAugment, denormalize
from semivss.data.video import Frame, FrameRef, Video, VideoSet
from semivss.engine import OptimConfig, ScheduleConfig, TrainConfig, Trainer, load_checkpoint
from semivss.errors import ConfigError, DataError
from semivss.experiment import build_train_sets
from semivss.methods import METHODS, build_method
from semivss.methods.parts import ClassMemoryBank, class_ranks, step_generator, u2pl_contrastive_loss
from semivss.methods.self_training import ReliableConfig, SelfTraining, default_gamma, split_reliable


# ------------------------------------------------------------------ helpers
def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path)


def write_pseudo_set(
    root: Path,
    videoset: VideoSet,
    refs: list[FrameRef],
    label_fn: Callable[[FrameRef, int, int], np.ndarray],
    q_fn: Callable[[FrameRef, int, int], np.ndarray],
    **overrides: Any,
) -> Path:
    """A pseudo-label set in the contract format (manifest + labels/ + entropy/ PNGs)."""
    c = videoset.num_classes
    for ref in refs:
        h, w = videoset.image_size(ref)
        save_png(root / "entropy" / ref.video / f"{ref.index:08d}.png", q_fn(ref, h, w).astype(np.uint8))
        save_png(root / "labels" / ref.video / f"{ref.index:08d}.png", label_fn(ref, h, w).astype(np.uint8))
    manifest = {
        "format": "semivss-pseudo-labels",
        "version": 1,
        "dataset": {"format": "test", "root": "nowhere", "split": "train"},
        "num_classes": c,
        "classes": list(videoset.classes),
        "models": [{"path": "teacher.pt", "weight": 1.0}],
        "scales": [1.0],
        "flip": False,
        "eval": {},
        "uncertainty": "entropy",
        "quantisation": {"dtype": "uint8", "max": math.log(c)},
        "frames": [{"video": r.video, "index": r.index} for r in refs],
        "counts": {"frames": len(refs)},
    }
    manifest.update(overrides)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def coordinate_videoset(tmp: Path, h: int = 40, w: int = 60, num_classes: int = 250) -> VideoSet:
    """One video of two frames whose pixel values encode their coordinates: R = 4x, G = 4y."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([4 * xx, 4 * yy, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    frames = []
    for i in range(2):
        save_png(tmp / "frames" / f"{i:03d}.png", image)
        frames.append(Frame("v", i, image=tmp / "frames" / f"{i:03d}.png"))
    return VideoSet("coords", [Video("v", frames)], [f"c{i}" for i in range(num_classes)])


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> VideoSet:
    root = generate_synthetic(tmp_path_factory.mktemp("synth") / "data", videos=3, frames=8, height=32,
                              width=48, seed=0, val_videos=1)
    return load_dataset("synthetic", root, "train")


def gt_label(videoset: VideoSet) -> Callable[[FrameRef, int, int], np.ndarray]:
    return lambda ref, h, w: videoset.read_label(ref)


def random_q(seed: int = 0) -> Callable[[FrameRef, int, int], np.ndarray]:
    def q(ref: FrameRef, h: int, w: int) -> np.ndarray:
        rng = np.random.default_rng([seed, ref.index, len(ref.video)])
        return rng.integers(0, 256, (h, w), dtype=np.uint8)

    return q


# ------------------------------------------------------------------ reliable / unreliable split
def test_threshold_split_keeps_exactly_low_entropy_valid_pixels() -> None:
    ent = torch.tensor([[[0.1, 0.49, 0.5, 0.9], [0.0, 2.0, float("inf"), 0.3]]])
    valid = torch.tensor([[[True, True, True, True], [False, True, False, True]]])
    rel, unrel = split_reliable(ent, valid, ReliableConfig(mode="threshold", gamma=0.5), 8)
    assert rel.tolist() == [[[True, True, False, False], [False, False, False, True]]]
    assert unrel.tolist() == [[[False, False, True, True], [False, True, False, False]]]
    # the invalid pixel of entropy 0 (padding that slipped through) is neither
    assert not rel[0, 1, 0] and not unrel[0, 1, 0]
    # default gamma = 0.5 ln C
    assert default_gamma(8) == pytest.approx(0.5 * math.log(8))
    rel_d, _ = split_reliable(ent, valid, ReliableConfig(), 8)
    assert torch.equal(rel_d, valid & (ent < 0.5 * math.log(8)))


def test_percentile_split_is_exact_over_the_batch_and_excludes_padding() -> None:
    g = torch.Generator().manual_seed(0)
    ent = torch.randperm(2 * 6 * 7, generator=g).float().view(2, 6, 7) / 10.0  # distinct values
    valid = torch.rand(2, 6, 7, generator=g) > 0.3
    valid[0, 0, :3] = False
    ent[0, 0, :3] = -1.0  # lowest entropy of all, but padding: must not be picked
    ent[~valid & (ent >= 0)] = float("inf")
    rel, unrel = split_reliable(ent, valid, ReliableConfig(mode="percentile", keep=0.75), 8)
    n_valid = int(valid.sum())
    k = math.floor(0.25 * n_valid + 0.5)  # unreliable: the 25 % highest of the valid pixels
    order = np.sort(ent[valid].numpy())
    assert int(unrel.sum()) == k and int(rel.sum()) == n_valid - k
    assert torch.equal(rel | unrel, valid) and not (rel & unrel).any()
    assert float(ent[rel].max()) < float(ent[unrel].min())
    assert float(ent[rel].max()) == order[n_valid - k - 1]
    # keep = 1: everything valid is reliable
    rel1, unrel1 = split_reliable(ent, valid, ReliableConfig(mode="percentile", keep=1.0), 8)
    assert torch.equal(rel1, valid) and not unrel1.any()


# ------------------------------------------------------------------ losses by hand
class Linear1x1(nn.Module):
    """logits = 1x1 conv of the image (stride 1); feature = the image; optional rep = the extra
    channels 3: of the input (lets a test choose the representation of every pixel)."""

    def __init__(self, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = {"logits": self.conv(x[:, :3]), "feature": x[:, :3] * self.scale}
        if x.shape[1] > 3:
            out["rep"] = x[:, 3:] * self.scale
        return out


def _ce_numpy(logits: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Mean over ``mask`` of -log softmax(logits)[target]; logits (B,C,H,W)."""
    total, n = 0.0, 0
    for b, y, x in zip(*np.nonzero(mask)):
        z = logits[b, :, y, x].astype(np.float64)
        total += math.log(np.exp(z - z.max()).sum()) + z.max() - z[target[b, y, x]]
        n += 1
    return total / max(n, 1)


def tiny_batch(c: int, seed: int = 0, h: int = 4, w: int = 5, extra: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    y_l = torch.randint(c, (2, h, w), generator=g)
    y_l[0, 0, 0] = 255
    y_p = torch.randint(c, (2, h, w), generator=g)
    valid = torch.ones(2, h, w, dtype=torch.bool)
    valid[1, :, -1] = False  # a padded column
    y_p[~valid] = 255
    ent = torch.rand(2, h, w, generator=g) * math.log(c)
    ent[~valid] = float("inf")
    x_l, x_p = torch.randn(2, 3 + extra, h, w, generator=g), torch.randn(2, 3 + extra, h, w, generator=g)
    return {
        "labeled": LabeledBatch(x_l, y_l, torch.ones(2, h, w, dtype=torch.bool)),
        "pseudo": PseudoBatch(x_p, y_p, ent, valid),
    }


def test_unsupervised_and_supervised_losses_equal_hand_computation() -> None:
    c = 3
    method = SelfTraining({"contrastive_weight": 0.0, "unsup_weight": 1.0,
                           "reliable": {"mode": "threshold", "gamma": 0.6}}, c)
    model = Linear1x1(c)
    batch = tiny_batch(c)
    out = method.training_step(nn.ModuleDict({"model": model}), batch, 0, 10)
    with torch.no_grad():
        logits_l = model(batch["labeled"].image)["logits"].numpy()
        logits_p = model(batch["pseudo"].image)["logits"].numpy()
    p = batch["pseudo"]
    reliable = (p.valid & (p.entropy < 0.6)).numpy()
    assert 0 < reliable.sum() < p.valid.sum()
    y_l = batch["labeled"].label.numpy()
    l_s = _ce_numpy(logits_l, y_l, y_l != 255)
    l_u = _ce_numpy(logits_p, p.label.numpy(), reliable)
    assert float(out["loss_sup"]) == pytest.approx(l_s, rel=1e-5)
    assert float(out["loss_unsup"]) == pytest.approx(l_u, rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(l_s + l_u, rel=1e-5)
    assert float(out["reliable_ratio"]) == pytest.approx(reliable.sum() / p.valid.sum().item())


def test_full_loss_is_the_weighted_sum_of_hand_composed_terms() -> None:
    c = 5
    method = SelfTraining({"unsup_weight": 0.7, "contrastive_weight": 0.3, "num_anchors": 16,
                           "num_negatives": 4, "reliable": {"mode": "percentile", "keep": 0.6}}, c)
    model = Linear1x1(c, seed=1)
    batch = tiny_batch(c, seed=3, h=6, w=6, extra=4)
    torch.manual_seed(11)
    out = method.training_step(nn.ModuleDict({"model": model}), batch, 0, 10)

    p = batch["pseudo"]
    with torch.no_grad():
        x_all = torch.cat([batch["labeled"].image, p.image])
        o = model(x_all)
    y_l = batch["labeled"].label
    valid = p.valid
    n_valid = int(valid.sum())
    k_unrel = math.floor(0.4 * n_valid + 0.5)
    thr = torch.sort(p.entropy[valid]).values[n_valid - k_unrel - 1]
    reliable = valid & (p.entropy <= thr)
    unreliable = valid & ~reliable
    l_s = F.cross_entropy(o["logits"][:2], y_l, ignore_index=255)
    l_u = F.cross_entropy(o["logits"][2:], p.label.masked_fill(~reliable, 255), ignore_index=255)
    torch.manual_seed(11)
    bank = ClassMemoryBank(c, None, method.cfg.memory_size)
    ones = torch.ones(2, 6, 6, dtype=torch.bool)
    l_c = u2pl_contrastive_loss(
        o["rep"], o["rep"], torch.softmax(o["logits"], 1), torch.cat([y_l, p.label]),
        torch.cat([ones, reliable]), torch.cat([ones, unreliable]), torch.tensor([True, True, False, False]),
        bank, num_anchors=16, num_negatives=4, temperature=0.5, anchor_threshold=0.3, low_rank=3,
        high_rank=20, generator=step_generator(),
    )
    assert float(l_c) > 0
    assert float(out["loss_sup"]) == pytest.approx(float(l_s), rel=1e-5)
    assert float(out["loss_unsup"]) == pytest.approx(float(l_u), rel=1e-5)
    assert float(out["loss_contra"]) == pytest.approx(float(l_c), rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(float(l_s + 0.7 * l_u + 0.3 * l_c), rel=1e-5)
    for k in range(c):
        torch.testing.assert_close(method.bank.features(k), bank.features(k))


@pytest.mark.parametrize("mode", ["rank", "argmax"])
def test_negatives_of_a_class_never_hold_pixels_of_that_pseudo_label(mode: str) -> None:
    c = 6
    method = SelfTraining({"negatives": mode, "num_anchors": 8, "num_negatives": 4, "memory_size": 10_000,
                           "reliable": {"mode": "threshold", "gamma": 0.5 * math.log(c)}}, c)
    batch = tiny_batch(c, seed=5, h=8, w=8, extra=c + 1)
    p, lab = batch["pseudo"], batch["labeled"]
    # rep of a pixel = one-hot of its (pseudo-)label plus a unique id, so the bank tells which
    # pixels were pushed; a padded pixel keeps a real class in its image channels
    for part, y in ((lab, lab.label), (p, p.label)):
        onehot = F.one_hot(y.clamp(max=c - 1), c).permute(0, 3, 1, 2).float()
        onehot[(y == 255)[:, None].expand_as(onehot)] = 0.0
        ids = torch.arange(y.numel(), dtype=torch.float32).view(y.shape)[:, None] + (1000 if part is p else 0)
        part.image[:, 3:] = torch.cat([onehot, ids], 1)
    p.label[1, 0, -1] = 2  # padded (valid = False) pixel with a class id: still never used
    model = Linear1x1(c, seed=2)
    torch.manual_seed(0)
    method.training_step(nn.ModuleDict({"model": model}), batch, 0, 10)

    valid = p.valid & (p.label != 255)
    unreliable = valid & ~(p.entropy < 0.5 * math.log(c))
    with torch.no_grad():
        ranks = class_ranks(torch.softmax(model(torch.cat([lab.image, p.image]))["logits"], 1))
    total = 0
    for k in range(c):
        feats = method.bank.features(k)
        total += len(feats)
        assert not (feats[:, k] > 0).any(), f"class {k} has a negative pseudo-labeled {k}"
        ids = set(feats[:, c].long().tolist())
        # oracle: exactly which pixels are negatives of class k
        neg_p = unreliable & (p.label != k)
        neg_l = torch.zeros_like(lab.label, dtype=torch.bool)
        if mode == "rank":
            neg_p &= (ranks[2:, k] >= 3) & (ranks[2:, k] < 20)
            neg_l = (lab.label != 255) & (lab.label != k) & (ranks[:2, k] < 3)
        want = {int(i) + 1000 for i in torch.nonzero(neg_p.flatten()).flatten()}
        want |= {int(i) for i in torch.nonzero(neg_l.flatten()).flatten()}
        assert ids == want
        assert 1000 + 64 + 7 not in ids  # the padded pixel (sample 1, row 0, column 7)
    assert total > 0


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"method\.reliable"):
        SelfTraining.parse_config({"reliable": {"mode": "percentile", "gamma": 1.0}})
    with pytest.raises(ConfigError, match=r"method\.bogus"):
        build_method("self_training", {"bogus": 1}, 8)
    with pytest.raises(ConfigError, match=r"method\.low_rank"):
        SelfTraining(None, 3)
    assert METHODS["self_training"] is SelfTraining
    spec = SelfTraining({"strong": True}, 8).data_spec()
    assert spec.get("pseudo") == PseudoRequest(strong=True) and spec.get("unlabeled") is None
    assert spec.keys == ("labeled", "pseudo")
    with pytest.raises(ConfigError, match="data.pseudo_labels"):
        SelfTraining(None, 8).training_step(nn.ModuleDict({"model": Linear1x1(8)}),
                                            {"labeled": tiny_batch(8)["labeled"]}, 0, 1)


# ------------------------------------------------------------------ dataset
@pytest.mark.parametrize("scale", [(1.0, 1.0), (1.5, 2.0), (0.5, 0.5)])
def test_pseudo_sample_keeps_image_label_entropy_aligned(tmp_path: Path, scale: tuple[float, float]) -> None:
    vs = coordinate_videoset(tmp_path)
    refs = vs.frames()
    # label = row (y), quantised entropy = column (x): both encode the source coordinates
    root = write_pseudo_set(tmp_path / "set", vs, refs, lambda r, h, w: np.mgrid[0:h, 0:w][0],
                            lambda r, h, w: np.mgrid[0:h, 0:w][1])
    crop = (32, 48)
    ds = PseudoLabeledFrames(vs, root, ClipAugment(crop, None, scale, hflip=True), strong=True)
    emax = math.log(250) / 255.0
    flips = set()
    for seed in range(8):
        s = ds[(seed % 2, seed)]
        assert s.image.shape == (3, *crop) and len(s.strong) == 1 and s.strong[0].shape == (3, *crop)
        assert s.label.dtype == torch.int64 and s.entropy.dtype == torch.float32
        assert s.valid.dtype == torch.bool
        img = denormalize(s.image).astype(np.float64)
        valid = s.valid.numpy()
        lab, ent = s.label.numpy(), s.entropy.numpy()
        assert np.array_equal(valid, lab != 255)
        assert np.isinf(ent[~valid]).all() and np.isfinite(ent[valid]).all()
        x_img, y_img = img[..., 0] / 4.0, img[..., 1] / 4.0
        x_ent = ent / emax
        # nearest (labels) vs bilinear (image) sampling differ by at most about one source pixel
        assert np.abs(lab[valid] - y_img[valid]).max() <= 1.5
        assert np.abs(x_ent[valid] - x_img[valid]).max() <= 1.5
        assert np.allclose(x_ent[valid], np.round(x_ent[valid]), atol=1e-3)  # decoded q * max / 255
        r = int(np.nonzero(valid.sum(1) >= 2)[0][0])
        row = x_ent[r][valid[r]]
        flips.add(bool(row[0] > row[-1]))
        if scale == (0.5, 0.5):  # 40x60 -> 20x30 inside a 32x48 crop: the rest is padding
            assert int(valid.sum()) == 20 * 30
        else:
            assert valid.all()
        # same (index, seed) -> same sample
        again = ds[(seed % 2, seed)]
        for key in ("image", "label", "entropy", "valid"):
            assert torch.equal(getattr(s, key), getattr(again, key))
        assert torch.equal(s.strong[0], again.strong[0])
    assert flips == {True, False}


def test_manifest_and_file_errors_name_the_file(tmp_path: Path, synth: VideoSet) -> None:
    refs = synth.frames()[:3]
    good = dict(label_fn=gt_label(synth), q_fn=random_q())

    def make(name: str, **over: Any) -> Path:
        return write_pseudo_set(tmp_path / name, synth, refs, good["label_fn"], good["q_fn"], **over)

    ok = make("ok")
    s = read_pseudo_set(ok, synth)
    assert s.frames == refs and s.num_classes == 8 and s.entropy_max == pytest.approx(math.log(8))
    cases = [
        (make("fmt", format="other"), "'format'"),
        (make("ver", version=2), "'version'"),
        (make("ncls", num_classes=5, classes=None), "'num_classes' is 5"),
        (make("names", classes=[f"x{i}" for i in range(8)]), "'classes'"),
        (make("quant", quantisation={"dtype": "uint16", "max": 2.0}), "'quantisation'"),
        (make("qmax", quantisation={"dtype": "uint8", "max": -1}), "'quantisation.max'"),
        (make("dup", frames=[{"video": refs[0].video, "index": refs[0].index}] * 2), "listed twice"),
        (make("ghost", frames=[{"video": "nope", "index": 0}]), "'frames[0]'"),
        (make("empty", frames=[]), "'frames'"),
    ]
    for root, needle in cases:
        with pytest.raises(DataError, match=re.escape(needle)) as exc:
            read_pseudo_set(root, synth)
        assert str(root / "manifest.json") in str(exc.value)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json"):
        read_pseudo_set(tmp_path / "broken", synth)
    with pytest.raises(DataError, match="not found"):
        read_pseudo_set(tmp_path / "absent", synth)

    # a missing PNG is found when the set is opened
    missing = make("missing")
    lost = missing / "labels" / refs[1].video / f"{refs[1].index:08d}.png"
    lost.unlink()
    with pytest.raises(DataError, match=re.escape(str(lost))):
        PseudoLabeledFrames(synth, missing, ClipAugment((32, 32), None, (1.0, 1.0)))
    # corrupt, wrongly sized or out-of-range PNGs when a frame is read
    aug = ClipAugment((32, 32), None, (1.0, 1.0))
    corrupt = make("corrupt")
    bad = corrupt / "entropy" / refs[0].video / f"{refs[0].index:08d}.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match=re.escape(str(bad))):
        PseudoLabeledFrames(synth, corrupt, aug)[(0, 0)]
    small = make("small")
    bad = small / "labels" / refs[2].video / f"{refs[2].index:08d}.png"
    save_png(bad, np.zeros((16, 48), np.uint8))
    with pytest.raises(DataError, match=re.escape(str(bad)) + ".*48x16"):
        PseudoLabeledFrames(synth, small, aug)[(2, 0)]
    rng = make("range")
    bad = rng / "labels" / refs[0].video / f"{refs[0].index:08d}.png"
    save_png(bad, np.full((32, 48), 9, np.uint8))
    with pytest.raises(DataError, match=re.escape(str(bad)) + r".*\[9\]"):
        PseudoLabeledFrames(synth, rng, aug)[(0, 0)]


def test_build_train_sets_adds_the_pseudo_set(tmp_path: Path, synth: VideoSet) -> None:
    split = single_frame(synth, 3)
    pset = write_pseudo_set(tmp_path / "set", synth, split.unlabeled, gt_label(synth), random_q())
    raw = {
        "data": {"format": "synthetic", "root": str(tmp_path / "unused"), "split": {"mode": "single", "position": 3},
                 "crop_size": [32, 32], "base_size": None, "batch_size": 2, "unlabeled_batch_size": 3},
        "method": {"name": "self_training", "strong": True},
    }
    cfg = parse_config(raw)
    method = build_method(cfg.method_name, cfg.method_params, synth.num_classes)
    with pytest.raises(ConfigError, match=r"data\.pseudo_labels"):
        build_train_sets(cfg, synth, method.data_spec())
    raw["data"]["pseudo_labels"] = str(pset)
    cfg = parse_config(raw)
    sets, sizes = build_train_sets(cfg, synth, method.data_spec())
    assert set(sets) == {"labeled", "pseudo"} and sizes == {"labeled": 2, "pseudo": 3}
    assert isinstance(sets["pseudo"], PseudoLabeledFrames) and len(sets["pseudo"]) == len(split.unlabeled)
    sample = sets["pseudo"][(0, 1)]
    assert isinstance(sample, PseudoBatch) and len(sample.strong) == 1


# ------------------------------------------------------------------ engine
def make_trainer(out: Path, method: SelfTraining, sets: dict, iters: int, **kw: Any) -> Trainer:
    kw.setdefault("num_workers", 0)
    kw.setdefault("log_interval", 10)
    kw.setdefault("ckpt_interval", 100)
    return Trainer(
        method, lambda: TinySeg(8, 16), sets, {"labeled": 2, "pseudo": 2}, OptimConfig(lr=0.05),
        ScheduleConfig(iters=iters), TrainConfig(precision="fp32", channels_last=False, **kw), out,
        tensorboard=False, progress=False,
    )


def engine_sets(tmp: Path, synth: VideoSet) -> dict:
    split = single_frame(synth, 3)
    pset = tmp / "pseudo"
    if not pset.exists():
        write_pseudo_set(pset, synth, split.unlabeled, gt_label(synth), random_q(1))
    augment = ClipAugment((32, 32), (32, 48), (1.0, 1.25), hflip=True)
    from semivss.data.clips import LabeledClips

    return {"labeled": LabeledClips(synth, split.labeled, augment),
            "pseudo": PseudoLabeledFrames(synth, pset, augment)}


def small_method() -> SelfTraining:
    return SelfTraining({"num_anchors": 32, "num_negatives": 8, "memory_size": 300}, 8)


class Crash(RuntimeError):
    pass


class CrashingSelfTraining(SelfTraining):
    def training_step(self, models, batch, step, max_steps):  # type: ignore[no-untyped-def]
        if step == 3:
            raise Crash(step)
        return super().training_step(models, batch, step, max_steps)


def test_engine_run_lowers_the_loss_and_resumes_exactly(tmp_path: Path, synth: VideoSet) -> None:
    sets = engine_sets(tmp_path, synth)
    method = small_method()
    make_trainer(tmp_path / "run", method, sets, iters=40).fit()
    with (tmp_path / "run" / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]
    assert len(rows) == 4
    assert float(rows[-1]["loss"]) < 0.8 * float(rows[0]["loss"])
    assert all(math.isfinite(float(r["loss_contra"])) for r in rows)
    assert float(rows[-1]["loss_unsup"]) < float(rows[0]["loss_unsup"])
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    queues = ckpt["method"]["bank"]["queues"]
    assert sum(len(q) for q in queues) > 0
    # method state round trip
    other = small_method()
    other.load_state_dict(ckpt["method"])
    for k in range(8):
        torch.testing.assert_close(other.bank.features(k), method.bank.features(k).cpu())

    # an interrupted run resumed from its checkpoint equals an uninterrupted one
    make_trainer(tmp_path / "full", small_method(), sets, iters=6, ckpt_interval=3).fit()
    crashing = CrashingSelfTraining({"num_anchors": 32, "num_negatives": 8, "memory_size": 300}, 8)
    with pytest.raises(Crash):
        make_trainer(tmp_path / "part", crashing, sets, iters=6, ckpt_interval=3).fit()
    make_trainer(tmp_path / "part", small_method(), sets, iters=6, ckpt_interval=3).fit(resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    for key, value in a["models"]["model"].items():
        torch.testing.assert_close(b["models"]["model"][key], value, rtol=0, atol=1e-6)
    qa, qb = a["method"]["bank"]["queues"], b["method"]["bank"]["queues"]
    assert [len(q) for q in qa] == [len(q) for q in qb] and sum(len(q) for q in qa) > 0
    for x, y in zip(qa, qb):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
