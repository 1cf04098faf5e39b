"""Small tensor operations shared by models, methods and inference (one definition each)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["class_argmax", "resize", "resize_channels_last", "resize_labels", "upsample_argmax"]


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize (``align_corners=False``) of a (B, C, h, w) tensor to ``size`` = (H, W);
    returned unchanged when it already has that size."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_channels_last(x: Tensor, size: Sequence[int]) -> Tensor:
    """:func:`resize` computed on a channels-last copy of a (B, C, h, w) score map; the result is
    channels-last, so :func:`class_argmax` and a softmax over classes then read contiguous memory.
    The values equal :func:`resize`'s up to float rounding (a few ulp). Upsampling 11-class logits
    60x80 -> 240x320 -> 360x480 and taking the argmax is about twice as fast this way on a 2-core
    EPYC (benchmarks/argmax_speed.py prints both)."""
    return resize(x.contiguous(memory_format=torch.channels_last), size)


def resize_labels(x: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of a (B, H, W) integer or boolean map, dtype kept."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    y = F.interpolate(x[:, None].float(), size=size, mode="nearest")[:, 0]
    return y.bool() if x.dtype == torch.bool else y.to(x.dtype)


def class_argmax(x: Tensor) -> Tensor:
    """``x.argmax(1)`` of a (B, C, H, W) score map (the first maximum on ties), computed on a
    channels-last copy: the reduction then runs over contiguous memory, about 4x faster on CPU
    than reducing over the strided class axis (a 240x320 frame, 11 classes, 2-core EPYC:
    7-8 -> about 2 ms; benchmarks/argmax_speed.py)."""
    if x.dim() != 4:
        return x.argmax(1)
    return x.permute(0, 2, 3, 1).contiguous().argmax(-1)


def _source_rows(n_in: int, n_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For each output index of a bilinear resize ``n_in -> n_out`` (``align_corners=False``, the
    convention of ``F.interpolate``): the two source indices and the weight of the second."""
    scale = n_in / n_out
    src = ((torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    return i0, i1, (src - i0).clamp(0, 1)


def upsample_argmax(x: Tensor, size: Sequence[int]) -> Tensor:
    """``class_argmax(resize(x, size))`` for a (B, C, h, w) float score map, without upsampling
    every class channel (docs/methods.md#fast-label-upsampling, Eq. UP-2).

    Each output pixel of a bilinear resize is a convex combination of (at most) four input pixels.
    If those four pixels share one argmax class c, every one of them scores c at least as high as
    any other class (strictly higher than any class before c), and so does any combination with
    non-negative weights: the output's argmax is c. Only the pixels whose four sources disagree
    (near class boundaries, a few percent of a segmentation map) are interpolated, with the
    weights of ``F.interpolate``; the others take their sources' common label. Labels equal
    the full computation's except where two classes' interpolated scores tie to within float
    rounding. Other dtypes than float32 (whose full upsampling rounds to that dtype) take the
    full computation."""
    if x.dim() != 4:
        raise ValueError(f"upsample_argmax takes a (B, C, h, w) score map, got shape {tuple(x.shape)}")
    size = (int(size[0]), int(size[1]))
    if x.dtype != torch.float32 or tuple(x.shape[-2:]) == size:
        return class_argmax(resize(x, size))
    b, c, h, w = x.shape
    xl = x.permute(0, 2, 3, 1).contiguous()  # (B, h, w, C): a view when x is channels-last
    low = xl.argmax(-1)  # (B, h, w)
    # a cell (r, q) spans source rows r, r + 1 and columns q, q + 1 (clamped at the last ones)
    pad = torch.cat([low, low[:, -1:]], 1)
    pad = torch.cat([pad, pad[:, :, -1:]], 2)
    corner = pad[:, :-1, :-1]
    uniform = (corner == pad[:, 1:, :-1]) & (corner == pad[:, :-1, 1:]) & (corner == pad[:, 1:, 1:])
    y0, y1, wy = _source_rows(h, size[0], x.device)
    x0, x1, wx = _source_rows(w, size[1], x.device)
    labels = low.index_select(1, y0).index_select(2, x0)  # (B, H, W): label of the cell's first source
    mixed = ~uniform.index_select(1, y0).index_select(2, x0)
    bi, yi, xi = mixed.nonzero(as_tuple=True)
    if bi.numel():
        flat = xl.view(b * h * w, c)
        rows0, rows1 = (bi * h + y0[yi]) * w, (bi * h + y1[yi]) * w
        q0, q1 = x0[xi], x1[xi]
        ly, lx = wy[yi, None], wx[xi, None]
        top = (1 - lx) * flat.index_select(0, rows0 + q0) + lx * flat.index_select(0, rows0 + q1)
        bottom = (1 - lx) * flat.index_select(0, rows1 + q0) + lx * flat.index_select(0, rows1 + q1)
        labels[bi, yi, xi] = ((1 - ly) * top + ly * bottom).argmax(-1)
    return labels
