"""U2PL: semi-supervised semantic segmentation using unreliable pseudo-labels (Wang et al.,
CVPR 2022; official code Haochen-Wang409/U2PL ``train_semi.py``).

Student + EMA teacher. The teacher's pseudo-labels of the weak view supervise the student on a
CutMix strong view; the teacher's entropy splits the pixels: CE on the reliable ones
(:func:`u2pl_unsup_loss`), the unreliable ones are negatives of the contrastive loss
(:func:`~semivss.methods.parts.contrastive.u2pl_contrastive_loss`, both official bugs fixed).
The teacher follows the student's parameters by EMA and keeps its own BatchNorm statistics.
Steps, Eq. (U2PL-1)..(U2PL-6) and the differences from the official code: docs/methods.md#4-u2pl.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from semivss.data.requests import UnlabeledRequest
from semivss.errors import ConfigError
from semivss.methods.base import DataSpec, ExportSpec, Method, seg_ce_loss, unwrap
from semivss.methods.parts import (
    BankCheckpoint,
    ClassMemoryBank,
    classwise_reliability_split,
    confidence_weights,
    ContrastiveSettings,
    alpha_schedule,
    apply_cutmix,
    average_buffers,
    batch_cutmix_boxes,
    ema_update,
    entropy,
    entropy_rank_mask,
    ignore_invalid,
    make_teacher,
    reliability_split,
    roll_permutation,
    step_generator,
    u2pl_contrastive_loss,
    weighted_ce,
)
from semivss.models.heads import representation_off
from semivss.ops import resize, resize_labels
from semivss.registry import METHODS

__all__ = ["U2PL", "u2pl_unsup_loss"]

_REP_HEAD_MSG = (
    "method 'u2pl' needs a model with a representation head: set model.rep_head: true "
    "(with model.arch: deeplabv3plus)"
)


def u2pl_unsup_loss(
    logits: Tensor,
    pseudo: Tensor,
    ent: Tensor,
    alpha_percent: float,
    valid: Tensor,
    ignore_index: int = 255,
    classwise: int = 0,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """U2PL unsupervised loss (docs/methods.md#41-reliable-and-unreliable-pixels, Eq. (U2PL-4);
    paper Eq. 3 with the reliable split of Eq. 5-7): ``(loss, reliable, unreliable)``.

    ``logits`` (B,C,h,w) student logits (upsampled to the pseudo-label size), ``pseudo`` (B,H,W)
    teacher argmax, ``ent`` (B,H,W) teacher entropy, ``valid`` (B,H,W) bool.
    The ``alpha_percent`` % highest-entropy VALID pixels are unreliable, the other valid pixels
    reliable; loss = mean CE over the reliable pixels x (valid pixels / reliable pixels), so it
    equals the loss computed on the valid pixels alone (official: pixels with ``target != 255``).
    """
    with torch.no_grad():
        if classwise:  # the percentile within each predicted class (Eq. (CR-3))
            reliable, unreliable = classwise_reliability_split(ent, pseudo, alpha_percent, valid, classwise)
        else:
            reliable, unreliable = reliability_split(ent, alpha_percent, valid)
        n_reliable = reliable.sum()
        scale = valid.sum().float() / n_reliable.clamp(min=1).float()
        target = pseudo.masked_fill(~reliable, ignore_index)
    if weight is None:
        loss = seg_ce_loss(logits, target, ignore_index)
    else:  # confidence-weighted CE (Eq. (CR-4)), same normalisation
        loss = weighted_ce(logits, target, weight, reliable, n_reliable, ignore_index)
    return loss * scale, reliable, unreliable


@METHODS.register("u2pl")
class U2PL(BankCheckpoint, Method):
    """Student + EMA teacher; reliable-pixel CE and contrastive loss with unreliable negatives."""

    name: ClassVar[str] = "u2pl"

    class Config(ContrastiveSettings):
        """``method:`` parameters of U2PL (defaults: the official Cityscapes config and the
        paper's contrastive weight, docs/methods.md#4-u2pl)."""

        unsup_weight: float = Field(1.0, ge=0.0)
        contrastive_weight: float = Field(0.1, ge=0.0)
        ema_decay: float = Field(0.99, ge=0.0, le=1.0)
        alpha0: float = Field(20.0, ge=0.0, le=100.0)
        cutmix_p: float = Field(0.5, ge=0.0, le=1.0)
        cutmix_area: float = Field(0.5, gt=0.0, le=1.0)
        eval_teacher: bool = True
        sup_only_iters: int = Field(0, ge=0)
        # options (docs/methods.md#11-class-aware-reliability, #12-stronger-teachers); defaults
        # are the official behaviour
        percentile: Literal["global", "classwise"] = "global"
        conf_weight_gamma: float = Field(0.0, ge=0.0)
        teacher_flip: bool = False

    cfg: Config

    def __init__(
        self, cfg: BaseModel | Mapping[str, Any] | None, num_classes: int, ignore_index: int = 255
    ) -> None:
        super().__init__(cfg, num_classes, ignore_index)
        self.bank = ClassMemoryBank(num_classes, None, self.cfg.memory_size)

    def data_spec(self) -> DataSpec:
        """One unlabeled frame per sample (every unlabeled frame of the training videos)."""
        return DataSpec.of(UnlabeledRequest(frames=1))

    def build_models(self, make_model: Callable[[], nn.Module]) -> nn.ModuleDict:
        """``model`` (student, trained) and ``teacher`` (its frozen EMA copy)."""
        student = make_model()
        if getattr(student, "has_rep_head", True) is False:
            raise ConfigError(_REP_HEAD_MSG)
        return nn.ModuleDict({"model": student, "teacher": make_teacher(student)})

    def trainable(self, models: nn.ModuleDict) -> list[str]:
        return ["model"]

    def training_step(
        self, models: nn.ModuleDict, batch: dict[str, Any], step: int, max_steps: int
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        student, teacher = models["model"], unwrap(models["teacher"])
        x_l, y_l = batch["labeled"].image, batch["labeled"].label
        if step < cfg.sup_only_iters:  # official ``sup_only_epoch`` warm-up
            out = student(x_l)
            loss_sup = seg_ce_loss(out["logits"], y_l, self.ignore_index)
            zero = loss_sup.detach() * 0.0
            unused = out["rep"].sum() * 0.0 if "rep" in out else zero  # every parameter in the graph (DDP)
            return {"loss": loss_sup + unused, "loss_sup": loss_sup.detach(), "loss_unsup": zero,
                    "loss_contra": zero, "reliable_ratio": zero}
        if cfg.sup_only_iters > 0 and step == cfg.sup_only_iters:  # teacher := warmed-up student
            ema_update(teacher, unwrap(student), 0, copy_buffers=True)
        x_u = batch["unlabeled"].image[:, 0]
        valid = batch["unlabeled"].frame_valid(0)
        n_l, n_u = x_l.shape[0], x_u.shape[0]
        size = (int(x_u.shape[-2]), int(x_u.shape[-1]))
        gen = step_generator()

        # 1-2. pseudo-labels from the eval-mode teacher on the weak view; CutMix strong view
        with torch.no_grad(), representation_off(teacher):  # only the logits are used here
            teacher.eval()
            prob_w = torch.softmax(resize(teacher(x_u)["logits"].float(), size), dim=1)
            if cfg.teacher_flip:  # average with the teacher's prediction of the mirrored frame
                flipped = teacher(x_u.flip(-1))["logits"].float()
                prob_w = (prob_w + torch.softmax(resize(flipped, size), dim=1).flip(-1)) / 2
            conf, pseudo = prob_w.max(dim=1)
            x_s = x_u
            if float(torch.rand((), generator=gen)) < cfg.cutmix_p:
                box = batch_cutmix_boxes(n_u, *size, p=1.0, area=cfg.cutmix_area, generator=gen,
                                         device=x_u.device)
                perm = roll_permutation(n_u, x_u.device)
                mixed = apply_cutmix(x_u, pseudo, conf, box, perm)
                x_s, pseudo, conf = mixed  # type: ignore[assignment]
                valid = apply_cutmix(None, valid, None, box, perm)[1]  # pasted padding stays invalid

        # 3. student on labeled + strong unlabeled
        x_all = torch.cat([x_l, x_s])
        out = student(x_all)
        if "rep" not in out:
            raise ConfigError(_REP_HEAD_MSG)
        logits, rep = out["logits"], out["rep"]
        loss_sup = seg_ce_loss(logits[:n_l], y_l, self.ignore_index)

        # 4. teacher (train mode, no gradient) on the same batch; entropy of its prediction
        with torch.no_grad():
            teacher.train()
            out_t = teacher(x_all)
            teacher.eval()
            logits_t = out_t["logits"].float()
            ent = entropy(torch.softmax(resize(logits_t[n_l:], size), dim=1))
            alpha = alpha_schedule(step, max_steps, cfg.alpha0)

        # 5. entropy split of the valid pixels; CE on reliable pixels x (valid / reliable pixels)
        weight = confidence_weights(conf, cfg.conf_weight_gamma) if cfg.conf_weight_gamma else None
        loss_unsup, reliable, unreliable = u2pl_unsup_loss(
            logits[n_l:], pseudo, ent, alpha, valid, self.ignore_index,
            classwise=self.num_classes if cfg.percentile == "classwise" else 0, weight=weight,
        )
        n_reliable = reliable.sum()
        n_valid = valid.sum().clamp(min=1).float()

        # 6. contrastive loss with unreliable negatives
        if cfg.contrastive_weight > 0:
            loss_con = self._contrastive(
                rep, out_t, logits_t, y_l, ignore_invalid(pseudo, valid, self.ignore_index), ent,
                unreliable, alpha, n_l, gen, valid,
            )
        else:
            loss_con = rep.sum() * 0.0

        loss = loss_sup + cfg.unsup_weight * loss_unsup + cfg.contrastive_weight * loss_con
        return {
            "loss": loss,
            "loss_sup": loss_sup.detach(),
            "loss_unsup": loss_unsup.detach(),
            "loss_contra": loss_con.detach(),
            "reliable_ratio": (n_reliable.float() / n_valid).detach(),
        }

    def _contrastive(
        self,
        rep: Tensor,
        out_t: dict[str, Tensor],
        logits_t: Tensor,
        y_l: Tensor,
        pseudo: Tensor,
        ent: Tensor,
        unreliable: Tensor,
        alpha: float,
        n_l: int,
        gen: torch.Generator,
        valid: Tensor,
    ) -> Tensor:
        """Contrastive term (step 6): ``pseudo`` carries the ignore label on invalid pixels, and
        the anchor candidates are the ``alpha`` % lowest-entropy valid pixels."""
        cfg = self.cfg
        if "rep" not in out_t:
            raise ConfigError(_REP_HEAD_MSG)
        small = (int(rep.shape[-2]), int(rep.shape[-1]))
        with torch.no_grad():
            low = entropy_rank_mask(ent, alpha, valid, highest=False)
            label = torch.cat([resize_labels(y_l, small), resize_labels(pseudo, small)])
            ones_l = torch.ones((n_l, *small), dtype=torch.bool, device=rep.device)
            anchor_mask = torch.cat([ones_l, resize_labels(low, small)])
            negative_mask = torch.cat([ones_l, resize_labels(unreliable, small)])
            prob_t = resize(torch.softmax(logits_t, dim=1), small)
            is_labeled = torch.arange(label.shape[0], device=rep.device) < n_l
        return u2pl_contrastive_loss(
            rep,
            out_t["rep"],
            prob_t,
            label,
            anchor_mask,
            negative_mask,
            is_labeled,
            self.bank,
            num_anchors=cfg.num_anchors,
            num_negatives=cfg.num_negatives,
            temperature=cfg.temperature,
            anchor_threshold=cfg.anchor_threshold,
            low_rank=cfg.low_rank,
            high_rank=cfg.high_rank,
            ignore_index=self.ignore_index,
            generator=gen,
        )

    def on_step_end(self, models: nn.ModuleDict, step: int) -> None:
        """EMA update of the teacher's parameters, decay min(1 - 1/(t+1), ema_decay) with t counted
        from the end of the supervised-only warm-up (none during the warm-up). The teacher's
        BatchNorm statistics are its own (its train-mode forward of step 4), averaged over ranks."""
        t = step - self.cfg.sup_only_iters
        if t >= 0:
            teacher = unwrap(models["teacher"])
            ema_update(teacher, unwrap(models["model"]), t, self.cfg.ema_decay)
            average_buffers(teacher)

    def export_spec(self, models: nn.ModuleDict) -> ExportSpec:
        """The EMA teacher (what the official code evaluates) unless ``eval_teacher: false``."""
        return ExportSpec(("teacher" if self.cfg.eval_teacher else "model",))
