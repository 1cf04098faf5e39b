"""Accel fusion training (docs/methods.md#14-accel), IFR's second stage: both segmentation
branches are trained per-frame checkpoints, frozen and kept in eval mode; the 1x1 fusion conv
(and optionally the branches' final classifiers) learns from clips (key frame, the frames up to
a labeled frame k frames later, its label) with the cross-entropy of Eq. (ACC-3).

Each iteration draws one interval k in 1..``max_interval`` for the whole batch: the key frame is
the labeled frame's k-th predecessor, the reference score map is warped through the k
consecutive flows (Eq. (ACC-1)) and fused with the update branch on the labeled frame
(Eq. (ACC-2)). Flow: OpenCV DIS by default (no trained flow network can be fetched here).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from semivss.data.requests import LabeledRequest
from semivss.errors import ConfigError
from semivss.methods.base import DataSpec, Method, seg_ce_loss, unwrap
from semivss.models.accel import AccelNet
from semivss.models.ensemble import ExportSpec
from semivss.models.flow import build_flow
from semivss.registry import METHODS
from semivss.sections import Section


@METHODS.register("accel")
class AccelFusion(Method):
    """Train Accel's fusion on frozen branches: ``L = CE(fuse(warp^k(ref(x_{t-k})), upd(x_t)), y_t)``."""

    name: ClassVar[str] = "accel"

    class Config(Section):
        reference: str = Field(..., description="Trained per-frame checkpoint of the reference branch.")
        update: str | None = Field(None, description="Checkpoint of the update branch (default: the reference's).")
        update_scale: float = Field(0.5, gt=0, le=4, description="Input scale of the update branch.")
        max_interval: int = Field(5, ge=1, description="Key-frame interval k drawn in min_interval..max_interval.")
        # 0 adds clips whose key frame is the labeled frame itself (no warping): an option for data
        # whose training frames are further apart than the test-time key-frame gaps (CamVid: 1 s
        # vs 1/15 s), so that the fusion also sees a fresh reference. Official: 1.
        min_interval: int = Field(1, ge=0, description="Smallest key-frame interval k (0: the labeled frame).")
        keyframe_interval: int = Field(5, ge=1, description="Interval the exported model predicts with by default.")
        flow: str = "dis-fast"
        train_classifiers: bool = False

    def __init__(self, cfg: Any, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(cfg, num_classes, ignore_index)
        self.flow = build_flow(self.cfg.flow)
        self._arch: dict[str, Any] | None = None

    def data_spec(self) -> DataSpec:
        return DataSpec.of(LabeledRequest(context_frames=self.cfg.max_interval, context_preceding=True))

    def build_models(self, make_model: Any) -> nn.ModuleDict:
        """The two branches from their checkpoints (``make_model`` is not used), frozen."""
        from semivss.experiment import load_trained_model

        ref, ref_meta = load_trained_model(self.cfg.reference)
        upd, upd_meta = load_trained_model(self.cfg.update or self.cfg.reference)
        for path, model, meta in ((self.cfg.reference, ref, ref_meta),
                                  (self.cfg.update or self.cfg.reference, upd, upd_meta)):
            if not hasattr(model, "classifier"):
                raise ConfigError(f"method.accel: {path} is not a single per-frame network")
            if int(meta["num_classes"]) != self.num_classes:
                raise ConfigError(f"method.accel: {path} predicts {meta['num_classes']} classes, "
                                  f"the data has {self.num_classes}")
        net = AccelNet(ref, upd, self.num_classes, self.cfg.update_scale,
                       self.cfg.keyframe_interval, self.cfg.flow)
        for p in [*ref.parameters(), *upd.parameters()]:
            p.requires_grad_(False)
        if self.cfg.train_classifiers:
            for p in [*ref.classifier.parameters(), *upd.classifier.parameters()]:
                p.requires_grad_(True)
        self._arch = net.record(ref_meta["model"], upd_meta["model"])
        return nn.ModuleDict({"accel": net})

    def _interval(self, step: int) -> int:
        """The key-frame distance k of iteration ``step`` (a function of the step: exact resume)."""
        lo = min(self.cfg.min_interval, self.cfg.max_interval)
        return int(np.random.default_rng(step).integers(lo, self.cfg.max_interval + 1))

    def training_step(
        self, models: nn.ModuleDict, batch: dict[str, Any], step: int, max_steps: int
    ) -> dict[str, Tensor]:
        net: AccelNet = unwrap(models["accel"])
        net.reference.eval()  # frozen branches: batch-norm statistics and dropout stay as trained
        net.update.eval()  # type: ignore[union-attr]
        labeled = batch["labeled"]
        k = self._interval(step)
        # clip: key frame = k-th predecessor, then the frames up to the labeled one, in order
        frames = [labeled.context[:, -k:]] if k > 0 else []  # k = 0: the key frame is the labeled one
        clip = torch.cat([*frames, labeled.image[:, None]], dim=1)
        logits = net.clip_logits(clip, self.flow)
        loss = seg_ce_loss(logits, labeled.label, self.ignore_index)
        return {"loss": loss, "loss_sup": loss, "k": torch.tensor(float(k))}

    def export_spec(self, models: nn.ModuleDict) -> ExportSpec:
        if self._arch is None:
            raise ConfigError("method.accel: export before build_models")
        return ExportSpec(("accel",), "single", self._arch)
