"""Supervised baseline (docs/methods.md#2-supervised-baseline): cross-entropy on the labeled
frames only."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from semivss.methods.base import Method, seg_ce_loss
from semivss.registry import METHODS


@METHODS.register("supervised")
class Supervised(Method):
    """``L = CE(upsample(logits), label)`` with ignore index 255; unlabeled data is never used."""

    name: ClassVar[str] = "supervised"

    def training_step(
        self, models: nn.ModuleDict, batch: dict[str, Any], step: int, max_steps: int
    ) -> dict[str, Tensor]:
        labeled = batch["labeled"]
        out = models["model"](labeled.image)
        loss = seg_ce_loss(out["logits"], labeled.label, self.ignore_index)
        return {"loss": loss, "loss_sup": loss}
