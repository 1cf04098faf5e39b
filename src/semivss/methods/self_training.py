"""Offline teacher-student self-training with unreliable pseudo-labels (PVUW 2024 winners' recipe,
step 4): the student is trained on labeled frames and on the frames of a stored pseudo-label set
(argmax + entropy of the teacher ensemble, written by ``semivss pseudo-label``).

L = L_s + unsup_weight L_u + contrastive_weight L_c: CE on the labeled frames, CE on the reliable
pseudo-labeled pixels (entropy below ``gamma`` or the lowest-entropy share of the batch), and
U2PL's contrastive loss with the unreliable pixels as negatives (student features as keys, a
per-class memory bank, negatives chosen by ``negatives: rank | argmax``).
Eq. (ST-1)..(ST-5), defaults and why the negatives are chosen this way:
docs/methods.md#72-student-fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field, model_validator
from torch import Tensor, nn

from semivss.data.requests import PseudoRequest
from semivss.errors import ConfigError
from semivss.methods.base import DataSpec, Method, seg_ce_loss
from semivss.methods.parts import (
    BankCheckpoint,
    ClassMemoryBank,
    ContrastiveSettings,
    classwise_reliability_split,
    reliability_split,
    step_generator,
    u2pl_contrastive_loss,
)
from semivss.ops import resize, resize_labels
from semivss.registry import METHODS
from semivss.sections import Section

__all__ = ["ReliableConfig", "SelfTraining", "default_gamma", "split_reliable"]


def default_gamma(num_classes: int) -> float:
    """Default entropy threshold: half the maximum entropy, ``0.5 ln C`` nats."""
    return 0.5 * math.log(max(num_classes, 2))


class ReliableConfig(Section):
    """``method.reliable``: which valid pseudo-labeled pixels are reliable (Eq. (ST-3)).

    ``threshold``: entropy < ``gamma`` nats (default ``0.5 ln C``); ``percentile``: the ``keep``
    fraction of the batch's valid pixels with the lowest entropy (default 0.8, U2PL's initial
    share), of each pseudo-labeled class separately with ``classwise`` (Eq. (CR-3))."""

    mode: Literal["threshold", "percentile"] = "threshold"
    gamma: float | None = Field(None, gt=0.0)
    keep: float = Field(0.8, ge=0.0, le=1.0)
    classwise: bool = False

    @model_validator(mode="after")
    def _one_knob(self) -> ReliableConfig:
        if self.mode == "percentile" and self.gamma is not None:
            raise ValueError("gamma applies to mode 'threshold'; mode 'percentile' uses keep")
        if self.mode == "threshold" and self.model_fields_set & {"keep", "classwise"}:
            raise ValueError("keep and classwise apply to mode 'percentile'; mode 'threshold' uses gamma")
        return self


def split_reliable(
    ent: Tensor, valid: Tensor, cfg: ReliableConfig, num_classes: int, label: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(reliable, unreliable)`` boolean masks of the shape of ``ent`` (Eq. (ST-3)):
    both are inside ``valid`` and disjoint, and together they cover it."""
    valid = valid.bool()
    if cfg.mode == "threshold":
        gamma = cfg.gamma if cfg.gamma is not None else default_gamma(num_classes)
        reliable = valid & (ent < gamma)
        return reliable, valid & ~reliable
    if cfg.classwise:
        if label is None:
            raise ValueError("reliable.classwise needs the pseudo-labels")
        return classwise_reliability_split(ent, label, 100.0 * (1.0 - cfg.keep), valid, num_classes)
    return reliability_split(ent, 100.0 * (1.0 - cfg.keep), valid)


@METHODS.register("self_training")
class SelfTraining(BankCheckpoint, Method):
    """Student fine-tuning on labeled + offline pseudo-labeled frames
    (docs/methods.md#72-student-fine-tuning)."""

    name: ClassVar[str] = "self_training"

    class Config(ContrastiveSettings):
        """``method:`` parameters (defaults: docs/methods.md#72-student-fine-tuning)."""

        unsup_weight: float = Field(1.0, ge=0.0)
        contrastive_weight: float = Field(0.1, ge=0.0)
        reliable: ReliableConfig = Field(default_factory=ReliableConfig)
        strong: bool = False
        negatives: Literal["rank", "argmax"] = "rank"
        memory_size: int = Field(5000, ge=1)

    cfg: Config

    def __init__(
        self, cfg: BaseModel | Mapping[str, Any] | None, num_classes: int, ignore_index: int = 255
    ) -> None:
        super().__init__(cfg, num_classes, ignore_index)
        c = self.cfg
        if c.contrastive_weight > 0 and c.negatives == "rank" and c.low_rank >= num_classes:
            raise ConfigError(
                f"method.low_rank ({c.low_rank}) must be smaller than the number of classes "
                f"({num_classes}) with negatives: rank, or no pixel is ever a negative; "
                "lower it or use negatives: argmax"
            )
        self.bank = ClassMemoryBank(num_classes, None, c.memory_size)

    def data_spec(self) -> DataSpec:
        """Labeled frames plus frames of the pseudo-label set (``batch["pseudo"]``)."""
        return DataSpec.of(PseudoRequest(strong=self.cfg.strong))

    def split(self, ent: Tensor, valid: Tensor, label: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Reliable / unreliable masks of a pseudo-labeled batch (:func:`split_reliable`)."""
        return split_reliable(ent, valid, self.cfg.reliable, self.num_classes, label)

    def training_step(
        self, models: nn.ModuleDict, batch: dict[str, Any], step: int, max_steps: int
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        if "pseudo" not in batch:
            raise ConfigError(
                "method 'self_training' needs pseudo-labeled frames: set data.pseudo_labels to a "
                "set written by `semivss pseudo-label`"
            )
        pseudo = batch["pseudo"]
        x_l, y_l = batch["labeled"].image, batch["labeled"].label
        if cfg.strong and not pseudo.strong:
            raise ConfigError("method 'self_training' with strong: true needs PseudoBatch.strong")
        x_p, y_p = (pseudo.strong[0] if cfg.strong else pseudo.image), pseudo.label
        valid = pseudo.valid.bool() & (y_p != self.ignore_index)
        if tuple(x_l.shape[-2:]) != tuple(x_p.shape[-2:]):
            raise ConfigError(
                f"labeled crops {tuple(x_l.shape[-2:])} and pseudo-labeled crops "
                f"{tuple(x_p.shape[-2:])} differ in size; they share data.crop_size"
            )
        n_l = x_l.shape[0]

        out = models["model"](torch.cat([x_l, x_p]))
        logits = out["logits"]
        feats = out["rep"] if "rep" in out else out["feature"]
        loss_sup = seg_ce_loss(logits[:n_l], y_l, self.ignore_index)

        with torch.no_grad():
            reliable, unreliable = self.split(pseudo.entropy, valid, y_p)
        target = y_p.masked_fill(~reliable, self.ignore_index)
        loss_unsup = seg_ce_loss(logits[n_l:], target, self.ignore_index)

        if cfg.contrastive_weight > 0:
            loss_con = self.contrastive(feats, logits, y_l, y_p, reliable, unreliable)
        else:
            loss_con = feats.sum() * 0.0  # keeps a representation head in the graph (DDP)

        loss = loss_sup + cfg.unsup_weight * loss_unsup + cfg.contrastive_weight * loss_con
        n_valid = valid.sum().clamp(min=1).float()
        return {
            "loss": loss,
            "loss_sup": loss_sup.detach(),
            "loss_unsup": loss_unsup.detach(),
            "loss_contra": loss_con.detach(),
            "reliable_ratio": (reliable.sum().float() / n_valid).detach(),
        }

    def contrastive_inputs(
        self, size: tuple[int, int], logits: Tensor, y_l: Tensor, y_p: Tensor, reliable: Tensor, unreliable: Tensor
    ) -> dict[str, Any]:
        """Arguments of :func:`u2pl_contrastive_loss` at feature resolution ``size``
        (docs/methods.md#72-student-fine-tuning): student probabilities, labels (ground truth, then pseudo-labels),
        anchor / negative candidate masks, which samples are labeled, and the rank window."""
        n_l = y_l.shape[0]
        with torch.no_grad():
            prob = resize(torch.softmax(logits.detach().float(), dim=1), size)
            label = torch.cat([resize_labels(y_l, size), resize_labels(y_p, size)])
            ones_l = torch.ones((n_l, *size), dtype=torch.bool, device=logits.device)
            anchor = torch.cat([ones_l, resize_labels(reliable, size)])
            negative = torch.cat([ones_l if self.cfg.negatives == "rank" else ~ones_l,
                                  resize_labels(unreliable, size)])
            is_labeled = torch.arange(label.shape[0], device=logits.device) < n_l
        if self.cfg.negatives == "rank":
            low, high = self.cfg.low_rank, self.cfg.high_rank
        else:  # every class but the pseudo-label (the part excludes label == c); labeled: none
            low, high = 0, self.num_classes
        return {
            "prob": prob,
            "label": label,
            "anchor_mask": anchor,
            "negative_mask": negative,
            "is_labeled": is_labeled,
            "low_rank": low,
            "high_rank": high,
        }

    def contrastive(
        self, feats: Tensor, logits: Tensor, y_l: Tensor, y_p: Tensor, reliable: Tensor, unreliable: Tensor
    ) -> Tensor:
        """L_c (Eq. 6) with the student's own detached features as keys; pushes this batch's
        negatives into the memory bank."""
        cfg = self.cfg
        size = (int(feats.shape[-2]), int(feats.shape[-1]))
        args = self.contrastive_inputs(size, logits, y_l, y_p, reliable, unreliable)
        return u2pl_contrastive_loss(
            feats,
            feats,
            args["prob"],
            args["label"],
            args["anchor_mask"],
            args["negative_mask"],
            args["is_labeled"],
            self.bank,
            num_anchors=cfg.num_anchors,
            num_negatives=cfg.num_negatives,
            temperature=cfg.temperature,
            anchor_threshold=cfg.anchor_threshold,
            low_rank=args["low_rank"],
            high_rank=args["high_rank"],
            ignore_index=self.ignore_index,
            generator=step_generator(),  # CPU generator, seeded from the global RNG (exact resume)
        )
