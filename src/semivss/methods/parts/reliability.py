"""Entropy-based reliable / unreliable pixel split of U2PL (Wang et al., CVPR 2022, Eq. 5-7;
docs/methods.md#41-reliable-and-unreliable-pixels, Eq. (U2PL-2)..(U2PL-4)): per-pixel entropy of
the teacher's distribution, and at training progress t/T the ``alpha_t = alpha_0 (1 - t/T)``
percent highest-entropy pixels of the batch are unreliable.

Unlike the official ``np.percentile`` + ``>=`` threshold (whose share depends on interpolation
and ties), the masks here hold exactly ``round(alpha/100 * n_valid)`` pixels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["alpha_schedule", "entropy", "entropy_rank_mask", "reliability_split"]


def entropy(prob: Tensor, dim: int = 1, eps: float = 1e-10) -> Tensor:
    """``H = -sum_c p_c log(p_c + eps)`` along ``dim`` (computed in float32 or wider)."""
    p = prob.float() if prob.dtype in (torch.float16, torch.bfloat16) else prob
    return -(p * torch.log(p + eps)).sum(dim)


def alpha_schedule(step: int, max_steps: int, alpha0: float = 20.0) -> float:
    """``alpha_t = alpha0 * (1 - t / T)`` in percent (U2PL; t = completed iterations)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    t = min(max(step, 0), max_steps)
    return float(alpha0) * (1.0 - t / max_steps)


def _count(percent: float, n: int) -> int:
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"percent must be in [0, 100], got {percent}")
    return min(n, int(math.floor(percent / 100.0 * n + 0.5)))


def entropy_rank_mask(
    ent: Tensor, percent: float, valid: Tensor | None = None, highest: bool = True
) -> Tensor:
    """Boolean mask (shape of ``ent``) of exactly ``round(percent/100 * n_valid)`` valid pixels with
    the highest (``highest``) or lowest entropy over the whole tensor (the batch); ties are broken
    by ``torch.topk``. ``valid`` (bool, same shape) excludes pixels from the ranking."""
    flat = ent.detach().reshape(-1)
    if valid is None:
        idx_valid = torch.arange(flat.numel(), device=flat.device)
    else:
        if valid.shape != ent.shape:
            raise ValueError(f"valid mask {tuple(valid.shape)} does not match entropy {tuple(ent.shape)}")
        idx_valid = valid.reshape(-1).nonzero().squeeze(1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    k = _count(percent, int(idx_valid.numel()))
    if k > 0:
        pick = torch.topk(flat[idx_valid].float(), k, largest=highest, sorted=False).indices
        mask[idx_valid[pick]] = True
    return mask.view(ent.shape)


def reliability_split(
    ent: Tensor, alpha_percent: float, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(reliable, unreliable)`` boolean masks: the ``alpha_percent`` % highest-entropy valid pixels
    of the batch are unreliable (exact count, see :func:`entropy_rank_mask`), the other valid
    pixels are reliable; invalid pixels are in neither."""
    unreliable = entropy_rank_mask(ent, alpha_percent, valid, highest=True)
    base = torch.ones_like(unreliable) if valid is None else valid.bool()
    return base & ~unreliable, unreliable
