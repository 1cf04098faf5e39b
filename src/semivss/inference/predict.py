"""Whole-image and sliding-window prediction (SPEC section 5), with TTA / ensemble wrappers.

Everything is built around a *probability function* ``probs(images, out_size) -> (B, C, H, W)``
softmax probabilities; multi-scale + flip test-time augmentation and model ensembles (SPEC section
2.5, steps 2 and 5) are wrappers that average such functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semivss.inference.config import EvalConfig

ProbFn = Callable[[Tensor, tuple[int, int]], Tensor]

__all__ = [
    "ProbFn",
    "ensemble",
    "eval_mode",
    "input_logits",
    "make_prob_fn",
    "predict_probs",
    "upsample",
]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[None]:
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False) of a (B, C, h, w) tensor; no-op at equal size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _forward(model: nn.Module, x: Tensor, amp: bool) -> Tensor:
    """Model logits upsampled to the model input size, float32 (B, C, h_in, w_in)."""
    x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(x.device, amp):
        out = model(x)
    logits = out["logits"] if isinstance(out, dict) else out
    return upsample(logits.float(), (x.shape[-2], x.shape[-1]))


def _scaled(hw: tuple[int, int], scale: float) -> tuple[int, int]:
    return (max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale)))


def _grid(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Window [start, end) positions covering ``length`` (>= window); the last one flush right."""
    n = max(length - window + stride - 1, 0) // stride + 1
    spans = []
    for i in range(n):
        end = min(i * stride + window, length)
        spans.append((max(end - window, 0), end))
    return spans


def _slide(model: nn.Module, x: Tensor, cfg: EvalConfig) -> Tensor:
    """Sliding-window logits at the resolution of ``x``; overlaps averaged, small images padded."""
    b, _, h, w = x.shape
    wh, ww = cfg.window
    sh, sw = cfg.stride
    ph, pw = max(h, wh), max(w, ww)
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, pw - w, 0, ph - h))  # zero = the mean colour after normalisation
    total: Tensor | None = None
    count = torch.zeros(1, 1, ph, pw, device=x.device)
    for y0, y1 in _grid(ph, wh, sh):
        for x0, x1 in _grid(pw, ww, sw):
            logits = _forward(model, x[:, :, y0:y1, x0:x1], cfg.amp)
            if total is None:
                total = torch.zeros(b, logits.shape[1], ph, pw, device=x.device)
            total[:, :, y0:y1, x0:x1] += logits
            count[:, :, y0:y1, x0:x1] += 1
    assert total is not None
    return (total / count)[:, :, :h, :w]


def input_logits(model: nn.Module, images: Tensor, cfg: EvalConfig, scale: float = 1.0) -> Tensor:
    """Logits (B, C, h, w) at the model-input resolution (``cfg.size`` x ``scale`` if set).

    Whole mode: images resized to that size, one forward, logits upsampled to it. Slide mode:
    overlapping ``cfg.window`` windows every ``cfg.stride`` on the resized image.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    base = cfg.size if cfg.size is not None else (images.shape[-2], images.shape[-1])
    hw = _scaled(base, scale)
    with torch.inference_mode():
        x = upsample(images.float(), hw)
        if cfg.mode == "whole":
            return _forward(model, x, cfg.amp)
        return _slide(model, x, cfg)


def predict_probs(
    model: nn.Module,
    images: Tensor,
    out_size: tuple[int, int],
    cfg: EvalConfig,
    scale: float = 1.0,
) -> Tensor:
    """Softmax probabilities (B, C, H, W) float32 at ``out_size`` of normalised ``images``.

    Logits are upsampled to the model input size, then bilinearly to ``out_size``, then softmaxed
    (SPEC section 5). ``model`` should be in eval mode (see :func:`eval_mode`).
    """
    with torch.inference_mode():
        logits = upsample(input_logits(model, images, cfg, scale), out_size)
        return torch.softmax(logits, dim=1)


def make_prob_fn(
    model: nn.Module,
    cfg: EvalConfig,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> ProbFn:
    """A probability function averaging the softmax over ``scales`` x (identity, h-flip).

    With the defaults it is exactly :func:`predict_probs`; multi-scale + flip is the TTA of
    SPEC section 2.5 (step 2): probabilities resized back to ``out_size`` and averaged.
    """
    if not scales:
        raise ValueError("scales must not be empty")

    def probs(images: Tensor, out_size: tuple[int, int]) -> Tensor:
        acc: Tensor | None = None
        n = 0
        for s in scales:
            for flipped in (False, True) if flip else (False,):
                x = images.flip(-1) if flipped else images
                p = predict_probs(model, x, out_size, cfg, scale=s)
                if flipped:
                    p = p.flip(-1)
                acc = p if acc is None else acc + p
                n += 1
        assert acc is not None
        return acc / n

    return probs


def ensemble(fns: Sequence[ProbFn], weights: Sequence[float] | None = None) -> ProbFn:
    """Weighted average of several probability functions (SPEC section 2.5, step 2)."""
    if not fns:
        raise ValueError("ensemble needs at least one probability function")
    w = [1.0] * len(fns) if weights is None else [float(x) for x in weights]
    if len(w) != len(fns) or sum(w) <= 0 or any(x < 0 for x in w):
        raise ValueError(f"ensemble weights {weights} must be {len(fns)} non-negative numbers")
    total = sum(w)

    def probs(images: Tensor, out_size: tuple[int, int]) -> Tensor:
        acc: Tensor | None = None
        for fn, wi in zip(fns, w):
            p = fn(images, out_size) * (wi / total)
            acc = p if acc is None else acc + p
        assert acc is not None
        return acc

    return probs
