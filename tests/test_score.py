"""`semivss score` (prediction PNGs scored without a model) and the VSPW submission writer, on
generated VSPW and Cityscapes trees with the real naming."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from semivss.cli import app
from semivss.data.formats import load_cityscapes, load_vspw
from semivss.errors import DataError
from semivss.inference.config import EvalConfig
from semivss.inference.evaluate import evaluate
from semivss.inference.predict import Predictor
from semivss.inference.score import score_predictions, write_submission

runner = CliRunner()


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr[:, :, ::-1] if arr.ndim == 3 else arr)


def make_vspw(root: Path, videos: int = 2, frames: int = 10, h: int = 12, w: int = 16) -> dict[str, list[np.ndarray]]:
    """VSPW layout: `val.txt`, `data/<video>/origin/<8 digits>.jpg`, `mask/<8 digits>.png` (raw
    values 1..124 = classes 0..123, 0 = void), a mask on every other frame; returns the class-id
    labels (255 = void) of the annotated frames per video."""
    rng = np.random.default_rng(0)
    names = [f"{100 + v}_clip{v}" for v in range(videos)]
    labels: dict[str, list[np.ndarray]] = {}
    for name in names:
        base = rng.integers(0, 5, (h, w))
        labels[name] = []
        for f in range(frames):
            _write(root / "data" / name / "origin" / f"{f:08d}.jpg", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            if f % 2 == 0:
                lab = np.roll(base, f // 2, axis=1).astype(np.uint8) * 20  # classes 0, 20, ..., 80
                raw = lab + 1
                raw[0, 0] = 0  # one void pixel
                _write(root / "data" / name / "mask" / f"{f:08d}.png", raw.astype(np.uint8))
                lab = lab.copy()
                lab[0, 0] = 255
                labels[name].append(lab)
    (root / "val.txt").write_text("\n".join(names) + "\n")
    return labels


def _save_preds(pred_dir: Path, vs, labels: dict[str, list[np.ndarray]], change=None, name: str = "stem") -> None:
    for name_v, labs in labels.items():
        refs = [r for r in vs.annotated() if r.video == name_v]
        for ref, lab in zip(refs, labs):
            pred = np.where(lab == 255, 0, lab).astype(np.uint8)
            if change is not None:
                pred = change(pred)
            stem = Path(vs.frame(ref).image).stem if name == "stem" else f"{ref.index:08d}"
            _write(pred_dir / ref.video / f"{stem}.png", pred)


def test_perfect_predictions_score_one(tmp_path: Path) -> None:
    labels = make_vspw(tmp_path / "vspw")
    vs = load_vspw(tmp_path / "vspw", "val")
    _save_preds(tmp_path / "preds", vs, labels)
    m = score_predictions(tmp_path / "preds", vs, progress=False).metrics
    assert m["mIoU"] == pytest.approx(1.0) and m["pixel_acc"] == pytest.approx(1.0)
    assert m["n_frames"] == 10 and np.isnan(m["VC8"])  # 5 annotated frames per video: no 8-frame window


def test_score_matches_hand_computed_iou(tmp_path: Path) -> None:
    labels = make_vspw(tmp_path / "vspw", videos=1, frames=2)
    vs = load_vspw(tmp_path / "vspw", "val")
    lab = labels[vs.videos[0].name][0]
    # predict class 20 as 40 everywhere: IoU_20 = 0, IoU_40 = n40 / (n40 + n20), others 1
    _save_preds(tmp_path / "preds", vs, labels, change=lambda p: np.where(p == 20, 40, p).astype(np.uint8))
    res = score_predictions(tmp_path / "preds", vs, progress=False)
    valid = lab != 255
    present = sorted(set(lab[valid].tolist()))
    n20, n40 = int(((lab == 20) & valid).sum()), int(((lab == 40) & valid).sum())
    ious = {c: 1.0 for c in present}
    ious[20], ious[40] = 0.0, n40 / (n40 + n20)
    # (pixel (0,0) is void in the label: not counted though the prediction there is 0)
    assert res.metrics["mIoU"] == pytest.approx(np.mean([ious[c] for c in present]), abs=1e-6)


def test_score_equals_evaluate_on_the_same_predictions(tmp_path: Path) -> None:
    """Scoring the PNGs `evaluate --save-preds` writes gives evaluate's own metrics."""
    from test_inference import Oracle, make_videoset

    vs, _ = make_videoset(tmp_path / "set")
    cfg = EvalConfig(size=None, batch_size=3, vc=(2, 3))
    direct = evaluate(Predictor.single(Oracle(), cfg), vs, vs.annotated(), cfg, "cpu", progress=False,
                      save_dir=tmp_path / "preds")
    stored = score_predictions(tmp_path / "preds", vs, vc=(2, 3), progress=False)
    for key in ("mIoU", "fwIoU", "pixel_acc", "VC2", "VC3", "n_frames"):
        assert stored.metrics[key] == pytest.approx(direct.metrics[key]), key


def test_cityscapes_tree_with_the_real_naming(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    seq = root / "leftImg8bit_sequence" / "val" / "frankfurt"
    for f in range(0, 30):
        _write(seq / f"frankfurt_000000_{f:06d}_leftImg8bit.png", np.zeros((4, 6, 3), np.uint8))
    gt = np.array([[7, 7, 26, 26, 0, 33]] * 4, np.uint8)  # road, car, void, bicycle
    _write(root / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png", gt)
    vs = load_cityscapes(root, "val")
    assert len(vs) == 30 and [r.index for r in vs.annotated()] == [19]
    pred = np.array([[0, 0, 13, 13, 5, 18]] * 4, np.uint8)
    _write(tmp_path / "p" / "frankfurt_000000" / "frankfurt_000000_000019_leftImg8bit.png", pred)
    assert score_predictions(tmp_path / "p", vs, progress=False).metrics["mIoU"] == pytest.approx(1.0)
    pred[:, 0] = 13  # one road column predicted as car: road 1/2, car 2/3, bicycle 1
    _write(tmp_path / "q" / "frankfurt_000000" / "00000019.png", pred)  # the --save-preds naming
    m = score_predictions(tmp_path / "q", vs, progress=False).metrics
    assert m["mIoU"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)


def test_bad_predictions_are_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    labels = make_vspw(tmp_path / "vspw", videos=1, frames=2)
    vs = load_vspw(tmp_path / "vspw", "val")
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match=r"prediction missing: .*00000000\.png"):
        score_predictions(tmp_path / "none", vs, progress=False)
    _save_preds(tmp_path / "big", vs, labels, change=lambda p: np.pad(p, ((0, 1), (0, 0))))
    with pytest.raises(DataError, match=r"00000000\.png: prediction is 16x13, its label 16x12"):
        score_predictions(tmp_path / "big", vs, progress=False)
    _save_preds(tmp_path / "bad", vs, labels, change=lambda p: np.full_like(p, 200))
    with pytest.raises(DataError, match=r"values \[200\] are not class ids 0\.\.123"):
        score_predictions(tmp_path / "bad", vs, progress=False)
    (tmp_path / "rgb" / vs.videos[0].name).mkdir(parents=True)
    Image.new("RGB", (16, 12)).save(tmp_path / "rgb" / vs.videos[0].name / "00000000.png")
    with pytest.raises(DataError, match="single-channel"):
        score_predictions(tmp_path / "rgb", vs, progress=False)


class Constant(torch.nn.Module):
    def __init__(self, c: int, cls: int) -> None:
        super().__init__()
        self.c, self.cls = c, cls

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = torch.zeros(x.shape[0], self.c, *x.shape[-2:])
        logits[:, self.cls] = 1.0
        return {"logits": logits}


def test_submission_writer_layout_then_scored(tmp_path: Path) -> None:
    labels = make_vspw(tmp_path / "vspw")
    vs = load_vspw(tmp_path / "vspw", "val")
    cfg = EvalConfig(size=(8, 8), batch_size=4)
    n = write_submission(Predictor.single(Constant(124, 123), cfg), vs, tmp_path / "sub", cfg, "cpu", progress=False)
    assert n == 20  # every frame, annotated or not
    for video in vs.videos:
        files = sorted(p.name for p in (tmp_path / "sub" / video.name).iterdir())
        assert files == [f"{f:08d}.png" for f in range(10)]
    im = Image.open(tmp_path / "sub" / vs.videos[0].name / "00000003.png")
    assert im.mode == "L" and im.size == (16, 12) and set(np.unique(np.asarray(im))) == {123}
    assert not list((tmp_path / "sub").rglob("*.tmp"))
    m = score_predictions(tmp_path / "sub", vs, progress=False).metrics
    assert m["mIoU"] == 0.0 and m["n_frames"] == sum(len(v) for v in labels.values())


def test_score_and_vspw_submission_through_the_cli(tmp_path: Path) -> None:
    make_vspw(tmp_path / "vspw", videos=2, frames=6, h=32, w=32)
    cfg = {
        "name": "v", "out_dir": str(tmp_path / "run"),
        "data": {"format": "vspw", "root": str(tmp_path / "vspw"), "train_split": "val", "val_split": None,
                 "split": {"mode": "every_kth", "k": 2}, "base_size": [32, 32], "crop_size": [32, 32],
                 "batch_size": 2, "num_workers": 0},
        "model": {"backbone": "mobilenet_v2", "pretrained": None},
        "schedule": {"iters": 2}, "train": {"precision": "fp32", "log_interval": 1, "ckpt_interval": 2},
        "eval": {"size": [32, 32]},
    }
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["train", str(tmp_path / "v.yaml")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    model = tmp_path / "run" / "model.safetensors"
    res = runner.invoke(app, ["predict", str(model), str(tmp_path / "vspw"), str(tmp_path / "sub"),
                              "--format", "vspw-submission", "--split", "val"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "sub").rglob("*.png"))) == 12
    res = runner.invoke(app, ["score", str(tmp_path / "sub"), "--data", str(tmp_path / "vspw"), "--format", "vspw",
                              "--split", "val", "--out", str(tmp_path / "m.json")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert 0.0 <= m["mIoU"] <= 1.0 and m["n_frames"] == 6
