"""Synthetic generator: determinism, invariants, drift, folder-format round trip, safety."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from semivss.data import SYNTHETIC_CLASSES, FrameRef, generate_synthetic, load_folder
from semivss.errors import ConfigError, DataError

KW = dict(videos=3, frames=6, height=48, width=96)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = _digest(generate_synthetic(tmp_path / "a", seed=3, **KW))
    b = _digest(generate_synthetic(tmp_path / "b", seed=3, **KW))
    c = _digest(generate_synthetic(tmp_path / "c", seed=4, **KW))
    assert a == b
    assert len(a) == 3 * 6 * 2 + 3  # frames + labels + meta.yaml, train.txt, val.txt
    frames_a = {k: v for k, v in a.items() if k.startswith("videos/")}
    frames_c = {k: v for k, v in c.items() if k.startswith("videos/")}
    assert frames_a.keys() == frames_c.keys() and all(frames_a[k] != frames_c[k] for k in frames_a)


def test_invariants_and_round_trip(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "s", seed=0, videos=4, frames=8, height=64, width=128)
    assert (root / "train.txt").read_text().split() == ["video000", "video001", "video002"]
    assert (root / "val.txt").read_text().split() == ["video003"]
    train, val = load_folder(root, "train"), load_folder(root, "val")
    assert train.classes == SYNTHETIC_CLASSES and len(train) == 24 and len(val) == 8
    assert train.annotated() == train.frames()  # every frame has a label
    seen: set[int] = set()
    for ref in train.frames():
        img, lab = train.read_image(ref), train.read_label(ref)
        assert img.shape == (64, 128, 3) and lab.shape == (64, 128)
        assert lab.max() < len(SYNTHETIC_CLASSES)
        seen |= set(np.unique(lab).tolist())
    assert {0, 1, 3, 6} <= seen  # sky, building, road, car always occur somewhere
    # classes are not a per-class colour: pixels of one class span a wide colour range
    for cls in (0, 3):
        pix = np.concatenate([train.read_image(r)[train.read_label(r) == cls] for r in train.frames()[:8]])
        assert pix.std(axis=0).mean() > 6


def test_appearance_drifts_over_each_video(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "s", seed=1, videos=4, frames=12, height=48, width=96, val_videos=0)
    vs = load_folder(root)
    for v in vs.videos:
        first = vs.read_image(v.frames[0]).astype(np.float64)
        last = vs.read_image(v.frames[-1]).astype(np.float64)
        nxt = vs.read_image(v.frames[1]).astype(np.float64)
        drift = np.abs(first.mean((0, 1)) - last.mean((0, 1))).max()
        assert drift > 8, (v.name, drift)
        # far frames differ from the first more than the adjacent one does
        assert np.abs(first - last).mean() > np.abs(first - nxt).mean()
    # objects move: labels of the first and last frame differ
    v0 = vs.videos[0]
    assert (vs.read_label(v0.frames[0]) != vs.read_label(v0.frames[-1])).mean() > 0.01


def test_refuses_non_empty_output_and_bad_args(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="not empty"):
        generate_synthetic(out, **KW)
    generate_synthetic(out, overwrite=True, seed=0, **KW)
    generate_synthetic(out, overwrite=True, seed=0, videos=2, frames=2, height=48, width=96)
    assert (out / "mine.txt").read_text() == "user data"  # only the generator's files are replaced
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["video000", "video001"]
    assert load_folder(out).frame(FrameRef("video001", 1)).label is not None
    with pytest.raises(ConfigError, match="val_videos"):
        generate_synthetic(tmp_path / "x", videos=2, val_videos=2)
    with pytest.raises(ConfigError, match="height"):
        generate_synthetic(tmp_path / "y", height=4)
