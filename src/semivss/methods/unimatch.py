"""UniMatch (V1): weak-to-strong consistency with a feature-perturbation stream and two strong
views (Yang et al., CVPR 2023; official code LiheYoung/UniMatch ``unimatch.py``).

One network, no EMA teacher. Confident pixels of the weak view's prediction supervise two
CutMix strong views and a feature-dropout stream of the weak view; the dropout is injected by a
temporary forward hook on the model's ``encoder``, so the forward still runs through the
(possibly DDP-wrapped) model. Padded pixels get no loss.
Eq. (UM-1)..(UM-4), official weights and the differences from the official code:
docs/methods.md#6-unimatch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from semivss.data.requests import UnlabeledRequest
from semivss.errors import ConfigError
from semivss.methods.base import DataSpec, Method, seg_ce_loss, unwrap
from semivss.methods.parts import (
    ThresholdCheckpoint,
    apply_cutmix,
    batch_cutmix_boxes,
    confidence_weights,
    roll_permutation,
    step_generator,
    weighted_ce,
)
from semivss.ops import resize
from semivss.registry import METHODS
from semivss.sections import Section

__all__ = ["UniMatch", "confident_ce", "feature_dropout"]


@contextmanager
def feature_dropout(model: nn.Module, p: float, start: int = 0) -> Iterator[None]:
    """Within the block, ``model``'s encoder output ``(low, high)`` of batch size B becomes
    ``(cat(low, dropout2d(low[start:])), cat(high, dropout2d(high[start:])))``: the decoder and
    classifier then also see the feature-perturbed copies of samples ``start..B-1`` (appended at
    the end of the batch). Needs a public ``encoder`` submodule returning two feature maps."""
    encoder = getattr(unwrap(model), "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ConfigError(
            "method 'unimatch' needs a model with an 'encoder' submodule returning (low, high) "
            "feature maps (semivss SegModel) for its feature-perturbation stream"
        )

    def hook(module: nn.Module, inputs: Any, output: Any) -> tuple[Tensor, Tensor]:
        if not isinstance(output, (tuple, list)) or len(output) != 2:
            raise ConfigError(
                "method 'unimatch': the model's encoder must return (low, high) feature maps, got "
                f"{type(output).__name__}"
            )
        low, high = output
        return (
            torch.cat([low, F.dropout2d(low[start:], p, training=True)]),
            torch.cat([high, F.dropout2d(high[start:], p, training=True)]),
        )

    handle = encoder.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def confident_ce(logits: Tensor, target: Tensor, conf: Tensor, threshold: float, valid: Tensor) -> Tensor:
    """UniMatch unlabeled loss (official ``unimatch.py``, Eq. (UM-3)): CE on the valid pixels with
    ``conf >= threshold``, summed and divided by the number of valid pixels (at least 1)."""
    valid = valid.bool()
    return weighted_ce(logits, target, None, (conf >= threshold) & valid, valid.sum())


def _mask_ratio(keep: Tensor, valid: Tensor) -> Tensor:
    """Share of the valid pixels whose confidence passes the threshold (official ``mask_ratio``)."""
    return (keep & valid).sum().float() / valid.sum().clamp(min=1).float()


@METHODS.register("unimatch")
class UniMatch(ThresholdCheckpoint, Method):
    """FixMatch-style weak-to-strong training with a feature-perturbation stream (UniMatch V1)."""

    name: ClassVar[str] = "unimatch"

    class Config(Section):
        """``method:`` parameters of UniMatch (defaults: official Pascal config,
        docs/methods.md#6-unimatch)."""

        conf_thresh: float = Field(0.95, ge=0.0, le=1.0)
        fp_dropout: float = Field(0.5, ge=0.0, lt=1.0)
        sup_weight: float = Field(0.5, ge=0.0)
        unsup_weight: float = Field(0.5, ge=0.0)
        weight_s1: float = Field(0.25, ge=0.0)
        weight_s2: float = Field(0.25, ge=0.0)
        weight_fp: float = Field(0.5, ge=0.0)
        cutmix_p: float = Field(0.5, ge=0.0, le=1.0)
        cutmix_area: tuple[float, float] = (0.02, 0.4)
        cutmix_ratio: tuple[float, float] = (0.3, 1.0 / 0.3)
        # class-aware reliability (docs/methods.md#11-class-aware-reliability); the defaults are
        # the official fixed threshold and unweighted loss
        threshold: Literal["fixed", "freematch", "flexmatch"] = "fixed"
        threshold_momentum: float = Field(0.999, ge=0.0, lt=1.0)
        conf_weight_gamma: float = Field(0.0, ge=0.0)

        @field_validator("cutmix_area", "cutmix_ratio")
        @classmethod
        def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
            if not 0.0 < v[0] <= v[1]:
                raise ValueError(f"must be (low, high) with 0 < low <= high, got {v}")
            return v

        @field_validator("cutmix_area")
        @classmethod
        def _area(cls, v: tuple[float, float]) -> tuple[float, float]:
            if v[1] > 1.0:
                raise ValueError(f"area fractions must be <= 1, got {v}")
            return v

    cfg: Config

    def data_spec(self) -> DataSpec:
        """One unlabeled frame per sample with two strong copies (``UnlabeledBatch.strong``)."""
        return DataSpec.of(UnlabeledRequest(frames=1, strong_copies=2))

    def training_step(
        self, models: nn.ModuleDict, batch: dict[str, Any], step: int, max_steps: int
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        model = models["model"]
        x_l, y_l = batch["labeled"].image, batch["labeled"].label
        unl = batch["unlabeled"]
        if len(unl.strong) < 2:
            raise ConfigError(
                "method 'unimatch' needs two strong copies of each unlabeled frame "
                f"(UnlabeledBatch.strong has {len(unl.strong)})"
            )
        x_w, s1, s2 = unl.image[:, 0], unl.strong[0][:, 0], unl.strong[1][:, 0]
        valid = unl.frame_valid(0)
        n_l, n_u = x_l.shape[0], x_w.shape[0]
        size = (int(x_w.shape[-2]), int(x_w.shape[-1]))
        dev = x_w.device

        gen = step_generator()
        box1 = batch_cutmix_boxes(n_u, *size, cfg.cutmix_p, cfg.cutmix_area, cfg.cutmix_ratio, gen, dev)
        box2 = batch_cutmix_boxes(n_u, *size, cfg.cutmix_p, cfg.cutmix_area, cfg.cutmix_ratio, gen, dev)
        perm = roll_permutation(n_u, dev)
        with torch.no_grad():
            s1 = apply_cutmix(s1, None, None, box1, perm)[0]  # type: ignore[assignment]
            s2 = apply_cutmix(s2, None, None, box2, perm)[0]  # type: ignore[assignment]

        with feature_dropout(model, cfg.fp_dropout, start=n_l):
            logits = model(torch.cat([x_l, x_w]))["logits"]
        if logits.shape[0] != n_l + 2 * n_u:
            raise ConfigError(
                "method 'unimatch': the feature-perturbation hook had no effect; the model's "
                "forward must feed encoder(x) to its decoder"
            )
        pred_x, pred_w, pred_fp = logits.split([n_l, n_u, n_u])
        pred_s1, pred_s2 = model(torch.cat([s1, s2]))["logits"].chunk(2)  # type: ignore[list-item]

        with torch.no_grad():
            prob = torch.softmax(resize(pred_w.detach().float(), size), dim=1)
            conf, mask = prob.max(dim=1)
            self.thresholds.update(prob, valid)
            keep = self.thresholds.mask(conf, mask)
            _, mask1, conf1 = apply_cutmix(None, mask, conf, box1, perm)
            _, mask2, conf2 = apply_cutmix(None, mask, conf, box2, perm)
            # a pasted padded region stays invalid; the keep mask travels with its pixels
            valid1, keep1 = (apply_cutmix(None, m, None, box1, perm)[1] for m in (valid, keep))
            valid2, keep2 = (apply_cutmix(None, m, None, box2, perm)[1] for m in (valid, keep))
            gamma = cfg.conf_weight_gamma
            w, w1, w2 = ((confidence_weights(c, gamma) if gamma else None) for c in (conf, conf1, conf2))

        loss_x = seg_ce_loss(pred_x, y_l, self.ignore_index)
        # Eq. (UM-3): kept valid pixels, divided by each stream's valid pixels
        loss_s1 = weighted_ce(pred_s1, mask1, w1, keep1 & valid1, valid1.sum())  # type: ignore[arg-type]
        loss_s2 = weighted_ce(pred_s2, mask2, w2, keep2 & valid2, valid2.sum())  # type: ignore[arg-type]
        loss_fp = weighted_ce(pred_fp, mask, w, keep & valid, valid.sum())
        loss_u = cfg.weight_s1 * loss_s1 + cfg.weight_s2 * loss_s2 + cfg.weight_fp * loss_fp
        loss = cfg.sup_weight * loss_x + cfg.unsup_weight * loss_u
        return {
            "loss": loss,
            "loss_sup": loss_x.detach(),
            "loss_s": ((loss_s1 + loss_s2) / 2).detach(),
            "loss_fp": loss_fp.detach(),
            "mask_ratio": _mask_ratio(keep, valid),
        }
