"""Class-aware reliability of pseudo-labels (docs/methods.md#11-class-aware-reliability).

Rare classes get lower confidence than frequent ones, so one global threshold or one batch-wide
entropy percentile filters them out first. Three remedies, each an option of the pseudo-label
methods: class-wise adaptive confidence thresholds estimated from the teacher's statistics
(FreeMatch's self-adaptive threshold, Eq. (CR-1); FlexMatch's curriculum, Eq. (CR-2)), entropy
percentiles taken per predicted class (Eq. (CR-3)) and a confidence-weighted loss (Eq. (CR-4)).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from semivss.methods.parts.reliability import entropy_rank_mask
from semivss.ops import resize

__all__ = ["ClasswiseThreshold", "ThresholdCheckpoint", "classwise_reliability_split", "confidence_weights", "weighted_ce"]

ThresholdMode = Literal["fixed", "freematch", "flexmatch"]


class ClasswiseThreshold:
    """Per-class confidence thresholds from running statistics of the teacher's predictions.

    ``fixed``: ``tau`` for every class. ``freematch`` (Eq. CR-1): a global level ``g`` = EMA of
    the mean max-probability and a class profile ``p~`` = EMA of the mean probability vector over
    valid pixels (both start at 1/C); ``T(c) = g * p~(c) / max p~``. ``flexmatch`` (Eq. CR-2):
    ``s(c)`` = EMA of the share of valid pixels predicted ``c`` with confidence above ``tau``,
    ``u`` = EMA of the share below it (threshold warm-up); ``b(c) = s(c) / max(max s, u)`` and
    ``T(c) = tau * b(c) / (2 - b(c))``. ``momentum`` is the EMA decay (FreeMatch: 0.999).
    """

    def __init__(self, num_classes: int, mode: ThresholdMode = "fixed", tau: float = 0.95,
                 momentum: float = 0.999) -> None:
        if mode not in ("fixed", "freematch", "flexmatch"):
            raise ValueError(f"unknown threshold mode {mode!r}")
        self.num_classes, self.mode, self.tau, self.momentum = num_classes, mode, float(tau), float(momentum)
        c = num_classes
        self.level = torch.tensor(1.0 / c, dtype=torch.float64)
        self.profile = torch.full((c,), 1.0 / c, dtype=torch.float64)
        self.selected = torch.zeros(c, dtype=torch.float64)
        self.unused = torch.tensor(1.0, dtype=torch.float64)

    @torch.no_grad()
    def update(self, prob: Tensor, valid: Tensor) -> None:
        """Fold a batch of teacher probabilities (B,C,H,W) over its valid pixels (B,H,W) into the
        statistics (no-op for ``fixed`` or a batch without valid pixels)."""
        if self.mode == "fixed":
            return
        p = prob.detach().double().permute(0, 2, 3, 1)[valid.bool()].cpu()  # (N, C)
        if p.shape[0] == 0:
            return
        m = self.momentum
        conf, pred = p.max(dim=1)
        if self.mode == "freematch":
            self.level = m * self.level + (1 - m) * conf.mean()
            self.profile = m * self.profile + (1 - m) * p.mean(dim=0)
        else:
            sure = conf > self.tau
            share = torch.bincount(pred[sure], minlength=self.num_classes).double() / p.shape[0]
            self.selected = m * self.selected + (1 - m) * share
            self.unused = m * self.unused + (1 - m) * (~sure).double().mean()

    def thresholds(self) -> Tensor:
        """The current per-class thresholds (C,) float64."""
        if self.mode == "fixed":
            return torch.full((self.num_classes,), self.tau, dtype=torch.float64)
        if self.mode == "freematch":
            return self.level * self.profile / self.profile.max()
        beta = self.selected / torch.maximum(self.selected.max(), self.unused).clamp(min=1e-12)
        return self.tau * beta / (2.0 - beta)

    def mask(self, conf: Tensor, pred: Tensor) -> Tensor:
        """Pixels whose confidence reaches the threshold of their predicted class."""
        thr = self.thresholds().to(device=conf.device, dtype=torch.float32)
        return conf >= thr[pred]

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.level.clone(), "profile": self.profile.clone(),
                "selected": self.selected.clone(), "unused": self.unused.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("level", "profile", "selected", "unused"):
            if key in state:
                setattr(self, key, torch.as_tensor(state[key], dtype=torch.float64).clone())


def classwise_reliability_split(ent: Tensor, pred: Tensor, alpha_percent: float, valid: Tensor,
                                num_classes: int) -> tuple[Tensor, Tensor]:
    """``(reliable, unreliable)``: within each predicted class, the ``alpha_percent`` % highest-
    entropy valid pixels of the batch are unreliable (Eq. CR-3), so a rare class keeps the same
    share of its pixels as a frequent one."""
    unreliable = torch.zeros_like(valid, dtype=torch.bool)
    valid = valid.bool()
    for c in range(num_classes):
        in_c = valid & (pred == c)
        if in_c.any():
            unreliable |= entropy_rank_mask(ent, alpha_percent, in_c, highest=True)
    return valid & ~unreliable, unreliable


def confidence_weights(conf: Tensor, gamma: float) -> Tensor:
    """Per-pixel loss weights ``conf ** gamma`` (Eq. CR-4; gamma 0 = every pixel weight 1)."""
    if gamma == 0:
        return torch.ones_like(conf, dtype=torch.float32)
    return conf.detach().float().clamp(min=0.0) ** gamma


def weighted_ce(logits: Tensor, target: Tensor, weight: Tensor | None, keep: Tensor,
                denominator: Tensor, ignore_index: int = 255) -> Tensor:
    """``sum_(kept pixels) w * CE / denominator``: the cross-entropy of ``logits`` (upsampled to
    the target size) against ``target`` on the ``keep`` pixels, each weighted by ``weight``
    (None: weight 1)."""
    ce = F.cross_entropy(resize(logits, target.shape[-2:]).float(), target, ignore_index=ignore_index,
                         reduction="none")
    kept = keep.to(ce.device).bool().to(ce.dtype)
    if weight is not None:
        kept = kept * weight
    return (ce * kept).sum() / denominator.clamp(min=1).to(ce.dtype)


class ThresholdCheckpoint:
    """Method mixin: ``self.thresholds``, a :class:`ClasswiseThreshold` built from the config keys
    ``threshold``, ``conf_thresh`` and ``threshold_momentum``, checkpointed as the method state
    when adaptive (exact resume)."""

    cfg: Any

    def __init__(self, cfg: Any, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(cfg, num_classes, ignore_index)  # type: ignore[call-arg]
        c = self.cfg
        self.thresholds = ClasswiseThreshold(num_classes, c.threshold, c.conf_thresh, c.threshold_momentum)

    def state_dict(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds.state_dict()} if self.cfg.threshold != "fixed" else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "thresholds" in state:
            self.thresholds.load_state_dict(state["thresholds"])
