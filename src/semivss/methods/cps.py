"""CPS: cross pseudo supervision (Chen et al., CVPR 2021; official code charlesCXK/TorchSemiSeg
``exp.city/*.CPS+CutMix/train.py``).

Two networks of the same architecture with differently initialised heads are trained together:
CE on the labeled frames, and each network learns the other's one-hot pseudo-label of a
CutMix-mixed unlabeled image (without CutMix: of the labeled and unlabeled images). Padded
pixels get no pseudo-label. Eq. (CPS-1)..(CPS-2), the loss weight and the differences from the
official code: docs/methods.md#5-cps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from semivss.data.requests import UnlabeledRequest
from semivss.methods.base import DataSpec, Method, seg_ce_loss
from semivss.methods.parts import (
    ThresholdCheckpoint,
    apply_cutmix,
    box_mix_mask,
    confidence_weights,
    ignore_invalid,
    roll_permutation,
    step_generator,
    weighted_ce,
)
from semivss.models.ensemble import ExportSpec, ProbAverage
from semivss.ops import resize
from semivss.registry import METHODS
from semivss.sections import Section

__all__ = ["CPS", "ProbAverage"]


def _up(logits: Tensor, size: tuple[int, int]) -> Tensor:
    return resize(logits.float(), size)


def cps_pseudo_label(logits: Tensor) -> Tensor:
    """One-hot (argmax) pseudo-label of ``logits`` (B,C,H,W) -> (B,H,W) int64."""
    return logits.argmax(dim=1)


@METHODS.register("cps")
class CPS(ThresholdCheckpoint, Method):
    """Two networks supervising each other with hard pseudo-labels (+ CutMix)."""

    name: ClassVar[str] = "cps"

    class Config(Section):
        """``method:`` parameters of CPS."""

        cps_weight: float = Field(1.5, ge=0.0)
        cutmix: bool = True
        n_boxes: int = Field(3, ge=1)
        prop_range: tuple[float, float] = (0.25, 0.5)
        inference: Literal["first", "average"] = "first"
        # class-aware reliability (docs/methods.md#11-class-aware-reliability); the official CPS
        # uses every pixel (conf_thresh 0, fixed) with weight 1
        conf_thresh: float = Field(0.0, ge=0.0, le=1.0)
        threshold: Literal["fixed", "freematch", "flexmatch"] = "fixed"
        threshold_momentum: float = Field(0.999, ge=0.0, lt=1.0)
        conf_weight_gamma: float = Field(0.0, ge=0.0)

        @field_validator("prop_range")
        @classmethod
        def _prop(cls, v: tuple[float, float]) -> tuple[float, float]:
            if not 0.0 <= v[0] <= v[1] <= 1.0:
                raise ValueError(f"prop_range must satisfy 0 <= low <= high <= 1, got {v}")
            return v

    cfg: Config

    def data_spec(self) -> DataSpec:
        """One unlabeled frame per sample (every unlabeled frame of the training videos)."""
        return DataSpec.of(UnlabeledRequest(frames=1))

    def build_models(self, make_model: Callable[[], nn.Module]) -> nn.ModuleDict:
        """``model`` and ``model2``: two ``make_model()`` calls under two different seeds drawn from
        the (engine-seeded) global RNG, so the randomly initialised heads differ; a pretrained
        encoder is the same in both."""
        seeds = torch.randint(0, 2**62, (2,)).tolist()
        while seeds[1] == seeds[0]:
            seeds[1] = int(torch.randint(0, 2**62, ()))
        nets = []
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                nets.append(make_model())
        return nn.ModuleDict({"model": nets[0], "model2": nets[1]})

    def trainable(self, models: nn.ModuleDict) -> list[str]:
        return ["model", "model2"]

    @property
    def _filtering(self) -> bool:
        c = self.cfg
        return c.threshold != "fixed" or c.conf_thresh > 0 or c.conf_weight_gamma > 0

    def _pseudo(self, logits: Tensor, valid: Tensor) -> tuple[Tensor, Tensor | None]:
        """Hard pseudo-label of one network's (upsampled, detached) logits, the ignore label on
        invalid pixels and, with the reliability options, on pixels below their class threshold;
        plus the confidence weights (None without ``conf_weight_gamma``)."""
        label = ignore_invalid(cps_pseudo_label(logits), valid, self.ignore_index)
        if not self._filtering:
            return label, None
        prob = torch.softmax(logits.float(), dim=1)
        conf = prob.max(dim=1).values
        self.thresholds.update(prob, valid)
        label = label.masked_fill(~self.thresholds.mask(conf, label.clamp(max=self.num_classes - 1)),
                                  self.ignore_index)
        gamma = self.cfg.conf_weight_gamma
        return label, confidence_weights(conf, gamma) if gamma else None

    def _cross_loss(self, logits: Tensor, label: Tensor, weight: Tensor | None) -> Tensor:
        if weight is None:
            return seg_ce_loss(logits, label, self.ignore_index)
        kept = label != self.ignore_index
        return weighted_ce(logits, label, weight, kept, kept.sum(), self.ignore_index)

    def training_step(
        self, models: nn.ModuleDict, batch: dict[str, Any], step: int, max_steps: int
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        net1, net2 = models["model"], models["model2"]
        x_l, y_l = batch["labeled"].image, batch["labeled"].label
        x_u = batch["unlabeled"].image[:, 0]
        valid = batch["unlabeled"].frame_valid(0)
        n_u = x_u.shape[0]
        size = (int(x_u.shape[-2]), int(x_u.shape[-1]))

        if cfg.cutmix:
            with torch.no_grad():
                t1 = _up(net1(x_u)["logits"], size)
                t2 = _up(net2(x_u)["logits"], size)
                gen = step_generator()
                mask = torch.stack(
                    [box_mix_mask(*size, cfg.n_boxes, cfg.prop_range, gen, x_u.device) for _ in range(n_u)]
                )
                perm = roll_permutation(n_u, x_u.device)
                x_mix = apply_cutmix(x_u, None, None, mask, perm)[0]
                # padded pixels (pasted ones included) get no pseudo-label
                valid = apply_cutmix(None, valid, None, mask, perm)[1]
                pl1, w1 = self._pseudo(apply_cutmix(t1, None, None, mask, perm)[0], valid)  # type: ignore[arg-type]
                pl2, w2 = self._pseudo(apply_cutmix(t2, None, None, mask, perm)[0], valid)  # type: ignore[arg-type]
            o1u, o2u = net1(x_mix)["logits"], net2(x_mix)["logits"]
            o1l, o2l = net1(x_l)["logits"], net2(x_l)["logits"]
            loss_cps = self._cross_loss(o1u, pl2, w2) + self._cross_loss(o2u, pl1, w1)
        else:  # official plain CPS: cross supervision on labeled + unlabeled predictions
            n_l = x_l.shape[0]
            o1 = net1(torch.cat([x_l, x_u]))["logits"]
            o2 = net2(torch.cat([x_l, x_u]))["logits"]
            o1l, o2l = o1[:n_l], o2[:n_l]
            with torch.no_grad():
                both = torch.cat([batch["labeled"].valid.bool(), valid])
                pl1, w1 = self._pseudo(_up(o1.detach(), size), both)
                pl2, w2 = self._pseudo(_up(o2.detach(), size), both)
            loss_cps = self._cross_loss(o1, pl2, w2) + self._cross_loss(o2, pl1, w1)
        loss_sup = seg_ce_loss(o1l, y_l, self.ignore_index)
        loss_sup2 = seg_ce_loss(o2l, y_l, self.ignore_index)
        loss = loss_sup + loss_sup2 + cfg.cps_weight * loss_cps
        return {
            "loss": loss,
            "loss_sup": loss_sup.detach(),
            "loss_sup2": loss_sup2.detach(),
            "loss_cps": loss_cps.detach(),
        }

    def export_spec(self, models: nn.ModuleDict) -> ExportSpec:
        """The first network (default) or, with ``inference: average``, the probability average of
        both (:class:`~semivss.models.ensemble.ProbAverage`; evaluate / predict rebuild it from the
        checkpoint or the exported weights)."""
        if self.cfg.inference == "average":
            return ExportSpec(("model", "model2"), "prob_average")
        return ExportSpec(("model",))
