"""Optical flow for video models (docs/methods.md#14-accel): estimators and score-map warping.

Convention: ``flow = estimator(current, previous)`` is the *backward* flow of ``current``: for
each pixel x of the current frame, ``previous(x + flow(x)) ~ current(x)`` (in pixels of the
inputs, channel 0 = horizontal, 1 = vertical). :func:`warp` carries a map of the previous frame
to the current one with it (Eq. (ACC-1)). A learned flow network plugs in through
:class:`TorchFlow`; :class:`DISFlow` (OpenCV's DIS) needs no training.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semivss.data.transforms import MEAN, STD
from semivss.errors import ConfigError

__all__ = ["DIS_PRESETS", "DISFlow", "FlowEstimator", "TorchFlow", "build_flow", "compose_flows", "invalid_share",
           "resize_flow", "to_pixels", "warp"]

#: OpenCV DIS presets by name (speed vs accuracy)
DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}

_MEAN = torch.tensor(MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(STD).view(1, 3, 1, 1)


def to_pixels(images: Tensor) -> Tensor:
    """Normalised images (B,3,H,W) (ImageNet mean/std on the 0..255 scale) back to 0..255 RGB."""
    return (images.float() * _STD.to(images.device) + _MEAN.to(images.device)).clamp(0, 255)


@runtime_checkable
class FlowEstimator(Protocol):
    """``(current, previous) -> flow``: images (B,3,H,W) normalised as the segmentation input,
    flow (B,2,H,W) float32 on the images' device, the backward flow of ``current`` in pixels."""

    def __call__(self, current: Tensor, previous: Tensor) -> Tensor: ...


class DISFlow:
    """OpenCV's Dense Inverse Search flow (Kroeger et al., ECCV 2016) on grey frames, no training.

    Runs on the CPU (frames on another device are copied there and the flow copied back).
    ``preset``: ``ultrafast`` | ``fast`` | ``medium`` (:data:`DIS_PRESETS`). ``scale`` < 1 runs
    DIS on frames shrunk by that factor (area interpolation) and returns the flow resampled to
    the input size with its vectors in input pixels: about ``1/scale**2`` times cheaper, and
    enough for carrying a score map of output stride 4 or more (name ``dis-fast@0.5``).
    """

    def __init__(self, preset: str = "fast", scale: float = 1.0) -> None:
        if preset not in DIS_PRESETS:
            raise ConfigError(f"unknown DIS preset {preset!r}; available: {', '.join(DIS_PRESETS)}")
        if not 0.1 <= scale <= 1.0:
            raise ConfigError(f"DIS flow scale must be in [0.1, 1], got {scale:g}")
        self.preset = preset
        self.scale = float(scale)
        self.name = f"dis-{preset}" + (f"@{scale:g}" if scale != 1.0 else "")
        self._dis = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])

    def _grey(self, images: Tensor) -> list[np.ndarray]:
        rgb = to_pixels(images.detach()).to("cpu")
        grey = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).round().to(torch.uint8).numpy()
        if self.scale == 1.0:
            return [np.ascontiguousarray(g) for g in grey]
        h, w = grey.shape[-2:]
        size = (max(1, round(w * self.scale)), max(1, round(h * self.scale)))  # cv2: (width, height)
        return [cv2.resize(g, size, interpolation=cv2.INTER_AREA) for g in grey]

    def __call__(self, current: Tensor, previous: Tensor) -> Tensor:
        if current.shape != previous.shape:
            raise ValueError(f"flow needs frames of one size, got {tuple(current.shape)} and {tuple(previous.shape)}")
        flows = [self._dis.calc(c, p, None) for c, p in zip(self._grey(current), self._grey(previous))]
        out = torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).contiguous()
        return resize_flow(out, current.shape[-2:]).to(current.device, torch.float32)


class TorchFlow(nn.Module):
    """A learned flow network as a :class:`FlowEstimator`.

    ``net(current, previous)`` gets 0..255 RGB frames (B,3,H,W) (``scale_input``: divided by 255)
    and returns a flow (B,2,h,w) in pixels of its own output grid (RAFT and FlowNet return the
    backward flow in this form when called as ``net(current, previous)``); it is resized to the
    input size and rescaled. Wrap a local checkpoint, e.g. RAFT:
    ``TorchFlow(raft_module, scale_input=False)`` after loading its weights yourself.
    """

    def __init__(self, net: nn.Module, scale_input: bool = True) -> None:
        super().__init__()
        self.net = net
        self.scale_input = scale_input

    def forward(self, current: Tensor, previous: Tensor) -> Tensor:
        cur, prev = to_pixels(current), to_pixels(previous)
        if self.scale_input:
            cur, prev = cur / 255.0, prev / 255.0
        flow = self.net(cur, prev)
        if isinstance(flow, (list, tuple)):  # RAFT returns its refinements; the last is the finest
            flow = flow[-1]
        return resize_flow(flow.float(), current.shape[-2:])


def resize_flow(flow: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """A flow field (B,2,h,w) in pixels of its grid, resampled to ``size`` with its vectors
    rescaled to the new grid's pixels."""
    h, w = flow.shape[-2:]
    H, W = int(size[0]), int(size[1])
    if (h, w) == (H, W):
        return flow
    out = F.interpolate(flow, size=(H, W), mode="bilinear", align_corners=False)
    scale = torch.tensor([W / w, H / h], device=flow.device, dtype=flow.dtype).view(1, 2, 1, 1)
    return out * scale


def _sources(flow: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Source coordinates (x + flow_x, y + flow_y) (B,h,w) in pixels of an (h, w) grid."""
    flow = resize_flow(flow.float(), (h, w))
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device, dtype=torch.float32),
                            torch.arange(w, device=flow.device, dtype=torch.float32), indexing="ij")
    return xs + flow[:, 0], ys + flow[:, 1]


def invalid_share(flow: Tensor) -> Tensor:
    """(B,) share of pixels whose flow source lies outside the previous frame."""
    h, w = flow.shape[-2:]
    sx, sy = _sources(flow, h, w)
    outside = (sx < -0.5) | (sx > w - 0.5) | (sy < -0.5) | (sy > h - 0.5)
    return outside.flatten(1).float().mean(1)


def warp(score: Tensor, flow: Tensor) -> tuple[Tensor, Tensor]:
    """Carry ``score`` (B,C,h,w) of the previous frame to the current frame (Eq. (ACC-1)):
    ``out(x) = score(x + flow(x))``, bilinear, border padding, with ``flow`` (B,2,H,W) the
    current frame's backward flow at any resolution (resampled and rescaled to (h, w)).

    Returns ``(warped, invalid)``: ``invalid`` (B,) is the share of pixels whose source lies
    outside the previous frame (filled from its border).
    """
    h, w = score.shape[-2:]
    sx, sy = _sources(flow, h, w)
    outside = (sx < -0.5) | (sx > w - 0.5) | (sy < -0.5) | (sy > h - 0.5)
    # pixel centres -> [-1, 1] for align_corners=False
    grid = torch.stack([(2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1], dim=-1)
    warped = F.grid_sample(score.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return warped.to(score.dtype), outside.flatten(1).float().mean(1)


def compose_flows(older: Tensor, flow: Tensor) -> Tensor:
    """The backward flow of the current frame to an earlier frame, from ``flow`` (current ->
    previous) and ``older`` (previous -> earlier), both (B,2,H,W) on one grid:
    ``flow(x) + older(x + flow(x))``, ``older`` sampled bilinearly with border padding.

    Warping a map of the earlier frame once through the composed flow interpolates it once,
    where warping it frame by frame (Eq. (ACC-1) applied k times) blurs it k times."""
    if older.shape != flow.shape:
        raise ValueError(f"flows of one shape needed, got {tuple(older.shape)} and {tuple(flow.shape)}")
    return flow.float() + warp(older.float(), flow)[0]


def build_flow(name: str) -> FlowEstimator:
    """A flow estimator by name: ``dis-ultrafast`` | ``dis-fast`` | ``dis-medium``, optionally
    with ``@SCALE`` (e.g. ``dis-fast@0.5``: DIS on frames shrunk by SCALE, see :class:`DISFlow`)."""
    base, at, scale = name.partition("@")
    if base.startswith("dis-") and base[4:] in DIS_PRESETS:
        try:
            factor = float(scale) if at else 1.0
        except ValueError:
            raise ConfigError(f"flow {name!r}: the scale after '@' must be a number, e.g. dis-fast@0.5") from None
        return DISFlow(base[4:], factor)
    raise ConfigError(f"unknown flow {name!r}; available: {', '.join('dis-' + p for p in DIS_PRESETS)}, "
                      "each optionally @SCALE, e.g. dis-fast@0.5 (a learned network: wrap it in "
                      "semivss.models.flow.TorchFlow)")
