"""Data requests: what a method asks for in its batches, and how each request builds its dataset.

A method's ``DataSpec`` is a tuple of requests; each has a ``key`` (its entry in the training
batch) and ``build(source) -> (dataset, batch size)``. A new kind of training data is a new
request class here; the experiment glue only loops over the requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from torch.utils.data import Dataset

from semivss.errors import ConfigError, DataError

if TYPE_CHECKING:
    from semivss.data.config import DataConfig
    from semivss.data.splits import Split
    from semivss.data.transforms import ClipAugment
    from semivss.data.video import VideoSet

__all__ = ["DataRequest", "LabeledRequest", "OverlapRequest", "PseudoRequest", "TrainSource", "UnlabeledRequest"]


@dataclass(frozen=True)
class TrainSource:
    """Everything a request may build its dataset from."""

    videoset: VideoSet
    split: Split
    augment: ClipAugment
    cfg: DataConfig
    method: str = "method"


class DataRequest(Protocol):
    """One entry of the training batch: ``batch[key]`` holds what ``build``'s dataset returns."""

    key: ClassVar[str]

    def build(self, source: TrainSource) -> tuple[Dataset, int]: ...


def _unlabeled_batch_size(source: TrainSource, what: str) -> int:
    """``data.unlabeled_batch_size``, which must be positive for a method that reads ``what``."""
    if source.cfg.unlabeled_batch_size < 1:
        raise ConfigError(f"data.unlabeled_batch_size: method '{source.method}' needs a positive "
                          f"batch size for its {what}")
    return source.cfg.unlabeled_batch_size


def _unlabeled_frames(source: TrainSource) -> list:
    """The split's unlabeled frames; a DataError when the method needs some and there are none."""
    if not source.split.unlabeled:
        raise DataError(f"{source.cfg.root} ({source.cfg.train_split}): the split has no unlabeled "
                        f"frames, but method '{source.method}' needs them")
    return source.split.unlabeled


def _offsets(name: str, offsets: tuple[int, int]) -> None:
    lo, hi = offsets
    if lo > hi:
        raise ConfigError(f"DataSpec.{name} must be (low, high) with low <= high, got {(lo, hi)}")


@dataclass(frozen=True)
class LabeledRequest:
    """Labeled frames (``LabeledBatch``), each with ``context_frames`` other frames of its video
    at offsets in ``context_offsets`` (inclusive) and their strong copies if ``context_strong``;
    ``context_preceding``: instead the ``context_frames`` frames right before it, in order (a clip
    ending at the labeled frame, e.g. for Accel's key frame + flows)."""

    key: ClassVar[str] = "labeled"
    context_frames: int = 0
    context_offsets: tuple[int, int] = (-29, 29)
    context_strong: bool = False
    context_preceding: bool = False

    def __post_init__(self) -> None:
        if self.context_frames < 0:
            raise ConfigError(f"DataSpec.context_frames must be >= 0, got {self.context_frames}")
        _offsets("context_offsets", self.context_offsets)

    def build(self, source: TrainSource) -> tuple[Dataset, int]:
        from semivss.data.clips import LabeledClips

        ds = LabeledClips(source.videoset, source.split.labeled, source.augment,
                          context_frames=self.context_frames,
                          context_offsets=tuple(self.context_offsets),
                          context_strong=self.context_strong,
                          context_preceding=self.context_preceding)
        return ds, source.cfg.batch_size


@dataclass(frozen=True)
class UnlabeledRequest:
    """Unlabeled clips (``UnlabeledBatch``) of ``frames`` frames at offsets in ``offsets`` from an
    unlabeled anchor frame, with ``strong_copies`` independently distorted copies."""

    key: ClassVar[str] = "unlabeled"
    frames: int = 1
    offsets: tuple[int, int] = (-29, 29)
    strong_copies: int = 0

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ConfigError(f"DataSpec unlabeled frames must be >= 1, got {self.frames}")
        if self.strong_copies < 0:
            raise ConfigError(f"DataSpec.strong_copies must be >= 0, got {self.strong_copies}")
        _offsets("unlabeled_offsets", self.offsets)

    def build(self, source: TrainSource) -> tuple[Dataset, int]:
        from semivss.data.clips import UnlabeledClips

        ds = UnlabeledClips(source.videoset, _unlabeled_frames(source), source.augment,
                            num_frames=self.frames, offsets=tuple(self.offsets),
                            strong_copies=self.strong_copies)
        return ds, _unlabeled_batch_size(source, "unlabeled frames")


@dataclass(frozen=True)
class PseudoRequest:
    """Frames of the offline pseudo-label set ``data.pseudo_labels`` (``PseudoBatch``), with a
    strong photometric copy if ``strong``."""

    key: ClassVar[str] = "pseudo"
    strong: bool = False

    def build(self, source: TrainSource) -> tuple[Dataset, int]:
        from semivss.data.pseudo import PseudoLabeledFrames

        d = source.cfg
        if d.pseudo_labels is None:
            raise ConfigError(
                f"data.pseudo_labels: method '{source.method}' trains on a pseudo-label set; set it "
                "to a folder written by `semivss pseudo-label`"
            )
        size = _unlabeled_batch_size(source, "pseudo-labeled frames")
        return PseudoLabeledFrames(source.videoset, d.pseudo_labels, source.augment, strong=self.strong), size


@dataclass(frozen=True)
class OverlapRequest:
    """Two overlapping crops of each unlabeled frame (``OverlapBatch``, CAC), of ``data.crop_size``
    from the frame resized to ``data.base_size`` x U[``scale_range``]."""

    key: ClassVar[str] = "overlap"
    scale_range: tuple[float, float] = (0.8, 2.0)
    iou_bound: tuple[float, float] = (0.1, 1.0)
    stride: int = 8

    def build(self, source: TrainSource) -> tuple[Dataset, int]:
        from semivss.data.clips import OverlapCrops

        d = source.cfg
        ds = OverlapCrops(source.videoset, _unlabeled_frames(source), tuple(d.crop_size), d.base_size,
                          self.scale_range, self.iou_bound, self.stride)
        return ds, _unlabeled_batch_size(source, "unlabeled frames")

