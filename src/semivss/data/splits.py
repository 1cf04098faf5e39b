"""Which frames are labeled for training (docs/protocols.md#2-benchmark-camvid-ssvs) and offsets
from the labeled frames (docs/methods.md#10-inner-video-overfitting).

Positions are counted in a video's ordered list of *annotated* frames when choosing labeled
frames (for CamVid every frame is annotated, so this is the ordered frame list); offsets from
the nearest labeled frame are counted over *all* frames of the video, or in source frame index.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Literal

from semivss.data.video import FrameRef, VideoSet
from semivss.errors import ConfigError, DataError

__all__ = ["Split", "every_kth", "single_frame", "all_labeled", "nearest_labeled_offset",
           "one_unlabeled_per_interval"]


@dataclass(frozen=True)
class Split:
    """Labeled training frames (ground truth used) and unlabeled ones (labels never read)."""

    labeled: list[FrameRef]
    unlabeled: list[FrameRef]

    def __post_init__(self) -> None:
        both = set(self.labeled) & set(self.unlabeled)
        if both:
            raise ValueError(f"frames both labeled and unlabeled: {sorted(both)[:5]}")

    def __repr__(self) -> str:
        return f"Split({len(self.labeled)} labeled, {len(self.unlabeled)} unlabeled)"


def _make(videoset: VideoSet, chosen: list[FrameRef], how: str) -> Split:
    if not chosen:
        raise DataError(f"split {how} of video set {videoset.name!r} selects no labeled frame")
    keep = set(chosen)
    return Split(chosen, [r for r in videoset.frames() if r not in keep])


def every_kth(videoset: VideoSet, k: int, phase: int | None = None) -> Split:
    """camvid-ssvs 1/k protocol: within each video, annotated-frame position p is labeled when
    p % k == phase (default k // 2); every other frame is unlabeled
    (docs/protocols.md#2-benchmark-camvid-ssvs)."""
    if k < 1:
        raise ConfigError(f"split.k must be >= 1, got {k}")
    phase = k // 2 if phase is None else phase
    if not 0 <= phase < k:
        raise ConfigError(f"split phase must be in 0..{k - 1}, got {phase}")
    chosen = [r for v in videoset.videos for p, r in enumerate(v.annotated()) if p % k == phase]
    return _make(videoset, chosen, f"every_kth(k={k}, phase={phase})")


def one_unlabeled_per_interval(split: Split, videoset: VideoSet, k: int, phase: int | None = None) -> Split:
    """The image-SSL pool of the IFR paper's Table 1 question: of the unlabeled frames keep one per
    label interval, the frame halfway between two labeled ones (video frame position p with
    p % k == (phase + k // 2) % k, phase default k // 2), instead of every frame of the videos."""
    phase = k // 2 if phase is None else phase
    target = (phase + k // 2) % k
    keep = {r for v in videoset.videos for p, r in enumerate(v.refs()) if p % k == target}
    return Split(split.labeled, [r for r in split.unlabeled if r in keep])


def single_frame(videoset: VideoSet, position: int = 0) -> Split:
    """One labeled frame per video: the annotated frame at `position` (negative counts from the
    end). Videos without annotated frames contribute only unlabeled frames; a video with fewer
    annotated frames than the position asks for is an error naming it."""
    chosen = []
    for v in videoset.videos:
        ann = v.annotated()
        if not ann:
            continue
        if not -len(ann) <= position < len(ann):
            raise DataError(
                f"split.position={position} but video {v.name!r} of {videoset.name!r} has only "
                f"{len(ann)} annotated frames"
            )
        chosen.append(ann[position])
    return _make(videoset, chosen, f"single_frame(position={position})")


def all_labeled(videoset: VideoSet) -> Split:
    """Every annotated frame is labeled (fully supervised upper bound)."""
    return _make(videoset, videoset.annotated(), "all")


def nearest_labeled_offset(
    split: Split, videoset: VideoSet, unit: Literal["position", "index"] = "position"
) -> dict[FrameRef, int]:
    """Signed offset of every frame from the nearest labeled frame of its video (Eq. (OFF-1)).

    `unit="position"` counts frames in the video's ordered frame list, `"index"` counts source
    frame indices. Positive = after the labeled frame; ties go to the earlier labeled frame
    (positive offset). Frames of videos without a labeled frame are left out.
    """
    if unit not in ("position", "index"):
        raise ConfigError(f"offset unit must be 'position' or 'index', got {unit!r}")
    if not split.labeled:
        raise DataError(f"split of video set {videoset.name!r} has no labeled frame")
    anchors: dict[str, list[int]] = {}
    for r in split.labeled:
        v = videoset.video(r.video)
        anchors.setdefault(r.video, []).append(v.position(r.index) if unit == "position" else r.index)
    out: dict[FrameRef, int] = {}
    for v in videoset.videos:
        ks = sorted(anchors.get(v.name, []))
        if not ks:
            continue
        for pos, fr in enumerate(v.frames):
            x = pos if unit == "position" else fr.index
            i = bisect_left(ks, x)
            cands = [x - ks[j] for j in (i - 1, i) if 0 <= j < len(ks)]
            out[fr.ref] = min(cands, key=lambda d: (abs(d), -d))
    return out
