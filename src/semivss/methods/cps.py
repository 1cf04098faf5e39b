"""CPS — cross pseudo supervision (Chen et al., CVPR 2021; SPEC 2.4; official code
charlesCXK/TorchSemiSeg ``exp.city/*.CPS+CutMix/train.py``).

Two networks of the same architecture with differently initialised heads (same pretrained
encoder) are trained together. With CutMix (the paper's strongest setting) every unlabeled image
u is mixed with its partner u' = u[(i + 1) % B] through a French et al. box mask (3 boxes toggled,
area proportion U[0.25, 0.5]); each network's pseudo-label of the mixed image is the argmax of its
prediction on u and u' mixed with the same mask (no gradient, train mode as the official code),
and each network learns the OTHER one's one-hot pseudo-label on the mixed image:

    L = CE(f1(x_l), y) + CE(f2(x_l), y) + cps_weight * (CE(f1(u_mix), Y2) + CE(f2(u_mix), Y1)).

``cps_weight`` defaults to 1.5 (SPEC 2.4; the official configs use 1.5 for VOC and 5-6 for
Cityscapes). The official code mixes two independently drawn unlabeled batches; the partner here
is another sample of the same batch (one forward pass less). Plain CE replaces the official OHEM
for the supervised terms. Without CutMix the cross supervision covers labeled and unlabeled
images, as in the official non-CutMix code
(one CE over the labeled + unlabeled pixels per network).

Padded pixels of the unlabeled crops (``batch["unlabeled"]["valid"]`` False; its box-mixed copy
with CutMix, so a pasted padded region stays invalid) and, without CutMix, of the labeled crops
(``batch["labeled"]["valid"]``) get the ignore label in both pseudo-labels: the cross-supervision
CE is the mean over the valid pixels alone. A batch without ``valid`` counts every pixel as valid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from semivss.methods.base import DataSpec, Method, seg_ce_loss, unwrap
from semivss.methods.parts import (
    apply_cutmix,
    box_mix_mask,
    ignore_invalid,
    labeled_valid,
    roll_permutation,
    step_generator,
    unlabeled_valid,
)
from semivss.models.ensemble import ProbAverage

__all__ = ["CPS", "ProbAverage"]


def _up(logits: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def cps_pseudo_label(logits: Tensor) -> Tensor:
    """One-hot (argmax) pseudo-label of ``logits`` (B,C,H,W) -> (B,H,W) int64."""
    return logits.argmax(dim=1)


class CPS(Method):
    """Two networks supervising each other with hard pseudo-labels (+ CutMix)."""

    name: ClassVar[str] = "cps"

    class Config(BaseModel):
        """``method:`` parameters of CPS."""

        model_config = ConfigDict(extra="forbid")

        cps_weight: float = Field(1.5, ge=0.0)
        cutmix: bool = True
        n_boxes: int = Field(3, ge=1)
        prop_range: tuple[float, float] = (0.25, 0.5)
        inference: Literal["first", "average"] = "first"

        @field_validator("prop_range")
        @classmethod
        def _prop(cls, v: tuple[float, float]) -> tuple[float, float]:
            if not 0.0 <= v[0] <= v[1] <= 1.0:
                raise ValueError(f"prop_range must satisfy 0 <= low <= high <= 1, got {v}")
            return v

    cfg: Config

    def data_spec(self) -> DataSpec:
        """One unlabeled frame per sample (every unlabeled frame of the training videos)."""
        return DataSpec(unlabeled_frames=1)

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

    def training_step(
        self, models: nn.ModuleDict, batch: dict[str, Any], step: int, max_steps: int
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        net1, net2 = models["model"], models["model2"]
        x_l, y_l = batch["labeled"]["image"], batch["labeled"]["label"]
        x_u = batch["unlabeled"]["image"][:, 0]
        valid = unlabeled_valid(batch["unlabeled"])  # None: every pixel valid (older batches)
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
                pl1 = cps_pseudo_label(apply_cutmix(t1, None, None, mask, perm)[0])  # type: ignore[arg-type]
                pl2 = cps_pseudo_label(apply_cutmix(t2, None, None, mask, perm)[0])  # type: ignore[arg-type]
                if valid is not None:  # padded pixels (pasted ones included) get no pseudo-label
                    valid = apply_cutmix(None, valid, None, mask, perm)[1]
                    pl1 = ignore_invalid(pl1, valid, self.ignore_index)
                    pl2 = ignore_invalid(pl2, valid, self.ignore_index)
            o1u, o2u = net1(x_mix)["logits"], net2(x_mix)["logits"]
            o1l, o2l = net1(x_l)["logits"], net2(x_l)["logits"]
            loss_cps = seg_ce_loss(o1u, pl2, self.ignore_index) + seg_ce_loss(o2u, pl1, self.ignore_index)
        else:  # official plain CPS: cross supervision on labeled + unlabeled predictions
            n_l = x_l.shape[0]
            o1 = net1(torch.cat([x_l, x_u]))["logits"]
            o2 = net2(torch.cat([x_l, x_u]))["logits"]
            o1l, o2l = o1[:n_l], o2[:n_l]
            with torch.no_grad():
                pl1 = cps_pseudo_label(_up(o1.detach(), size))
                pl2 = cps_pseudo_label(_up(o2.detach(), size))
                valid_l = labeled_valid(batch["labeled"])
                if valid is not None or valid_l is not None:  # a missing mask: all valid
                    all_l = torch.ones_like(pl1[:n_l], dtype=torch.bool)
                    all_u = torch.ones_like(pl1[n_l:], dtype=torch.bool)
                    both = torch.cat([all_l if valid_l is None else valid_l, all_u if valid is None else valid])
                    pl1 = ignore_invalid(pl1, both, self.ignore_index)
                    pl2 = ignore_invalid(pl2, both, self.ignore_index)
            loss_cps = seg_ce_loss(o1, pl2, self.ignore_index) + seg_ce_loss(o2, pl1, self.ignore_index)
        loss_sup = seg_ce_loss(o1l, y_l, self.ignore_index)
        loss_sup2 = seg_ce_loss(o2l, y_l, self.ignore_index)
        loss = loss_sup + loss_sup2 + cfg.cps_weight * loss_cps
        return {
            "loss": loss,
            "loss_sup": loss_sup.detach(),
            "loss_sup2": loss_sup2.detach(),
            "loss_cps": loss_cps.detach(),
        }

    def inference_model(self, models: nn.ModuleDict) -> nn.Module:
        """The first network (default) or, with ``inference: average``, the probability average of
        both (:class:`~semivss.models.ensemble.ProbAverage`; evaluate / predict reload it from the
        checkpoint or the exported weights)."""
        if self.cfg.inference == "average":
            return ProbAverage(unwrap(models["model"]), unwrap(models["model2"]))
        return unwrap(models["model"])
