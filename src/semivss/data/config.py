"""`data:` section of the experiment config and helpers that build data objects from it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from semivss.data.formats import load_dataset
from semivss.data.remap import LabelMap
from semivss.data.splits import Split, all_labeled, every_kth, one_unlabeled_per_interval, single_frame
from semivss.data.transforms import ClipAugment
from semivss.data.video import VideoSet
from semivss.registry import FORMATS
from semivss.sections import Section

__all__ = ["SplitConfig", "DataConfig", "build_split", "build_augment", "load_videosets"]


class SplitConfig(Section):
    """Which training frames are labeled (docs/protocols.md#2-benchmark-camvid-ssvs): every k-th
    annotated frame of each video (camvid-ssvs), one frame per video at `position`, or all
    annotated frames."""

    mode: Literal["every_kth", "single", "all"] = "every_kth"
    k: int = Field(8, ge=1)
    phase: int | None = Field(None, ge=0)
    position: int = 0
    # unlabeled pool: every other frame of the training videos (video SSL), or one frame per label
    # interval (the image-SSL setting; every_kth only)
    unlabeled: Literal["all", "one_per_interval"] = "all"

    @model_validator(mode="after")
    def _phase_below_k(self) -> SplitConfig:
        if self.phase is not None and self.phase >= self.k:
            raise ValueError(f"phase must be < k ({self.k}), got {self.phase}")
        if self.unlabeled != "all" and self.mode != "every_kth":
            raise ValueError("unlabeled: one_per_interval needs mode every_kth")
        return self


class DataConfig(Section):
    """Dataset, split and training-augmentation settings (evaluation resize lives elsewhere)."""

    format: str  # a name registered in semivss.registry.FORMATS
    root: Path
    train_split: str | None = "train"
    val_split: str | None = "val"
    split: SplitConfig = Field(default_factory=SplitConfig)
    crop_size: tuple[int, int] = (240, 320)
    base_size: tuple[int, int] | None = (240, 320)
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    batch_size: int = Field(8, ge=1)
    unlabeled_batch_size: int = Field(8, ge=0)
    num_workers: int = Field(2, ge=0)
    # folder written by `semivss pseudo-label` (docs/protocols.md#7-pseudo-label-sets), read by
    # methods that ask for pseudo-labeled frames (batch size `unlabeled_batch_size`)
    pseudo_labels: Path | None = None
    # label lookup table (`semivss.data.remap`): source class ids -> target classes, unmapped -> 255;
    # applied to the training and validation sets, whose classes become the target's
    label_map: Path | None = None

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        return FORMATS.check_name(value)

    @field_validator("crop_size", "base_size")
    @classmethod
    def _positive(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and min(v) < 1:
            raise ValueError(f"sizes are (height, width) of positive ints, got {v}")
        return v

    @field_validator("scale_range")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {v}")
        return v


def build_split(s: SplitConfig, videoset: VideoSet) -> Split:
    """Labeled/unlabeled split of a video set according to the label-ratio rule `s`
    (`DataConfig.split`)."""
    if s.mode == "every_kth":
        split = every_kth(videoset, s.k, s.phase)
        if s.unlabeled == "one_per_interval":
            split = one_unlabeled_per_interval(split, videoset, s.k, s.phase)
        return split
    if s.mode == "single":
        return single_frame(videoset, s.position)
    return all_labeled(videoset)


def build_augment(cfg: DataConfig) -> ClipAugment:
    """Training `ClipAugment` from the config (camvid-ssvs recipe by default)."""
    return ClipAugment(cfg.crop_size, cfg.base_size, cfg.scale_range, cfg.hflip)


def load_videosets(cfg: DataConfig) -> tuple[VideoSet, VideoSet | None]:
    """(training video set, validation video set or None when `val_split` is null), both read
    through `label_map` when it is set (`semivss.data.remap.LabelMap`)."""
    train = load_dataset(cfg.format, cfg.root, cfg.train_split)
    val = load_dataset(cfg.format, cfg.root, cfg.val_split) if cfg.val_split else None
    if cfg.label_map is not None:
        label_map = LabelMap.from_file(cfg.label_map)
        train = label_map.remap_videoset(train)
        val = label_map.remap_videoset(val) if val is not None else None
    return train, val
