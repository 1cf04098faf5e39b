"""Padding (validity) masks of training crops (ARCHITECTURE "Training batch":
``batch["unlabeled"]["valid"]`` (B,N,H,W) and ``batch["labeled"]["valid"]`` (B,H,W) bool, True
where a pixel comes from the frame, False in the padding added when a down-scaled frame is smaller
than the crop). Online pseudo-label methods
give no pseudo-label to invalid pixels (as the official UniMatch / U2PL code does with its
``ignore_mask``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["ignore_invalid", "labeled_valid", "unlabeled_valid"]


def unlabeled_valid(unlabeled: Mapping[str, Any], frame: int = 0) -> Tensor | None:
    """Boolean (B,H,W) validity mask of frame ``frame`` of ``batch["unlabeled"]``, or None when the
    batch carries no ``valid`` key (older callers, hand-made batches: every pixel counts as valid).

    Raises ValueError naming ``batch['unlabeled']['valid']`` when its shape does not match
    ``image`` (B,N,3,H,W)."""
    valid = unlabeled.get("valid")
    if valid is None:
        return None
    image = unlabeled["image"]
    expected = (image.shape[0], image.shape[1], image.shape[-2], image.shape[-1])
    if tuple(valid.shape) != tuple(expected):
        raise ValueError(
            f"batch['unlabeled']['valid'] has shape {tuple(valid.shape)}, expected {expected} "
            f"(B, N, H, W of batch['unlabeled']['image'] {tuple(image.shape)})"
        )
    return valid[:, frame].to(device=image.device, dtype=torch.bool)


def labeled_valid(labeled: Mapping[str, Any]) -> Tensor | None:
    """Boolean (B,H,W) validity mask of ``batch["labeled"]`` (``valid``; None when absent).

    Raises ValueError naming ``batch['labeled']['valid']`` when its shape is not the label's."""
    valid = labeled.get("valid")
    if valid is None:
        return None
    label = labeled["label"]
    if tuple(valid.shape) != tuple(label.shape):
        raise ValueError(
            f"batch['labeled']['valid'] has shape {tuple(valid.shape)}, expected {tuple(label.shape)} "
            f"(batch['labeled']['label'])"
        )
    return valid.to(device=label.device, dtype=torch.bool)


def ignore_invalid(target: Tensor, valid: Tensor | None, ignore_index: int = 255) -> Tensor:
    """``target`` (B,H,W) with ``ignore_index`` where ``valid`` is False (unchanged for None)."""
    if valid is None:
        return target
    if valid.shape != target.shape:
        raise ValueError(f"valid mask {tuple(valid.shape)} does not match target {tuple(target.shape)}")
    return target.masked_fill(~valid.to(target.device), ignore_index)
