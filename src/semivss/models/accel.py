"""Accel (Jain, Wang and Gonzalez, CVPR 2019): a video model of two per-frame segmentation
networks and optical flow (docs/methods.md#14-accel).

The *reference* branch (the accurate network) runs on key frames; its score map is carried to
every following frame by warping it through the consecutive optical flows (Eq. (ACC-1)). The
*update* branch (a cheaper network, e.g. the same one at a lower input scale) runs on every
frame. A 1x1 convolution fuses the two score maps (Eq. (ACC-2)); it starts as the identity on the
reference half, so an untrained Accel is pure flow propagation of the reference (Deep Feature
Flow on score maps). :class:`KeyframePredictor` (semivss.inference.keyframes) runs it on videos.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from semivss.errors import ConfigError
from semivss.models.flow import FlowEstimator, warp
from semivss.ops import resize

__all__ = ["AccelNet", "build_accel"]


def _logits(net: nn.Module, x: Tensor) -> Tensor:
    out = net(x)
    return (out["logits"] if isinstance(out, dict) else out).float()


class AccelNet(nn.Module):
    """Reference + update branches and the fusion conv (Eq. (ACC-2)).

    ``update`` may be None (warping only). ``update_scale``: the update branch's input is the
    frame resized by this factor. ``keyframe_interval`` / ``flow``: the defaults its
    :meth:`as_video_predictor` uses (the CLI's ``--keyframe-interval`` / ``--flow`` override them).
    Called on frames (B,3,H,W) it is the per-frame model with every frame a key frame (K = 1):
    ``{"logits": fuse(reference(x), update(x))}`` at the reference's score resolution.
    """

    def __init__(
        self,
        reference: nn.Module,
        update: nn.Module | None,
        num_classes: int,
        update_scale: float = 1.0,
        keyframe_interval: int = 5,
        flow: str = "dis-fast",
    ) -> None:
        super().__init__()
        if not 0.0 < update_scale <= 4.0:
            raise ConfigError(f"accel update_scale must be in (0, 4], got {update_scale}")
        if keyframe_interval < 1:
            raise ConfigError(f"keyframe interval must be >= 1, got {keyframe_interval}")
        self.reference = reference
        self.update = update
        self.num_classes = int(num_classes)
        self.update_scale = float(update_scale)
        self.keyframe_interval = int(keyframe_interval)
        self.flow = flow
        self.fusion = nn.Conv2d(2 * num_classes, num_classes, kernel_size=1)
        self.reset_fusion()

    def reset_fusion(self) -> None:
        """Fusion = identity on the reference half, zero on the update half, zero bias: an
        untrained Accel outputs the (warped) reference score map."""
        with torch.no_grad():
            self.fusion.weight.zero_()
            self.fusion.bias.zero_()
            c = self.num_classes
            self.fusion.weight[:, :c, 0, 0] = torch.eye(c)

    def reference_scores(self, x: Tensor) -> Tensor:
        """Reference logits (B,C,h,w) at the reference's own output stride, float32."""
        return _logits(self.reference, x)

    def update_scores(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """Update-branch logits on ``x`` resized by ``update_scale``, resampled to ``size``."""
        if self.update is None:
            raise ConfigError("this Accel model has no update branch")
        if self.update_scale != 1.0:
            h, w = x.shape[-2:]
            x = resize(x, (max(1, round(h * self.update_scale)), max(1, round(w * self.update_scale))))
        return resize(_logits(self.update, x), tuple(size))

    def fuse(self, reference: Tensor, update: Tensor | None) -> Tensor:
        """Eq. (ACC-2): ``fusion(concat(reference, update))``; the reference alone without an
        update branch."""
        if update is None:
            return reference
        return self.fusion(torch.cat([reference, update.to(reference.dtype)], dim=1).to(self.fusion.weight.dtype))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        ref = self.reference_scores(x)
        upd = self.update_scores(x, ref.shape[-2:]) if self.update is not None else None
        return {"logits": self.fuse(ref, upd)}

    def clip_logits(self, frames: Tensor, flow: FlowEstimator) -> Tensor:
        """Training forward on clips (B,T,3,H,W): the reference on frame 0, its scores warped
        through the T-1 consecutive flows (Eq. (ACC-1)), fused with the update branch on the
        last frame (Eq. (ACC-2)). Flow and branches carry no gradient when frozen."""
        if frames.ndim != 5:
            raise ValueError(f"clips must be (B, T, 3, H, W), got {tuple(frames.shape)}")
        score = self.reference_scores(frames[:, 0])
        for t in range(1, frames.shape[1]):
            with torch.no_grad():
                f = flow(frames[:, t], frames[:, t - 1])
            score, _ = warp(score, f)
        last = frames[:, -1]
        upd = self.update_scores(last, score.shape[-2:]) if self.update is not None else None
        return self.fuse(score, upd)

    def as_video_predictor(self, cfg: Any) -> Any:
        """The key-frame predictor with this model's default interval and flow (used by
        ``as_predictor``)."""
        from semivss.inference.keyframes import KeyframePredictor
        from semivss.models.flow import build_flow

        return KeyframePredictor(self, cfg, build_flow(self.flow), self.keyframe_interval)

    def record(self, reference_model: Mapping[str, Any], update_model: Mapping[str, Any] | None) -> dict[str, Any]:
        """The architecture record stored with the weights (``ExportSpec.arch``): the branches'
        model configs and this model's settings, enough for :func:`build_accel`."""
        return {
            "kind": "accel",
            "reference": dict(reference_model),
            "update": dict(update_model) if update_model is not None else None,
            "update_scale": self.update_scale,
            "keyframe_interval": self.keyframe_interval,
            "flow": self.flow,
        }


def build_accel(record: Mapping[str, Any], num_classes: int) -> AccelNet:
    """An (untrained) :class:`AccelNet` from its architecture record (:meth:`AccelNet.record`);
    load its state dict afterwards."""
    from semivss.models import build_model
    from semivss.models.config import ModelConfig

    def branch(cfg: Mapping[str, Any] | None) -> nn.Module | None:
        if cfg is None:
            return None
        return build_model(ModelConfig(**{**cfg, "pretrained": None, "init_from": None}), num_classes)

    try:
        return AccelNet(branch(record["reference"]), branch(record.get("update")), num_classes,
                        update_scale=float(record.get("update_scale", 1.0)),
                        keyframe_interval=int(record.get("keyframe_interval", 5)),
                        flow=str(record.get("flow", "dis-fast")))
    except KeyError as exc:
        raise ConfigError(f"accel record lacks {exc}") from None
