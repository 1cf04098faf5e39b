"""Typed training batches: what a clip dataset returns per sample and, stacked, per iteration.

``LabeledBatch``, ``UnlabeledBatch`` and ``PseudoBatch`` are frozen dataclasses of tensors. A
sample has no batch dimension; :meth:`TensorBatch.collate` stacks samples field by field. Every
batch carries ``valid`` (False in the padding of a crop smaller than the crop size) and, where
strong photometric copies were asked for, ``strong``: a list of tensors shaped like ``image``.
See docs/ARCHITECTURE.md ("Training batch").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["LabeledBatch", "OverlapBatch", "PseudoBatch", "TensorBatch", "UnlabeledBatch"]

B = TypeVar("B", bound="TensorBatch")


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


class TensorBatch:
    """Helpers shared by the batch dataclasses: map over tensors, stack samples, pin memory."""

    def map_tensors(self: B, fn: Callable[[Tensor], Tensor]) -> B:
        """A copy with ``fn`` applied to every tensor field (and to every tensor of list fields)."""
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = fn(value)
            elif isinstance(value, list):
                changes[f.name] = [fn(v) for v in value]
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def pin_memory(self: B) -> B:
        """Called by the DataLoader with ``pin_memory=True`` (CUDA)."""
        return self.map_tensors(lambda t: t.pin_memory())

    @classmethod
    def collate(cls: type[B], samples: Sequence[B]) -> B:
        """Stack samples of this class field by field (``None`` stays ``None``)."""
        if not samples:
            raise ValueError(f"collate of an empty list of {cls.__name__}")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            first = getattr(samples[0], f.name)
            column = [getattr(s, f.name) for s in samples]
            if first is None:
                if any(v is not None for v in column):
                    raise ValueError(f"{cls.__name__}.{f.name} is set in some samples only")
                values[f.name] = None
            elif isinstance(first, list):
                if any(len(v) != len(first) for v in column):
                    raise ValueError(f"{cls.__name__}.{f.name}: samples have different list lengths")
                values[f.name] = [torch.stack([v[i] for v in column]) for i in range(len(first))]
            else:
                values[f.name] = torch.stack(column)
        return cls(**values)


def _check(cls: str, name: str, got: Tensor, expected: tuple[int, ...]) -> None:
    if _shape(got) != expected:
        raise ValueError(f"{cls}.{name} has shape {_shape(got)}, expected {expected}")


@dataclass(frozen=True)
class LabeledBatch(TensorBatch):
    """Labeled frames: ``image`` ([B,]3,H,W), ``label`` ([B,]H,W) int64 (255 = ignore), ``valid``
    ([B,]H,W) bool; with context frames (IFR) ``context`` ([B,]K,3,H,W), ``context_offset``
    ([B,]K) signed frame offsets and optionally ``context_strong`` (photometric copies)."""

    image: Tensor
    label: Tensor
    valid: Tensor
    context: Tensor | None = None
    context_offset: Tensor | None = None
    context_strong: Tensor | None = None

    def __post_init__(self) -> None:
        _check("LabeledBatch", "valid", self.valid, _shape(self.label))
        if self.context_strong is not None:
            assert self.context is not None, "LabeledBatch.context_strong needs context"
            _check("LabeledBatch", "context_strong", self.context_strong, _shape(self.context))


@dataclass(frozen=True)
class UnlabeledBatch(TensorBatch):
    """Unlabeled clips of N frames (anchor first): ``image`` ([B,]N,3,H,W), ``offset`` ([B,]N),
    ``valid`` ([B,]N,H,W) bool, ``strong``: independently distorted copies of ``image``."""

    image: Tensor
    offset: Tensor
    valid: Tensor
    strong: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        shape = _shape(self.image)
        _check("UnlabeledBatch", "valid", self.valid, shape[:-3] + shape[-2:])
        for i, s in enumerate(self.strong):
            _check("UnlabeledBatch", f"strong[{i}]", s, shape)

    def frame_valid(self, frame: int = 0) -> Tensor:
        """Boolean (B,H,W) validity mask of frame ``frame`` of a collated batch."""
        return self.valid[:, frame].bool()


@dataclass(frozen=True)
class PseudoBatch(TensorBatch):
    """Frames of an offline pseudo-label set: ``image`` ([B,]3,H,W), ``label`` ([B,]H,W) stored
    argmax (255 = none / padding), ``entropy`` ([B,]H,W) nats (+inf where invalid), ``valid``
    ([B,]H,W) bool, ``strong``: photometric copies of ``image``."""

    image: Tensor
    label: Tensor
    entropy: Tensor
    valid: Tensor
    strong: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("entropy", "valid"):
            _check("PseudoBatch", name, getattr(self, name), _shape(self.label))
        for i, s in enumerate(self.strong):
            _check("PseudoBatch", f"strong[{i}]", s, _shape(self.image))


@dataclass(frozen=True)
class OverlapBatch(TensorBatch):
    """Two overlapping crops of one unlabeled frame (CAC): ``image`` ([B,]2,3,H,W), ``valid``
    ([B,]2,H,W) bool, ``overlap`` ([B,]2,4) int64 = (top, left, bottom, right) of the shared
    region in each crop's own unflipped pixel frame (same size in both), ``flip`` ([B,]2) bool =
    the crop was mirrored after cropping."""

    image: Tensor
    valid: Tensor
    overlap: Tensor
    flip: Tensor

    def __post_init__(self) -> None:
        shape = _shape(self.image)
        _check("OverlapBatch", "valid", self.valid, shape[:-3] + shape[-2:])
        _check("OverlapBatch", "overlap", self.overlap, shape[:-3] + (4,))
        _check("OverlapBatch", "flip", self.flip, shape[:-3])

