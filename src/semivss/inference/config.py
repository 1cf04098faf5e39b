"""Evaluation / inference settings (the ``eval`` config section)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import field_validator, model_validator

from semivss.sections import Section


def _positive_pair(v: tuple[int, int] | None, name: str) -> tuple[int, int] | None:
    if v is not None and (v[0] < 1 or v[1] < 1):
        raise ValueError(f"{name} must be two positive integers (height, width), got {v}")
    return v


class EvalConfig(Section):
    """How frames are fed to the model at evaluation time (docs/protocols.md#5-evaluation).

    ``mode="whole"``: frames resized to ``size`` (H, W) before the model (``None``: original
    resolution); logits upsampled bilinearly to the label's resolution. ``mode="slide"``: windows of
    ``window`` every ``stride`` on the image resized to ``size`` (or at original resolution),
    logits averaged where windows overlap. ``vc``: window lengths of VC_n (Eq. (MET-5)).
    ``amp``: bf16 autocast on CPU, fp16 on CUDA. ``scales`` x ``flip``: test-time augmentation
    (docs/methods.md#8-test-time-augmentation-and-ensembles): the model input size is ``size``
    (or the original size) times each scale, optionally also horizontally flipped; each view's
    softmax at the output resolution is averaged. ``(1.0,)`` without flip is plain single-scale inference.
    """

    mode: Literal["whole", "slide"] = "whole"
    size: tuple[int, int] | None = (240, 320)
    window: tuple[int, int] = (240, 320)
    stride: tuple[int, int] = (160, 213)
    batch_size: int = 4
    vc: tuple[int, ...] = (8, 16)
    amp: bool = False
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    @field_validator("size")
    @classmethod
    def _check_size(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        return _positive_pair(v, "size")

    @field_validator("window")
    @classmethod
    def _check_window(cls, v: tuple[int, int]) -> tuple[int, int]:
        _positive_pair(v, "window")
        return v

    @field_validator("stride")
    @classmethod
    def _check_stride(cls, v: tuple[int, int]) -> tuple[int, int]:
        _positive_pair(v, "stride")
        return v

    @field_validator("batch_size")
    @classmethod
    def _check_batch(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"batch_size must be >= 1, got {v}")
        return v

    @field_validator("vc")
    @classmethod
    def _check_vc(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(n < 1 for n in v):
            raise ValueError(f"vc window lengths must be >= 1, got {v}")
        return v

    @field_validator("scales")
    @classmethod
    def _check_scales(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("scales must list at least one scale, e.g. [1.0]")
        if any(not math.isfinite(s) or s <= 0 for s in v):
            raise ValueError(f"scales must be positive finite numbers, got {v}")
        return tuple(float(s) for s in v)

    @model_validator(mode="after")
    def _check_slide(self) -> EvalConfig:
        if self.mode == "slide" and (
            self.stride[0] > self.window[0] or self.stride[1] > self.window[1]
        ):
            raise ValueError(
                f"stride {self.stride} larger than window {self.window} would leave pixels "
                "unpredicted"
            )
        return self
