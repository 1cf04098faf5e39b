"""Class-aware reliability (docs/methods.md#11-class-aware-reliability): class-wise thresholds
(FreeMatch / FlexMatch), per-class entropy percentiles and confidence weights against
hand-computed values, and their options in U2PL, UniMatch, CPS and self-training."""

from __future__ import annotations

import math

import pytest
import torch

from semivss.methods import build_method
from semivss.methods.parts import (
    ClasswiseThreshold,
    classwise_reliability_split,
    confidence_weights,
    reliability_split,
    weighted_ce,
)
from semivss.methods.self_training import ReliableConfig, split_reliable
from semivss.methods.u2pl import u2pl_unsup_loss


def probs(rows: list[list[float]]) -> torch.Tensor:
    """(1, C, 1, N) probabilities from N rows of C values."""
    return torch.tensor(rows).T[None, :, None, :]


def test_freematch_thresholds_by_hand() -> None:
    th = ClasswiseThreshold(2, "freematch", momentum=0.5)
    np_ = th.thresholds().tolist()
    assert np_ == [0.5, 0.5]  # level 1/C, flat profile
    # two valid pixels and one padded pixel (ignored)
    th.update(probs([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]), torch.tensor([[[True, True, False]]]))
    # level = 0.5*0.5 + 0.5*mean(0.9, 0.6) = 0.625; profile = 0.5*0.5 + 0.5*[0.75, 0.25] = [0.625, 0.375]
    assert th.level.item() == pytest.approx(0.625)
    assert th.profile.tolist() == pytest.approx([0.625, 0.375])
    assert th.thresholds().tolist() == pytest.approx([0.625, 0.375])  # 0.625 * [1, 0.6]
    keep = th.mask(torch.tensor([0.7, 0.4, 0.3]), torch.tensor([0, 1, 1]))
    assert keep.tolist() == [True, True, False]


def test_flexmatch_thresholds_by_hand() -> None:
    th = ClasswiseThreshold(3, "flexmatch", tau=0.8, momentum=0.5)
    p = probs([[0.9, 0.05, 0.05], [0.85, 0.1, 0.05], [0.03, 0.95, 0.02], [0.25, 0.25, 0.5]])
    th.update(p, torch.ones(1, 1, 4, dtype=torch.bool))
    # sure (> 0.8): two pixels of class 0, one of class 1 -> shares [0.5, 0.25, 0]; unsure 0.25
    assert th.selected.tolist() == pytest.approx([0.25, 0.125, 0.0])
    assert th.unused.item() == pytest.approx(0.625)  # 0.5*1 + 0.5*0.25
    beta = [0.25 / 0.625, 0.125 / 0.625, 0.0]
    expected = [0.8 * b / (2 - b) for b in beta]
    assert th.thresholds().tolist() == pytest.approx(expected)


def test_fixed_thresholds_and_state_round_trip() -> None:
    fixed = ClasswiseThreshold(4, "fixed", tau=0.95)
    fixed.update(probs([[1.0, 0.0, 0.0, 0.0]]), torch.ones(1, 1, 1, dtype=torch.bool))
    assert fixed.thresholds().tolist() == [0.95] * 4
    a = ClasswiseThreshold(2, "freematch", momentum=0.9)
    a.update(probs([[0.7, 0.3]]), torch.ones(1, 1, 1, dtype=torch.bool))
    b = ClasswiseThreshold(2, "freematch", momentum=0.9)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.thresholds(), b.thresholds())
    with pytest.raises(ValueError, match="threshold mode"):
        ClasswiseThreshold(2, "adaptive")  # type: ignore[arg-type]


def test_classwise_percentile_keeps_the_rare_class() -> None:
    # class 0: entropies 0.9, 0.8, 0.7; class 1: 0.1, 0.2, 0.3
    ent = torch.tensor([[[0.9, 0.8, 0.7, 0.1, 0.2, 0.3]]])
    pred = torch.tensor([[[0, 0, 0, 1, 1, 1]]])
    valid = torch.ones(1, 1, 6, dtype=torch.bool)
    rel, unrel = classwise_reliability_split(ent, pred, 33.4, valid, 2)
    # round(0.334 * 3) = 1 pixel per class: the highest entropy of each class
    assert unrel.flatten().tolist() == [True, False, False, False, False, True]
    assert torch.equal(rel, valid & ~unrel)
    # the batch-wide percentile (round(0.334 * 6) = 2) takes both from class 0
    _, unrel_global = reliability_split(ent, 33.4, valid)
    assert unrel_global.flatten().tolist() == [True, True, False, False, False, False]
    # invalid pixels are in neither set
    valid2 = valid.clone()
    valid2[0, 0, 0] = False
    rel2, unrel2 = classwise_reliability_split(ent, pred, 33.4, valid2, 2)
    assert not rel2[0, 0, 0] and not unrel2[0, 0, 0]
    # self-training's percentile mode with classwise
    rel3, unrel3 = split_reliable(ent, valid, ReliableConfig(mode="percentile", keep=0.666, classwise=True), 2, pred)
    assert torch.equal(unrel3, unrel) and torch.equal(rel3, rel)
    with pytest.raises(ValueError, match="classwise"):
        ReliableConfig(mode="threshold", classwise=True)


def test_confidence_weights_and_weighted_ce_by_hand() -> None:
    assert confidence_weights(torch.tensor([0.5, 1.0]), 2.0).tolist() == [0.25, 1.0]
    assert confidence_weights(torch.tensor([0.5, 1.0]), 0.0).tolist() == [1.0, 1.0]
    logits = torch.tensor([[[[0.0, math.log(3.0), 5.0]], [[0.0, 0.0, 0.0]]]])  # (1, 2, 1, 3)
    target = torch.tensor([[[0, 0, 255]]])
    weight = torch.tensor([[[0.5, 1.0, 1.0]]])
    keep = torch.tensor([[[True, True, False]]])
    loss = weighted_ce(logits, target, weight, keep, torch.tensor(2))
    expected = (0.5 * math.log(2.0) - math.log(0.75)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_u2pl_options_classwise_split_and_weights() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    pseudo = torch.randint(0, 3, (2, 4, 4))
    ent = torch.rand(2, 4, 4)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    _, _, unrel = u2pl_unsup_loss(logits, pseudo, ent, 25.0, valid, classwise=3)
    _, ref = classwise_reliability_split(ent, pseudo, 25.0, valid, 3)
    assert torch.equal(unrel, ref)
    base, rel, _ = u2pl_unsup_loss(logits, pseudo, ent, 25.0, valid)
    ones, _, _ = u2pl_unsup_loss(logits, pseudo, ent, 25.0, valid, weight=torch.ones(2, 4, 4))
    assert ones.item() == pytest.approx(base.item(), rel=1e-6)  # weight 1 = the official loss
    half, _, _ = u2pl_unsup_loss(logits, pseudo, ent, 25.0, valid, weight=torch.full((2, 4, 4), 0.5))
    assert half.item() == pytest.approx(0.5 * base.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["unimatch", "cps", "u2pl", "self_training"])
def test_methods_accept_the_options(name: str) -> None:
    params = {
        "unimatch": {"threshold": "freematch", "conf_weight_gamma": 1.0},
        "cps": {"threshold": "flexmatch", "conf_thresh": 0.9, "conf_weight_gamma": 2.0, "cps_weight": 1.0},
        "u2pl": {"percentile": "classwise", "conf_weight_gamma": 1.0, "teacher_flip": True},
        "self_training": {"reliable": {"mode": "percentile", "keep": 0.8, "classwise": True}},
    }[name]
    method = build_method(name, params, num_classes=4)
    if hasattr(method, "thresholds"):
        assert method.thresholds.mode == params["threshold"]
        assert "thresholds" in method.state_dict()


def test_cps_pseudo_labels_drop_pixels_below_the_threshold_and_carry_weights() -> None:
    cps = build_method("cps", {"conf_thresh": 0.7, "conf_weight_gamma": 2.0}, num_classes=2)
    # pixel confidences: softmax([2, 0]) = 0.881 (kept), softmax([0, 0.5]) = 0.622 (dropped),
    # third pixel invalid (ignored whatever its confidence)
    logits = torch.tensor([[[[2.0, 0.0, 5.0]], [[0.0, 0.5, 0.0]]]])
    valid = torch.tensor([[[True, True, False]]])
    label, weight = cps._pseudo(logits, valid)
    assert label.tolist() == [[[0, 255, 255]]]
    p = 1 / (1 + math.exp(-2.0))
    assert weight is not None and weight[0, 0, 0].item() == pytest.approx(p ** 2, rel=1e-6)
    plain = build_method("cps", {}, num_classes=2)  # the official CPS: every valid pixel, no weight
    label, weight = plain._pseudo(logits, valid)
    assert label.tolist() == [[[0, 1, 255]]] and weight is None
