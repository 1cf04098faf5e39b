"""Padding (validity) masks of training crops: every batch carries ``valid`` (True where a pixel
comes from the frame, False in the padding added when a down-scaled frame is smaller than the
crop). Online pseudo-label methods give no pseudo-label to invalid pixels (as the official
UniMatch / U2PL code does with its ``ignore_mask``)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["ignore_invalid"]


def ignore_invalid(target: Tensor, valid: Tensor, ignore_index: int = 255) -> Tensor:
    """``target`` (B,H,W) with ``ignore_index`` where ``valid`` is False."""
    if valid.shape != target.shape:
        raise ValueError(f"valid mask {tuple(valid.shape)} does not match target {tuple(target.shape)}")
    return target.masked_fill(~valid.to(target.device).bool(), ignore_index)
