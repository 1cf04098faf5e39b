"""IFR: inter-frame feature reconstruction (Zhuang et al., CVPR 2022; official code jfzhuang/IFR).

One network, no teacher. Class prototypes of a *source* frame (per sample, fixing the official
per-batch pooling) reconstruct the decoder features of a *target* frame by cosine attention; the
reconstruction goes through the shared final classifier and is trained against the target's
ground truth or argmax pseudo-label, ramped in over ``ramp_iters``. ``forward_passes`` chooses
which image groups share a forward pass (only BatchNorm statistics differ).
Equations (IFR-1)..(IFR-7), official settings and deviations: docs/methods.md#3-ifr.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from semivss.data.requests import LabeledRequest, UnlabeledRequest
from semivss.errors import ConfigError
from semivss.methods.base import DataSpec, Method, seg_ce_loss, unwrap
from semivss.methods.parts import ignore_invalid
from semivss.models.config import archs_with
from semivss.ops import resize
from semivss.registry import ARCHS, METHODS
from semivss.sections import Section

GROUPS = ("x", "src", "src_s", "u0", "u1", "u1_s")
GroupName = Literal["x", "src", "src_s", "u0", "u1", "u1_s"]

__all__ = ["IFR", "class_prototypes", "reconstruct", "ramp"]


def ramp(it: int, ramp_iters: int) -> float:
    """Sigmoid-shaped ramp-up of the reconstruction loss (docs/methods.md#3-ifr, Eq. (IFR-6);
    official ``sigmoid_rampup``): ``exp(-5 (1 - min(it, R) / R)^2)``; 1 when ``R <= 0``. ``it`` is
    the 0-based iteration."""
    if ramp_iters <= 0:
        return 1.0
    phase = 1.0 - min(max(float(it), 0.0), float(ramp_iters)) / float(ramp_iters)
    return math.exp(-5.0 * phase * phase)


def class_prototypes(feature: Tensor, assign: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-sample class prototypes (docs/methods.md#3-ifr, Eq. (IFR-1)):
    ``P[b, k] = mean of feature[b, :, p]`` over the pixels ``p`` of sample ``b`` with
    ``assign[b, p] == k``.

    ``feature`` (B,D,h,w), ``assign`` (B,h,w) integer class ids (values outside ``0..C-1``, e.g.
    255, are left out). Returns ``prototypes`` (B,C,D) in the feature dtype (zero rows for absent
    classes) and ``present`` (B,C) bool. Sample ``b`` uses only its own pixels (the official code
    pools over the per-GPU batch, a bug). Differentiable w.r.t. ``feature``; ``assign`` is a
    constant.
    """
    if feature.dim() != 4 or assign.dim() != 3:
        raise ValueError(f"class_prototypes: feature (B,D,h,w) and assign (B,h,w) expected, got "
                         f"{tuple(feature.shape)} and {tuple(assign.shape)}")
    b, d, h, w = feature.shape
    if tuple(assign.shape) != (b, h, w):
        raise ValueError(f"class_prototypes: assign {tuple(assign.shape)} does not match the "
                         f"feature map {tuple(feature.shape)}")
    ids = assign.reshape(b, h * w).long()
    valid = (ids >= 0) & (ids < num_classes)
    onehot = F.one_hot(ids.clamp(0, num_classes - 1), num_classes).to(feature.dtype)
    onehot = onehot * valid.unsqueeze(-1).to(feature.dtype)  # (B, N, C)
    sums = torch.bmm(feature.reshape(b, d, h * w), onehot)  # (B, D, C)
    counts = onehot.sum(dim=1)  # (B, C)
    prototypes = (sums / counts.clamp(min=1).unsqueeze(1)).transpose(1, 2)  # (B, C, D)
    return prototypes, counts > 0


def reconstruct(
    target_feature: Tensor, prototypes: Tensor, present: Tensor, tau: float = 0.5
) -> Tensor:
    """Reconstruct every pixel feature ``f`` of the target from the source prototypes
    (docs/methods.md#3-ifr, Eq. (IFR-2)-(IFR-3)): ``f_hat = sum_k softmax_k(cos(f, P_k) / tau) P_k``,
    the softmax over the classes present in that sample only (absent classes get ``-inf``
    attention).

    ``target_feature`` (B,D,h,w), ``prototypes`` (B,C,D), ``present`` (B,C) -> (B,D,h,w).
    Gradients reach the target through the attention weights and the source through the
    prototypes. A sample without any present class reconstructs to zeros.
    """
    if target_feature.dim() != 4 or prototypes.dim() != 3:
        raise ValueError(f"reconstruct: target (B,D,h,w) and prototypes (B,C,D) expected, got "
                         f"{tuple(target_feature.shape)} and {tuple(prototypes.shape)}")
    b, d, h, w = target_feature.shape
    bad_present = tuple(present.shape) != tuple(prototypes.shape[:2])
    if prototypes.shape[0] != b or prototypes.shape[2] != d or bad_present:
        raise ValueError(
            f"reconstruct: target {tuple(target_feature.shape)}, prototypes "
            f"{tuple(prototypes.shape)} and present {tuple(present.shape)} do not match"
        )
    f = target_feature.reshape(b, d, h * w).transpose(1, 2)  # (B, N, D)
    # cos(f, P) = (f . P / |P|) / |f|: dividing the (B, N, C) products by |f| costs C/D of
    # normalising the (B, N, D) features (same value, F.normalize's eps included)
    norm_f = f.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, N, 1)
    cos = torch.bmm(f, F.normalize(prototypes, dim=-1).transpose(1, 2)) / norm_f
    attn = cos / tau  # (B, N, C)
    # mask absent classes; a sample with no class at all keeps its (zero) prototypes unmasked
    absent = ~present & present.any(dim=1, keepdim=True)
    attn = attn.masked_fill(absent.unsqueeze(1), float("-inf")).softmax(dim=-1)  # (B, N, C)
    out = torch.bmm(attn, prototypes)  # (B, N, D)
    return out.transpose(1, 2).reshape(b, d, h, w)


@METHODS.register("ifr")
class IFR(Method):
    """Inter-frame feature reconstruction (docs/methods.md#3-ifr, Eq. (IFR-7)).

    ``L = L_sup + ramp(it) * sum_t w_t CE(classify(f_hat_t) / temperature_logits, y_t)`` over the
    four terms of Eq. (IFR-5): labeled frame from a context (source) frame, labeled frame from the
    distorted source copy (grouped by the undistorted copy's argmax), unlabeled ``u0`` from
    ``u1``, ``u0`` from the distorted ``u1`` (grouped by ``u1``); ``y`` is the ground truth or the
    argmax pseudo-label of ``u0`` at image resolution (as the official code). Each ``use_*``
    switch disables one term (and the frames only it needs).
    """

    name: ClassVar[str] = "ifr"

    class Config(Section):
        """``method:`` parameters of IFR (defaults = the official Cityscapes setting)."""

        temperature_attn: float = Field(0.5, gt=0, description="cosine-attention temperature")
        temperature_logits: float = Field(0.01, gt=0, description="reconstructed logits / this")
        w_labeled: float = Field(1e-2, ge=0)
        w_labeled_strong: float = Field(1e-3, ge=0)
        w_unlabeled: float = Field(1e-3, ge=0)
        w_unlabeled_strong: float = Field(1e-4, ge=0)
        ramp_iters: int = Field(4000, ge=0, description="ramp-up length R (0 = no ramp)")
        # signed position offsets of the source frame w.r.t. the labeled frame (Cityscapes:
        # labeled frame at index 19 of a 30-frame snippet -> -19..10)
        source_offsets: tuple[int, int] = (-19, 10)
        # offsets of u1 w.r.t. u0 (any two distinct frames of a 30-frame snippet)
        unlabeled_offsets: tuple[int, int] = (-29, 29)
        use_labeled: bool = True
        use_labeled_strong: bool = True
        use_unlabeled: bool = True
        use_unlabeled_strong: bool = True
        # Which image groups share a forward pass (BatchNorm statistics are per pass). Groups:
        # x (labeled frames), src (source frames), src_s (distorted sources), u0, u1, u1_s.
        # "per_group": one pass per group, as the official code (with BN after a global pooling,
        # as in ASPP / PPM, every group then needs >= 2 images); "joint": all groups in one pass;
        # or a partition, e.g. [[x], [src], [src_s], [u0, u1, u1_s]]; unlisted groups get a pass
        # of their own.
        forward_passes: Literal["per_group", "joint"] | list[list[GroupName]] = "per_group"
        # Cost-saving deviation (default off = the official setting, docs/methods.md#3-ifr): take
        # the unlabeled pair from the labeled clip instead of the unlabeled set: u1 = the source
        # frame (and its distorted copy, both already forwarded for the labeled terms), u0 = a
        # second context frame of the labeled video (distinct from the source when the window
        # allows); no unlabeled loader.
        # 4 images per labeled clip instead of 3 + 3 per (labeled, unlabeled) clip pair.
        share_frames: bool = False

        @field_validator("source_offsets", "unlabeled_offsets")
        @classmethod
        def _offsets(cls, value: tuple[int, int]) -> tuple[int, int]:
            lo, hi = value
            if lo > hi:
                raise ValueError(f"must be (low, high) with low <= high, got {(lo, hi)}")
            if lo == hi == 0:
                raise ValueError("must allow a frame other than the anchor, got (0, 0)")
            return value

        @field_validator("forward_passes")
        @classmethod
        def _passes(cls, value: Any) -> Any:
            if isinstance(value, list):
                names = [n for group in value for n in group]
                twice = sorted({n for n in names if names.count(n) > 1})
                if twice:
                    raise ValueError(f"each group may appear in one pass only; repeated: {twice}")
                if any(not group for group in value):
                    raise ValueError("a pass must name at least one group")
            return value

    cfg: Config

    # ------------------------------------------------------------------ data
    @property
    def _need_unlabeled(self) -> bool:
        return self.cfg.use_unlabeled or self.cfg.use_unlabeled_strong

    @property
    def _need_context(self) -> bool:
        c = self.cfg
        return c.use_labeled or c.use_labeled_strong or (c.share_frames and self._need_unlabeled)

    @property
    def _need_source_strong(self) -> bool:
        c = self.cfg
        return c.use_labeled_strong or (c.share_frames and c.use_unlabeled_strong)

    def data_spec(self) -> DataSpec:
        """One source frame per labeled clip (+ its distorted copy); unlabeled pairs (u0, u1)
        (+ distorted copies); only what the enabled terms need. With ``share_frames`` the pair
        comes from the labeled clip: two context frames, no unlabeled batch."""
        c = self.cfg
        share = c.share_frames and self._need_unlabeled
        labeled = LabeledRequest(
            context_frames=(2 if share else 1) if self._need_context else 0,
            context_offsets=tuple(c.source_offsets),
            context_strong=self._need_source_strong,
        )
        if not (self._need_unlabeled and not c.share_frames):
            return DataSpec.of(labeled)
        strong = 1 if c.use_unlabeled_strong else 0
        return DataSpec.of(labeled, UnlabeledRequest(frames=2, offsets=tuple(c.unlabeled_offsets),
                                                     strong_copies=strong))

    # ------------------------------------------------------------------ forward
    def _passes(self, present: list[str]) -> list[list[str]]:
        """The groups of each forward pass, restricted to the groups this step has."""
        spec = self.cfg.forward_passes
        if spec == "joint":
            return [present]
        listed = [] if spec == "per_group" else [[g for g in p if g in present] for p in spec]
        seen = {g for p in listed for g in p}
        return [p for p in listed if p] + [[g] for g in present if g not in seen]

    def _forward(self, model: nn.Module, images: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """Run the network on the image groups, the groups of one pass concatenated (outputs are
        split back per group). Inputs follow the memory format of the labeled images
        (channels_last when the engine uses it)."""
        fmt = (torch.channels_last
               if images["x"].is_contiguous(memory_format=torch.channels_last)
               else torch.contiguous_format)
        outs: dict[str, dict[str, Tensor]] = {}
        for keys in self._passes([g for g in GROUPS if g in images]):
            if len({tuple(images[k].shape[1:]) for k in keys}) > 1:
                raise ConfigError(
                    f"method.forward_passes: groups {keys} share a pass but their images differ "
                    f"in size {[tuple(images[k].shape[1:]) for k in keys]}"
                )
            x = torch.cat([images[k] for k in keys]) if len(keys) > 1 else images[keys[0]]
            try:
                out = model(x.contiguous(memory_format=fmt))
            except ValueError as err:
                if "Expected more than 1 value per channel" not in str(err):
                    raise
                raise ConfigError(
                    f"method.forward_passes: the pass of {keys} holds a single image, and the "
                    f"model's BatchNorm needs at least 2 in training; raise "
                    f"data.unlabeled_batch_size / data.batch_size or put groups into one pass, "
                    f"e.g. forward_passes: [[x], [src], [src_s], [u0, u1, u1_s]]"
                ) from err
            sizes = [images[k].shape[0] for k in keys]
            parts = {name: t.split(sizes) for name, t in out.items() if isinstance(t, Tensor)}
            for i, k in enumerate(keys):
                outs[k] = {name: p[i] for name, p in parts.items()}
        return outs

    def _term(
        self,
        classify: Callable[[Tensor], Tensor],
        target: Tensor,
        source: Tensor,
        assign: Tensor,
        label: Tensor,
    ) -> Tensor:
        """CE of one reconstruction term: prototypes of ``source`` grouped by ``assign``,
        reconstruction of ``target``, ``classify(f_hat) / temperature_logits``, upsampled to the
        label size (in fp32, outside autocast: the /0.01 amplifies low-precision error)."""
        with torch.autocast(device_type=target.device.type, enabled=False):
            protos, present = class_prototypes(source.float(), assign, self.num_classes)
            f_hat = reconstruct(target.float(), protos, present, self.cfg.temperature_attn)
            logits = classify(f_hat) / self.cfg.temperature_logits
        return seg_ce_loss(logits, label, self.ignore_index)

    def training_step(
        self, models: nn.ModuleDict, batch: dict[str, Any], step: int, max_steps: int
    ) -> dict[str, Tensor]:
        c = self.cfg
        model = models["model"]
        if not getattr(unwrap(model), "supports_classify", True):
            ok = archs_with("classify", default=True)
            raise ConfigError(
                f"method 'ifr' classifies reconstructed features with the model's final "
                f"classifier, which {type(unwrap(model)).__name__} does not have (model.arch "
                f"{', '.join(n for n in ARCHS.names() if n not in ok)}); use one of {', '.join(ok)}"
            )
        classify = unwrap(model).classify
        lab = batch["labeled"]
        label = lab.label
        images = {"x": lab.image}
        if self._need_context:
            images["src"] = lab.context[:, 0]
            if self._need_source_strong:
                images["src_s"] = lab.context_strong[:, 0]
        if self._need_unlabeled:
            if c.share_frames:
                images["u0"] = lab.context[:, 1]
            else:
                unl = batch["unlabeled"]
                images["u0"] = unl.image[:, 0]
                images["u1"] = unl.image[:, 1]
                if c.use_unlabeled_strong:
                    images["u1_s"] = unl.strong[0][:, 1]
        out = self._forward(model, images)
        if c.share_frames and self._need_unlabeled:
            out["u1"] = out["src"]
            if c.use_unlabeled_strong:
                out["u1_s"] = out["src_s"]

        loss_sup = seg_ce_loss(out["x"]["logits"], label, self.ignore_index)
        # (name, target feature, source feature, grouping of the source, CE target)
        jobs: list[tuple[str, Tensor, Tensor, Tensor, Tensor]] = []
        if self._need_context:
            assign = out["src"]["logits"].detach().argmax(dim=1)  # at feature resolution
            feat_x = out["x"]["feature"]
            if c.use_labeled:
                jobs.append(("labeled", feat_x, out["src"]["feature"], assign, label))
            if c.use_labeled_strong:
                jobs.append(("labeled_strong", feat_x, out["src_s"]["feature"], assign, label))
        if self._need_unlabeled:
            with torch.no_grad():  # argmax pseudo-label of u0 at image resolution (official code)
                pseudo = resize(out["u0"]["logits"].float(), images["u0"].shape[-2:]).argmax(dim=1)
            if not c.share_frames:  # no pseudo-label on the crop padding of u0
                pseudo = ignore_invalid(pseudo, batch["unlabeled"].frame_valid(0), self.ignore_index)
            assign_u = out["u1"]["logits"].detach().argmax(dim=1)
            feat_u0 = out["u0"]["feature"]
            if c.use_unlabeled:
                jobs.append(("unlabeled", feat_u0, out["u1"]["feature"], assign_u, pseudo))
            if c.use_unlabeled_strong:
                jobs.append(("unlabeled_strong", feat_u0, out["u1_s"]["feature"], assign_u, pseudo))
        terms = {name: self._term(classify, *args) for name, *args in jobs}

        weights = {
            "labeled": c.w_labeled,
            "labeled_strong": c.w_labeled_strong,
            "unlabeled": c.w_unlabeled,
            "unlabeled_strong": c.w_unlabeled_strong,
        }
        loss_rec = sum((weights[k] * v for k, v in terms.items()), loss_sup.new_zeros(()))
        r = ramp(step, c.ramp_iters)
        result = {
            "loss": loss_sup + r * loss_rec,
            "loss_sup": loss_sup,
            "loss_rec": loss_rec,
            "ramp": torch.tensor(r, device=loss_sup.device),
        }
        result.update({f"loss_rec_{k}": v for k, v in terms.items()})
        return result
