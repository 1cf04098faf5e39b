"""CutMix for segmentation (Yun et al. 2019; French et al. 2020): one rectangular box per sample,
pasted from a partner sample, applied identically to the image, the (pseudo-)label and the
confidence map.

Box shapes follow the reference implementations: U2PL (``generate_cutout_mask``: one box of
``area`` x the image area), UniMatch (``obtain_cutmix_box``: random area and aspect ratio) and
CPS (French et al.'s ``BoxMaskGenerator``, :func:`box_mix_mask`: boxes toggled into an empty
mask); exact shapes in docs/methods.md#44-cutmix-boxes. All randomness comes from an explicit
``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "apply_cutmix",
    "batch_cutmix_boxes",
    "box_mix_mask",
    "cutmix_box",
    "roll_permutation",
    "step_generator",
]

AreaSpec = float | Sequence[float]


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(lo: int, hi: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[lo, hi]`` (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


def _area(area: AreaSpec, generator: torch.Generator | None) -> float:
    if isinstance(area, (int, float)):
        a = float(area)
    else:
        lo, hi = (float(v) for v in area)
        if not 0.0 < lo <= hi:
            raise ValueError(f"area range must satisfy 0 < low <= high, got {tuple(area)}")
        a = _uniform(lo, hi, generator)
    if not 0.0 < a <= 1.0:
        raise ValueError(f"cutmix area fraction must be in (0, 1], got {a}")
    return a


def cutmix_box(
    h: int,
    w: int,
    p: float = 0.5,
    area: AreaSpec = 0.5,
    ratio: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean ``(h, w)`` mask of ONE box (True = pixel taken from the partner sample); with
    probability ``1 - p`` the mask is empty.

    ``area``: fraction of the image area, or a ``(low, high)`` range drawn uniformly. ``ratio``
    None: U2PL shape rule; ``(low, high)``: UniMatch's rule (aspect ratio h/w drawn uniformly,
    corner uniform over the image, retried until the box fits; after 1000 misses the box is
    clamped into the image).
    """
    if h < 1 or w < 1:
        raise ValueError(f"cutmix_box needs a positive size, got {(h, w)}")
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    if float(torch.rand((), generator=generator)) >= p:
        return mask
    a = _area(area, generator)
    target = a * h * w
    if ratio is None:
        lo = min(int(math.floor(a * w)) + 1, w)
        bw = _randint(lo, max(lo, w - 1), generator)
        bh = min(h, max(1, int(round(target / bw))))
        x = _randint(0, w - bw, generator)
        y = _randint(0, h - bh, generator)
    else:
        r_lo, r_hi = (float(v) for v in ratio)
        if not 0.0 < r_lo <= r_hi:
            raise ValueError(f"cutmix ratio range must satisfy 0 < low <= high, got {tuple(ratio)}")
        for _ in range(1000):
            r = _uniform(r_lo, r_hi, generator)
            bw, bh = int(math.sqrt(target / r)), int(math.sqrt(target * r))
            x, y = _randint(0, w - 1, generator), _randint(0, h - 1, generator)
            if x + bw <= w and y + bh <= h:
                break
        else:
            bw, bh = min(bw, w), min(bh, h)
            x, y = min(x, w - bw), min(y, h - bh)
    mask[y : y + bh, x : x + bw] = True
    return mask


def batch_cutmix_boxes(
    n: int,
    h: int,
    w: int,
    p: float = 0.5,
    area: AreaSpec = 0.5,
    ratio: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``(n, h, w)`` boolean masks, one independent :func:`cutmix_box` per sample."""
    return torch.stack([cutmix_box(h, w, p, area, ratio, generator, device) for _ in range(n)])


def box_mix_mask(
    h: int,
    w: int,
    n_boxes: int = 3,
    prop_range: Sequence[float] = (0.25, 0.5),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """CPS / French et al. box mask (``BoxMaskGenerator`` with random aspect ratio, boxes within
    bounds, ``invert=True``): each of ``n_boxes`` boxes covers a proportion ``U(prop_range) /
    n_boxes`` of the image (side proportions ``py = prop ** U(0, 1)``, ``px = prop / py``, both
    times ``sqrt(1 / n_boxes)``) and toggles the pixels it covers in an initially empty mask."""
    lo, hi = (float(v) for v in prop_range)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"prop_range must satisfy 0 <= low <= high <= 1, got {tuple(prop_range)}")
    if n_boxes < 1:
        raise ValueError(f"n_boxes must be >= 1, got {n_boxes}")
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    fac = math.sqrt(1.0 / n_boxes)
    for _ in range(n_boxes):
        prop = _uniform(lo, hi, generator)
        u = float(torch.rand((), generator=generator))
        if prop > 0.0:
            py = math.exp(u * math.log(prop))
            px = prop / py
        else:
            py = px = 0.0
        bh, bw = round(py * fac * h), round(px * fac * w)
        y0 = round((h - bh) * float(torch.rand((), generator=generator)))
        x0 = round((w - bw) * float(torch.rand((), generator=generator)))
        mask[y0 : y0 + bh, x0 : x0 + bw] ^= True
    return mask


def step_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator seeded from torch's global RNG (which the engine seeds, checkpoints and
    restores), so a method's per-step random draws are reproducible and resume exactly."""
    seed = int(torch.randint(0, 2**62, ()))
    return torch.Generator(device=device).manual_seed(seed)


def roll_permutation(n: int, device: torch.device | str | None = None) -> Tensor:
    """Partner of sample i is ``(i + 1) % n`` (U2PL's ``generate_unsup_data``)."""
    return (torch.arange(n, device=device) + 1) % max(n, 1)


def apply_cutmix(
    image: Tensor | None,
    label: Tensor | None,
    conf: Tensor | None,
    box_mask: Tensor,
    perm: Tensor,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Paste the box of each sample's partner: ``out[i] = where(box[i], x[perm[i]], x[i])`` for
    the image ``(B,C,H,W)``, the label ``(B,H,W)`` and the confidence ``(B,H,W)`` (any may be
    None and is returned as None). ``box_mask``: boolean ``(B,H,W)``; ``perm``: ``(B,)`` indices."""
    if box_mask.dim() != 3:
        raise ValueError(f"box_mask must be (B, H, W), got shape {tuple(box_mask.shape)}")
    m = box_mask.bool()
    perm = perm.to(m.device).long()
    if perm.shape != (m.shape[0],):
        raise ValueError(f"perm must have shape ({m.shape[0]},), got {tuple(perm.shape)}")

    def mix(x: Tensor | None, what: str, channel: bool) -> Tensor | None:
        if x is None:
            return None
        spatial = tuple(x.shape[-2:])
        if spatial != tuple(m.shape[-2:]) or x.shape[0] != m.shape[0]:
            raise ValueError(
                f"cutmix {what} of shape {tuple(x.shape)} does not match box_mask {tuple(m.shape)}"
            )
        sel = m[:, None] if channel else m
        return torch.where(sel.to(x.device), x[perm.to(x.device)], x)

    return mix(image, "image", True), mix(label, "label", False), mix(conf, "confidence", False)
