"""Labeled/unlabeled splits (camvid-ssvs every-k-th) and offsets from the nearest labeled frame."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from semivss.data import (
    DataConfig,
    Frame,
    FrameRef,
    Split,
    Video,
    VideoSet,
    all_labeled,
    build_split,
    every_kth,
    load_camvid,
    nearest_labeled_offset,
    single_frame,
)
from semivss.errors import ConfigError, DataError

# The project's CamVid copy lives in shared/ beside the checkout (SEMIVSS_CAMVID overrides).
CAMVID = Path(os.environ.get("SEMIVSS_CAMVID", Path(__file__).resolve().parents[2] / "shared/data/camvid"))


def _set(spec: dict[str, tuple[list[int], set[int]]]) -> VideoSet:
    """Video set without files: {video: (frame indices, annotated indices)}."""
    videos = [
        Video(name, [Frame(name, i, image=Path(f"/nonexistent/{name}_{i}.png"), label=Path("/l.png") if i in ann else None) for i in idx])
        for name, (idx, ann) in spec.items()
    ]
    return VideoSet("toy", videos, ["a", "b"])


def test_every_kth_positions_over_annotated_frames() -> None:
    vs = _set({"v": (list(range(0, 100, 10)), set(range(0, 100, 10))), "w": ([1, 2, 3, 5, 8, 13, 21], {2, 5, 13, 21})})
    sp = every_kth(vs, 4)  # positions p % 4 == 2
    assert sp.labeled == [FrameRef("v", 20), FrameRef("v", 60), FrameRef("w", 13)]
    assert len(sp.unlabeled) == 17 - 3 and not set(sp.unlabeled) & set(sp.labeled)
    assert FrameRef("w", 1) in sp.unlabeled  # non-annotated frames are unlabeled training frames
    assert every_kth(vs, 4, phase=0).labeled == [FrameRef("v", 0), FrameRef("v", 40), FrameRef("v", 80), FrameRef("w", 2)]
    assert every_kth(vs, 1).labeled == vs.annotated()
    with pytest.raises(DataError, match="no labeled frame"):
        every_kth(vs, 64)
    with pytest.raises(ConfigError, match="k must be >= 1"):
        every_kth(vs, 0)


def test_single_frame_and_all() -> None:
    vs = _set({"v": ([0, 1, 2, 3], {1, 2, 3}), "w": ([7, 9], {7, 9}), "x": ([4], set())})
    assert single_frame(vs, 0).labeled == [FrameRef("v", 1), FrameRef("w", 7)]
    assert single_frame(vs, -1).labeled == [FrameRef("v", 3), FrameRef("w", 9)]
    assert FrameRef("x", 4) in single_frame(vs, 0).unlabeled
    with pytest.raises(DataError, match="video 'w'.*only 2 annotated"):
        single_frame(vs, 2)
    sp = all_labeled(vs)
    assert sp.labeled == vs.annotated() and sp.unlabeled == [FrameRef("v", 0), FrameRef("x", 4)]
    with pytest.raises(ValueError, match="both labeled and unlabeled"):
        Split([FrameRef("v", 0)], [FrameRef("v", 0)])


def test_nearest_labeled_offset_hand_computed() -> None:
    vs = _set({"v": ([0, 10, 20, 30, 40, 50, 60], set()), "w": ([0, 1], set())})
    sp = Split([FrameRef("v", 10), FrameRef("v", 50)], [])
    pos = nearest_labeled_offset(sp, vs)
    assert [pos[FrameRef("v", i)] for i in range(0, 70, 10)] == [-1, 0, 1, 2, -1, 0, 1]  # tie at 30 -> +2
    idx = nearest_labeled_offset(sp, vs, unit="index")
    assert [idx[FrameRef("v", i)] for i in range(0, 70, 10)] == [-10, 0, 10, 20, -10, 0, 10]
    assert FrameRef("w", 0) not in pos  # video without a labeled frame
    with pytest.raises(DataError, match="no labeled frame"):
        nearest_labeled_offset(Split([], []), vs)


def test_build_split_from_config() -> None:
    vs = _set({"v": (list(range(10)), set(range(10)))})
    cfg = DataConfig(format="folder", root=Path("/x"), split={"mode": "every_kth", "k": 4})
    assert build_split(cfg.split, vs).labeled == [FrameRef("v", 2), FrameRef("v", 6)]
    cfg = DataConfig(format="folder", root=Path("/x"), split={"mode": "single", "position": -1})
    assert build_split(cfg.split, vs).labeled == [FrameRef("v", 9)]
    cfg = DataConfig(format="folder", root=Path("/x"), split={"mode": "all"})
    assert len(build_split(cfg.split, vs).labeled) == 10


def test_data_config_validation() -> None:
    from pydantic import ValidationError

    cfg = DataConfig(format="camvid", root="/data/camvid")
    assert cfg.crop_size == (240, 320) and cfg.base_size == (240, 320) and cfg.split.k == 8
    for bad in ({"crop": 3}, {"split": {"k": 0}}, {"split": {"mode": "random"}}, {"scale_range": (2.0, 1.0)},
                {"crop_size": (0, 5)}, {"format": "kitti"}, {"split": {"k": 4, "phase": 4}}):  # fmt: skip
        with pytest.raises(ValidationError):
            DataConfig.model_validate({"format": "camvid", "root": "/d", **bad})


@pytest.mark.skipif(not CAMVID.is_dir(), reason="real CamVid copy not available")
def test_camvid_ssvs_one_eighth() -> None:
    vs = load_camvid(CAMVID, "train")
    sp = every_kth(vs, 8)
    per_video: dict[str, list[int]] = {}
    for r in sp.labeled:
        per_video.setdefault(r.video, []).append(vs.position(r))
    assert {v: len(p) for v, p in per_video.items()} == {"0001TP": 8, "0006R0": 13, "0016E5": 25}
    assert per_video["0001TP"] == [4, 12, 20, 28, 36, 44, 52, 60]
    assert per_video["0016E5"][-1] == 196
    assert len(sp.labeled) == 46 and len(sp.unlabeled) == 367 - 46
    assert sp.labeled[0] == FrameRef("0001TP", vs.videos[0].frames[4].index)
    assert {v: len(p) for v, p in _count(every_kth(vs, 4), vs).items()} == {"0001TP": 15, "0006R0": 25, "0016E5": 51}
    assert sum(len(p) for p in _count(every_kth(vs, 16), vs).values()) == 4 + 6 + 13


def _count(sp: Split, vs: VideoSet) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in sp.labeled:
        out.setdefault(r.video, []).append(vs.position(r))
    return out


def test_one_unlabeled_frame_per_label_interval() -> None:
    """The image-SSL pool: with k = 4 the labeled positions are 2, 6, 10 and the unlabeled pool
    keeps only the frames halfway between them (positions 0, 4, 8), not all nine others."""
    vs = _set({"v": (list(range(12)), set(range(12)))})
    from semivss.data.config import SplitConfig

    full = build_split(SplitConfig(mode="every_kth", k=4), vs)
    assert [r.index for r in full.labeled] == [2, 6, 10] and len(full.unlabeled) == 9
    pool = build_split(SplitConfig(mode="every_kth", k=4, unlabeled="one_per_interval"), vs)
    assert pool.labeled == full.labeled
    assert [r.index for r in pool.unlabeled] == [0, 4, 8]
    with pytest.raises(ValueError, match="every_kth"):
        SplitConfig(mode="single", unlabeled="one_per_interval")
