"""CAC: directional context-aware consistency (Lai et al., CVPR 2021; official code
dvlab-research/Context-Aware-Consistency), docs/methods.md#13-cac.

Two overlapping crops of an unlabeled frame see the shared region in different contexts. Their
projected features at stride 8 are aligned on the overlap; each feature is pulled toward the
detached feature of the other crop at the same place where that one is more confident (and above
``pos_thresh``), and pushed from the features of both crops whose pseudo-label differs from its
own: the directional contrastive loss, Eq. (CAC-1)..(CAC-3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from semivss.data.requests import OverlapRequest
from semivss.errors import ConfigError
from semivss.methods.base import DataSpec, Method, seg_ce_loss, unwrap
from semivss.registry import METHODS
from semivss.sections import Section

__all__ = ["CAC", "Projector", "directional_contrastive_loss"]


class Projector(nn.Module):
    """CAC projection head: 1x1 conv D -> ``hidden``, ReLU, 1x1 conv -> ``dim`` (no BN)."""

    def __init__(self, in_dim: int, hidden: int = 256, dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_dim, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """All head parameters (the official code trains the projector at the head LR)."""
        return {"head": list(self.parameters())}


def _anchor_loss(anchor: Tensor, positive: Tensor, negatives: Tensor, same: Tensor,
                 temperature: float) -> Tensor:
    """Per-anchor InfoNCE ``logsumexp([pos, negatives of another class]) - pos`` (Eq. CAC-2)."""
    pos = (anchor * positive).sum(1, keepdim=True) / temperature
    neg = (anchor @ negatives.T / temperature).masked_fill(same, float("-inf"))
    return torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1) - pos[:, 0]


def anchor_mask(conf_anchor: Tensor, conf_other: Tensor, pos_thresh: float) -> Tensor:
    """Where the anchor side is pulled: the other crop is above ``pos_thresh`` and more confident."""
    return (conf_other > pos_thresh) & (conf_anchor < conf_other)


def directional_contrastive_loss(
    f1: Tensor, f2: Tensor, conf1: Tensor, conf2: Tensor, label1: Tensor,
    neg_feat: Tensor, neg_label: Tensor, pos_thresh: float = 0.75, temperature: float = 0.1,
    chunk: int = 2048,
) -> Tensor:
    """Directional contrastive loss of crop-1 anchors (Eq. CAC-3): ``f1``, ``f2`` (n, d) unit
    features of the same overlap positions in crops 1 and 2; anchors are the positions where
    ``conf2 > pos_thresh`` and ``conf1 < conf2``; the positive is ``f2`` (detached); negatives are
    the rows of ``neg_feat`` (detached) whose ``neg_label`` differs from the anchor's pseudo-label
    ``label1``. Mean over the anchors (0 without any). Anchors are processed in chunks, each
    recomputed in the backward pass, to bound memory."""
    keep = anchor_mask(conf1, conf2, pos_thresh)
    if not bool(keep.any()):
        return f1.sum() * 0.0
    a, p, lab = f1[keep], f2[keep].detach(), label1[keep]
    negatives, neg_label = neg_feat.detach(), neg_label
    losses = []
    for i in range(0, a.shape[0], chunk):
        same = lab[i:i + chunk, None] == neg_label[None, :]
        args = (a[i:i + chunk], p[i:i + chunk], negatives, same, temperature)
        losses.append(checkpoint(_anchor_loss, *args, use_reentrant=False) if a.requires_grad
                      else _anchor_loss(*args))
    return torch.cat(losses).mean()


@METHODS.register("cac")
class CAC(Method):
    """Supervised CE + directional contrastive consistency between two overlapping crops."""

    name: ClassVar[str] = "cac"

    class Config(Section):
        """``method:`` parameters (defaults: the official Cityscapes/VOC configs)."""

        unsup_weight: float = Field(0.1, ge=0.0)
        temperature: float = Field(0.1, gt=0.0)
        pos_thresh: float = Field(0.75, ge=0.0, le=1.0)
        proj_hidden: int = Field(256, ge=1)
        proj_dim: int = Field(128, ge=1)
        stride: int = Field(8, ge=1)  # feature stride of the contrastive maps
        scale_range: tuple[float, float] = (0.8, 2.0)
        iou_bound: tuple[float, float] = (0.1, 1.0)
        sup_only_iters: int = Field(0, ge=0)  # official: 5 of 80 epochs supervised only
        chunk: int = Field(2048, ge=1)

    cfg: Config

    def data_spec(self) -> DataSpec:
        c = self.cfg
        return DataSpec.of(OverlapRequest(tuple(c.scale_range), tuple(c.iou_bound), c.stride))

    def build_models(self, make_model: Callable[[], nn.Module]) -> nn.ModuleDict:
        """``model`` (the segmentation network) and ``projector`` (trained with it)."""
        model = make_model()
        dim = getattr(model, "feature_dim", None)
        if dim is None or not hasattr(model, "classify"):
            raise ConfigError("method 'cac' needs a model with a 'feature' output and a 'classify' head")
        return nn.ModuleDict({"model": model, "projector": Projector(dim, self.cfg.proj_hidden, self.cfg.proj_dim)})

    def _embed(self, model: nn.Module, projector: nn.Module, x: Tensor, valid: Tensor, flip: Tensor,
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Unit projections (B,d,h,w), confidence and pseudo-label (B,h,w) at the contrastive
        stride, and the validity of each cell, with mirrored crops flipped back."""
        feat = model(x)["feature"]
        k = self.cfg.stride // int(unwrap(model).stride)
        if k < 1 or self.cfg.stride % int(unwrap(model).stride):
            raise ConfigError(f"method.stride {self.cfg.stride} must be a multiple of the model's "
                              f"feature stride {unwrap(model).stride}")
        if k > 1:
            feat = F.avg_pool2d(feat, k)
        proj = F.normalize(projector(feat).float(), dim=1)
        with torch.no_grad():
            prob = torch.softmax(unwrap(model).classify(feat).float(), dim=1)
            conf, label = prob.max(dim=1)
            cell = -F.max_pool2d(-valid[:, None].float(), self.cfg.stride)[:, 0] > 0.5  # all pixels valid
        cell = cell[..., : proj.shape[-2], : proj.shape[-1]]
        flip = flip.bool().view(-1, 1, 1)
        proj = torch.where(flip[:, None], proj.flip(-1), proj)
        conf, label, cell = (torch.where(flip, t.flip(-1), t) for t in (conf, label, cell))
        return proj, conf, label, cell

    def training_step(
        self, models: nn.ModuleDict, batch: dict[str, Any], step: int, max_steps: int
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        model, projector = models["model"], models["projector"]
        lab, ov = batch["labeled"], batch["overlap"]
        loss_sup = seg_ce_loss(model(lab.image)["logits"], lab.label, self.ignore_index)
        zero = sum(p.sum() * 0.0 for p in projector.parameters())  # every parameter in the graph (DDP)
        if step < cfg.sup_only_iters:
            return {"loss": loss_sup + zero, "loss_sup": loss_sup.detach(),
                    "loss_cac": loss_sup.detach() * 0, "anchor_ratio": loss_sup.detach() * 0}
        e1 = self._embed(model, projector, ov.image[:, 0], ov.valid[:, 0], ov.flip[:, 0])
        e2 = self._embed(model, projector, ov.image[:, 1], ov.valid[:, 1], ov.flip[:, 1])
        s = cfg.stride
        rows1, rows2 = [], []
        for i in range(ov.image.shape[0]):  # align the overlap cells of the two crops, per sample
            (t1, l1, b1, r1), (t2, l2, b2, r2) = (ov.overlap[i, j].div(s, rounding_mode="floor").tolist()
                                                  for j in (0, 1))
            rows1.append([t[i][..., t1:b1, l1:r1] for t in e1])
            rows2.append([t[i][..., t2:b2, l2:r2] for t in e2])

        def flat(rows: list[list[Tensor]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            proj = torch.cat([r[0].flatten(1).T for r in rows])
            conf, label, cell = (torch.cat([r[j].flatten() for r in rows]) for j in (1, 2, 3))
            return proj, conf, label, cell

        f1, c1, y1, v1 = flat(rows1)
        f2, c2, y2, v2 = flat(rows2)
        both = v1 & v2
        # negatives: every valid cell of both crops (detached), with its own pseudo-label
        neg = torch.cat([e[0].permute(0, 2, 3, 1)[e[3]] for e in (e1, e2)])
        neg_label = torch.cat([e[2][e[3]] for e in (e1, e2)])
        c1m, c2m = c1.masked_fill(~both, 0.0), c2.masked_fill(~both, 0.0)
        loss1 = directional_contrastive_loss(f1, f2, c1m, c2m, y1, neg, neg_label, cfg.pos_thresh,
                                             cfg.temperature, cfg.chunk)
        loss2 = directional_contrastive_loss(f2, f1, c2m, c1m, y2, neg, neg_label, cfg.pos_thresh,
                                             cfg.temperature, cfg.chunk)
        loss_cac = loss1 + loss2
        with torch.no_grad():
            anchors = (anchor_mask(c1m, c2m, cfg.pos_thresh) | anchor_mask(c2m, c1m, cfg.pos_thresh)).float()
        return {
            "loss": loss_sup + cfg.unsup_weight * loss_cac + zero,
            "loss_sup": loss_sup.detach(),
            "loss_cac": loss_cac.detach(),
            "anchor_ratio": anchors.sum() / both.sum().clamp(min=1),
        }
