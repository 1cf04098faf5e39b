"""Tests of the Method base class, the supervised baseline and the registry."""

from __future__ import annotations

import math

import pytest
import torch
from engine_toy import TinySeg
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from semivss.data.batch import LabeledBatch
from semivss.data.requests import LabeledRequest
from semivss.errors import ConfigError
from semivss.methods import METHODS, DataSpec, Method, Supervised, build_method, seg_ce_loss
from semivss.methods.base import ExportSpec
from semivss.models.ensemble import build_inference_model


class FixedLogits(nn.Module):
    """A 'model' returning given logits whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.logits, "feature": self.logits}


def test_supervised_loss_equals_hand_computed_ce() -> None:
    # 2 classes, 1x3 image. Pixel A: logits (0, 0), label 0 -> ln 2.
    # Pixel B: logits (ln 3, 0), label 0 -> -ln(3/4). Pixel C: label 255 -> ignored.
    logits = torch.tensor([[[[0.0, math.log(3.0), 5.0]], [[0.0, 0.0, -5.0]]]])
    label = torch.tensor([[[0, 0, 255]]])
    method = build_method("supervised", {}, num_classes=2)
    models = nn.ModuleDict({"model": FixedLogits(logits)})
    batch = {"labeled": LabeledBatch(torch.zeros(1, 3, 1, 3), label, torch.ones(1, 1, 3, dtype=torch.bool))}
    out = method.training_step(models, batch, step=0, max_steps=1)
    hand = (0.693147 + 0.287682) / 2
    assert out["loss"].item() == pytest.approx(hand, abs=1e-5)
    assert set(out) == {"loss", "loss_sup"}
    out["loss"].backward()
    assert models["model"].logits.grad[0, :, 0, 2].abs().sum() == 0  # ignored pixel: no gradient


def test_logits_are_upsampled_bilinearly_to_label_size() -> None:
    # constant logits at half resolution stay constant after bilinear upsampling
    logits = torch.zeros(1, 3, 2, 2)
    logits[:, 1] = math.log(2.0)  # p = (1/4, 1/2, 1/4)
    label = torch.tensor([[[1, 1, 0, 2]] * 4])  # 4x4: 8 pixels of class 1, 4 of class 0, 4 of 2
    label[0, 0, 0] = 255
    loss = seg_ce_loss(logits, label)
    # 7 pixels of class 1 (-ln 1/2), 4 of class 0 and 4 of class 2 (-ln 1/4) over 15 valid
    hand = (7 * 0.693147 + 8 * 1.386294) / 15
    assert loss.item() == pytest.approx(hand, abs=1e-5)
    # a non-constant map: the result equals CE on F.interpolate(align_corners=False)
    g = torch.Generator().manual_seed(0)
    small = torch.randn(2, 3, 3, 5, generator=g)
    lbl = torch.randint(0, 3, (2, 6, 10), generator=g)
    ref = nn.functional.cross_entropy(
        nn.functional.interpolate(small, size=(6, 10), mode="bilinear", align_corners=False), lbl
    )
    assert seg_ce_loss(small, lbl).item() == pytest.approx(ref.item(), rel=1e-6)


def test_all_ignored_batch_gives_zero_not_nan() -> None:
    logits = torch.randn(1, 2, 2, 2, requires_grad=True)
    loss = seg_ce_loss(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_build_method_errors_name_the_key(monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"method\.name.*'nope'.*supervised"):
        build_method("nope", {}, num_classes=3)
    with pytest.raises(ConfigError, match=r"method\.alpha"):
        build_method("supervised", {"alpha": 1.0}, num_classes=3)

    class Weighted(Method):
        name = "weighted"

        class Config(BaseModel):
            model_config = ConfigDict(extra="forbid")
            weight: float = Field(1.0, gt=0)

    monkeypatch.setitem(METHODS, "weighted", Weighted)
    assert build_method("weighted", {"weight": 0.5}, num_classes=3).cfg.weight == 0.5
    with pytest.raises(ConfigError, match=r"method\.weight"):
        build_method("weighted", {"weight": -1}, num_classes=3)
    with pytest.raises(ConfigError, match=r"method\.wieght"):
        build_method("weighted", {"wieght": 2}, num_classes=3)
    with pytest.raises(ConfigError, match="num_classes"):
        Supervised(None, 0)


def test_base_hooks_defaults() -> None:
    method = Supervised(None, num_classes=4)
    assert method.data_spec() == DataSpec.of(LabeledRequest(0, (-29, 29), False))
    assert method.data_spec().keys == ("labeled",)
    models = method.build_models(TinySeg)
    assert list(models) == ["model"] and isinstance(models["model"], TinySeg)
    models["teacher"] = TinySeg().requires_grad_(False)
    assert method.trainable(models) == ["model"]
    assert method.inference_model(models) is models["model"]
    assert method.export_spec(models) == ExportSpec(("model",), "single")
    method.on_step_end(models, 0)  # no-op
    assert method.state_dict() == {}
    with pytest.raises(ConfigError, match="context_offsets"):
        DataSpec.of(LabeledRequest(context_offsets=(3, -3)))
    with pytest.raises(NotImplementedError):
        Method(None, 2).training_step(models, {}, 0, 1)


def test_export_spec_record_and_combine() -> None:
    """``ExportSpec`` round-trips through ``meta["export"]``; files from before it carry
    ``meta["inference_model"]`` (a name, or a list of names averaged) or nothing."""
    spec = ExportSpec(("model", "model2"), "prob_average")
    assert spec.to_meta() == {"members": ["model", "model2"], "combine": "prob_average"}
    assert ExportSpec.from_meta({"export": spec.to_meta()}) == spec
    assert ExportSpec.from_meta({}) == ExportSpec(("model",))
    assert ExportSpec.from_meta({"inference_model": "teacher"}) == ExportSpec(("teacher",))
    assert ExportSpec.from_meta({"inference_model": ["model", "model2"]}) == spec
    assert ExportSpec("teacher") == ExportSpec(("teacher",))
    for bad in ((), ("a", "b")):
        with pytest.raises(ValueError):
            ExportSpec(bad)
    with pytest.raises(ValueError, match="combine"):
        ExportSpec(("model",), "vote")
    nets = [TinySeg(), TinySeg()]
    assert build_inference_model(nets[:1], "single") is nets[0]
    avg = build_inference_model(nets, "prob_average")
    assert list(avg.state_dict()) == [f"nets.{i}.{k}" for i in (0, 1) for k in nets[0].state_dict()]
    with pytest.raises(ValueError):
        build_inference_model(nets, "single")
