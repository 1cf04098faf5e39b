"""CAC (docs/methods.md#13-cac): overlapping crops share their overlap pixel for pixel, the
directional contrastive loss against a hand-computed value and its direction, and a short
training run through the real data pipeline."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from semivss.config import load_config
from semivss.data.batch import OverlapBatch
from semivss.data.clips import OverlapCrops
from semivss.data.synthetic import generate_synthetic
from semivss.data.video import Frame, Video, VideoSet
from semivss.experiment import train
from semivss.methods import build_method
from semivss.methods.cac import directional_contrastive_loss


def noise_set(root: Path, n: int = 3, h: int = 30, w: int = 40) -> VideoSet:
    rng = np.random.default_rng(0)
    frames = []
    for i in range(n):
        p = root / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        frames.append(Frame("v", i, image=p))
    return VideoSet("noise", [Video("v", frames)], ["a", "b"])


def test_overlap_crops_share_their_overlap_pixel_for_pixel(tmp_path: Path) -> None:
    vs = noise_set(tmp_path)
    ds = OverlapCrops(vs, vs.frames(), crop_size=(16, 24), base_size=(30, 40), scale_range=(1.0, 1.0),
                      iou_bound=(0.1, 1.0), stride=8, photometric=False)
    seen_partial = False
    for seed in range(40):
        s = ds[(seed % 3, seed)]
        assert isinstance(s, OverlapBatch) and s.image.shape == (2, 3, 16, 24)
        (t1, l1, b1, r1), (t2, l2, b2, r2) = s.overlap.tolist()
        assert (b1 - t1, r1 - l1) == (b2 - t2, r2 - l2) and b1 > t1 and r1 > l1
        assert all(v % 8 == 0 for v in (t1, l1, t2, l2))
        inter = (b1 - t1) * (r1 - l1)
        assert 0.1 <= inter / (2 * 16 * 24 - inter) <= 1.0
        crops = [s.image[j].flip(-1) if s.flip[j] else s.image[j] for j in (0, 1)]
        assert torch.equal(crops[0][:, t1:b1, l1:r1], crops[1][:, t2:b2, l2:r2])
        seen_partial |= inter < 16 * 24
    assert seen_partial
    # the same (index, seed) gives the same sample
    a, b = ds[(1, 7)], ds[(1, 7)]
    assert torch.equal(a.image, b.image) and torch.equal(a.overlap, b.overlap)


def test_directional_loss_by_hand_and_its_direction() -> None:
    f1 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    f2 = torch.tensor([[0.0, 1.0]], requires_grad=True)
    neg = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    neg_label = torch.tensor([0, 1])
    # anchor 1 is less confident than crop 2, which passes the threshold: pos = 0, the same-class
    # negative is excluded, the other gives -1 -> loss = log(1 + e^-1)
    loss = directional_contrastive_loss(f1, f2, torch.tensor([0.5]), torch.tensor([0.9]),
                                        torch.tensor([0]), neg, neg_label, 0.75, temperature=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    loss.backward()
    assert f1.grad is not None and f1.grad.abs().sum() > 0
    assert f2.grad is None  # the positive is detached: only the less confident side moves
    # no anchor when crop 2 is not more confident, or below the threshold
    for c1, c2 in ((0.9, 0.8), (0.5, 0.7)):
        zero = directional_contrastive_loss(f1, f2, torch.tensor([c1]), torch.tensor([c2]),
                                            torch.tensor([0]), neg, neg_label, 0.75)
        assert zero.item() == 0.0
    # chunking gives the same value
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    b = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    n = torch.nn.functional.normalize(torch.randn(70, 8), dim=1)
    args = (a, b, torch.full((50,), 0.1), torch.full((50,), 0.9), torch.randint(0, 3, (50,)), n,
            torch.randint(0, 3, (70,)))
    assert directional_contrastive_loss(*args, chunk=7).item() == pytest.approx(
        directional_contrastive_loss(*args, chunk=1000).item(), rel=1e-5)


def test_cac_trains_through_the_pipeline(tmp_path: Path) -> None:
    data = generate_synthetic(tmp_path / "synth", videos=3, frames=6, height=48, width=64, seed=1)
    cfg = {
        "name": "cac", "out_dir": str(tmp_path / "run"),
        "data": {"format": "synthetic", "root": str(data), "split": {"mode": "single", "position": 2},
                 "base_size": [48, 64], "crop_size": [32, 32], "batch_size": 2,
                 "unlabeled_batch_size": 2, "num_workers": 0, "val_split": None},
        "model": {"pretrained": None},
        "method": {"name": "cac", "pos_thresh": 0.0},
        "optim": {"lr": 0.01},
        "schedule": {"iters": 6, "warmup_iters": 0},
        "train": {"log_interval": 2, "eval_interval": 0, "ckpt_interval": 3, "precision": "fp32"},
    }
    path = tmp_path / "cac.yaml"
    path.write_text(yaml.safe_dump(cfg))
    scalars = train(load_config(path))
    assert math.isfinite(scalars["loss"]) and scalars["loss_cac"] > 0
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert {"loss_sup", "loss_cac", "anchor_ratio"} <= set(rows[0])
    assert build_method("cac", {}, 4).data_spec().keys == ("labeled", "overlap")
