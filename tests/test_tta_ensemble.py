"""Test-time augmentation (multi-scale + flip) and weighted checkpoint ensembles (docs/methods.md#7-offline-teacher-student-self-training,
steps 2 and 5) through the Predictor that evaluate / predict / pseudo-label share."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from semivss.errors import ConfigError
from semivss.inference import (
    EvalConfig,
    Member,
    Predictor,
    ensemble,
    evaluate_items,
    input_logits,
    make_prob_fn,
    normalise_weights,
    predict_probs,
)

SCALES_8 = tuple(s / 896 for s in (512, 640, 768, 896, 1024, 1152, 1280, 1408))


class FixedDistribution(nn.Module):
    """Logits = log p of a fixed, spatially constant distribution p (at stride 2, like a decoder),
    also returned as ``probs`` (as the Mask2Former wrapper does)."""

    def __init__(self, p: list[float]) -> None:
        super().__init__()
        self.register_buffer("p", torch.tensor(p, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2
        p = self.p.expand(x.shape[0], -1, h, w)
        return {"logits": p.log(), "probs": p}


class Pointwise(nn.Module):
    """1x1 convolution of the image: flip-equivariant, not flip-symmetric on a random image."""

    def __init__(self, c: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, c, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.conv(x)}


class PositionDependent(Pointwise):
    """Logits also depend on the absolute column (not flip-equivariant)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        col = torch.linspace(0.0, 3.0, x.shape[-1], device=x.device).view(1, 1, 1, -1)
        ramp = torch.arange(self.conv.out_channels, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return {"logits": self.conv(x) + ramp * col}


class Const(nn.Module):
    """Spatially constant logits."""

    def __init__(self, v: list[float]) -> None:
        super().__init__()
        self.register_buffer("v", torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.v.expand(x.shape[0], -1, x.shape[2], x.shape[3])}


def _image(h: int = 12, w: int = 16, b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- config


def test_eval_config_tta_fields_validated() -> None:
    cfg = EvalConfig()
    assert cfg.scales == (1.0,) and cfg.flip is False
    assert EvalConfig(scales=[0.5, 1, 2]).scales == (0.5, 1.0, 2.0)
    with pytest.raises(ValidationError, match="scales"):
        EvalConfig(scales=())
    with pytest.raises(ValidationError, match="positive"):
        EvalConfig(scales=(1.0, 0.0))
    with pytest.raises(ValidationError, match="positive"):
        EvalConfig(scales=(-0.5,))
    with pytest.raises(ValidationError, match="positive"):
        EvalConfig(scales=(float("nan"),))


# ----------------------------------------------------------------------------- TTA


def test_tta_of_fixed_distribution_returns_it() -> None:
    """log p logits -> softmax gives p back at every scale, flipped or not, at any output size."""
    p = [0.5, 0.25, 0.15, 0.1]
    model = FixedDistribution(p).eval()
    cfg = EvalConfig(size=(14, 18), scales=SCALES_8, flip=True)
    predictor = Predictor.single(model, cfg)
    x = _image(20, 30)
    out = predictor(x, (23, 31))
    assert out.shape == (2, 4, 23, 31)
    torch.testing.assert_close(out, torch.tensor(p).view(1, 4, 1, 1).expand_as(out),
                               rtol=0, atol=1e-6)
    labels, probs = predictor.predict(x, (23, 31), with_probs=True)
    assert probs is not None and torch.equal(labels, torch.zeros(2, 23, 31, dtype=torch.int64))
    # frames are fed at the original size when several scales are used (each resized from it)
    assert predictor.input_size is None
    assert Predictor.single(model, EvalConfig(size=(14, 18))).input_size == (14, 18)


def test_tta_averages_the_views() -> None:
    """Multi-scale + flip = mean over views of predict_probs (each resized straight to out_size)."""
    model = Pointwise().eval()
    cfg = EvalConfig(size=(12, 16), scales=(0.5, 1.0, 1.5), flip=True)
    x = _image()
    got = Predictor.single(model, cfg)(x, (9, 13))
    views = []
    for s in cfg.scales:
        views.append(predict_probs(model, x, (9, 13), cfg, scale=s))
        views.append(predict_probs(model, x.flip(-1), (9, 13), cfg, scale=s).flip(-1))
    torch.testing.assert_close(got, torch.stack(views).mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(2, 9, 13), rtol=0, atol=1e-5)


def test_flip_branch_is_unflipped() -> None:
    x = _image(10, 14)
    assert not torch.equal(x, x.flip(-1))
    base = EvalConfig(size=None)
    flip = EvalConfig(size=None, flip=True)
    # flip-equivariant model: the flip branch equals the plain branch, so TTA changes nothing
    eq = Pointwise().eval()
    plain = Predictor.single(eq, base)(x, (10, 14))
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-3)  # the output is not symmetric
    torch.testing.assert_close(Predictor.single(eq, flip)(x, (10, 14)), plain, rtol=0, atol=1e-6)
    # position-dependent model: flip branch = predict(flip(x)).flip(-1), at input size and resized
    pos = PositionDependent().eval()
    for out_size in ((10, 14), (15, 21)):
        p_plain = predict_probs(pos, x, out_size, base)
        p_flip = predict_probs(pos, x.flip(-1), out_size, base).flip(-1)
        assert not torch.allclose(p_plain, p_flip, atol=1e-2)
        tta = Predictor.single(pos, flip)(x, out_size)
        torch.testing.assert_close(2 * tta - p_plain, p_flip, rtol=0, atol=1e-5)


def test_single_view_labels_are_exactly_the_old_path() -> None:
    """One model, one scale, no flip: argmax of the logits upsampled to the label size, as before."""
    model = Pointwise(c=5, seed=3).eval()
    for cfg in (EvalConfig(size=(7, 9)), EvalConfig(mode="slide", size=None, window=(6, 8), stride=(4, 5))):
        x = _image(12, 16, b=3, seed=5)
        logits = input_logits(model, x, cfg)
        old = torch.cat([F.interpolate(logits[j : j + 1], size=(20, 24), mode="bilinear",
                                       align_corners=False).argmax(1) for j in range(3)])
        labels, probs = Predictor.single(model, cfg).predict(x, (20, 24))
        assert probs is None and torch.equal(labels, old)
        labels2, probs2 = Predictor.single(model, cfg).predict(x, (20, 24), with_probs=True)
        assert torch.equal(labels2, old)
        assert probs2 is not None
        torch.testing.assert_close(probs2, predict_probs(model, x, (20, 24), cfg))
    # a single scale other than 1 is still one view, at that scale
    x = _image(12, 16, b=2, seed=6)
    cfg = EvalConfig(size=(8, 12), scales=(0.5,))
    labels, _ = Predictor.single(model, cfg).predict(x, (12, 16))
    assert torch.equal(labels, predict_probs(model, x, (12, 16), cfg, scale=0.5).argmax(1))


def test_make_prob_fn_is_a_predictor() -> None:
    model = Pointwise().eval()
    cfg = EvalConfig(size=None)
    x = _image()
    torch.testing.assert_close(make_prob_fn(model, cfg, scales=(1.0, 0.5), flip=True)(x, (12, 16)),
                               Predictor.single(model, EvalConfig(size=None, scales=(1.0, 0.5),
                                                                  flip=True))(x, (12, 16)))
    with pytest.raises(ConfigError, match="scales"):
        make_prob_fn(model, cfg, scales=())
    with pytest.raises(ConfigError, match="positive"):
        make_prob_fn(model, cfg, scales=(1.0, -2.0))


# ----------------------------------------------------------------------------- ensembles


def test_ensemble_weights() -> None:
    cfg = EvalConfig(size=None)
    a, b = Const([0.0, 0.0]), Const([math.log(3.0), 0.0])  # probs (0.5, 0.5), (0.75, 0.25)
    pa, pb = torch.tensor([0.5, 0.5]), torch.tensor([0.75, 0.25])
    x = _image(4, 6, b=1)

    def run(weights):
        out = Predictor([(a, cfg), (b, cfg)], weights)(x, (4, 6))
        assert torch.allclose(out, out[:, :, :1, :1].expand_as(out))  # spatially constant
        return out[0, :, 0, 0]

    torch.testing.assert_close(run((1, 0)), Predictor.single(a, cfg)(x, (4, 6))[0, :, 0, 0])
    torch.testing.assert_close(run((1, 0)), pa)
    torch.testing.assert_close(run((0, 5)), pb)
    torch.testing.assert_close(run((1, 1)), (pa + pb) / 2)
    torch.testing.assert_close(run(None), (pa + pb) / 2)
    torch.testing.assert_close(run((2, 1)), (2 * pa + pb) / 3)
    torch.testing.assert_close(run((4, 2)), run((2, 1)))  # normalised

    class Broken(nn.Module):
        def forward(self, x):
            raise AssertionError("a member of weight 0 must not run")

    only_a = Predictor([(a, cfg), (Broken(), cfg)], (1, 0))
    assert only_a.single_view
    torch.testing.assert_close(only_a(x, (4, 6))[0, :, 0, 0], pa)
    assert Predictor([(a, cfg), (b, cfg)], (2, 1)).weights == pytest.approx([2 / 3, 1 / 3])
    assert normalise_weights((1, 3), 2) == [0.25, 0.75] and normalise_weights(None, 4) == [0.25] * 4
    for bad in ((1,), (1, 2, 3), (-1, 2), (0, 0), (float("nan"), 1), (float("inf"), 1)):
        with pytest.raises(ConfigError, match="weights"):
            Predictor([(a, cfg), (b, cfg)], bad)
    # the functional form behaves the same
    fa, fb = make_prob_fn(a, cfg), make_prob_fn(b, cfg)
    torch.testing.assert_close(ensemble([fa, fb], (2, 1))(x, (4, 6))[0, :, 0, 0], (2 * pa + pb) / 3)
    with pytest.raises(ConfigError, match="weights"):
        ensemble([fa, fb], (0, 0))


def test_ensemble_members_with_their_own_settings() -> None:
    """Members with different sizes / TTA are averaged at the output size; the argmax follows the
    weights; a member with another class count is an error naming it."""
    x = _image(12, 18, b=2)
    m1, m2 = Pointwise(seed=1).eval(), Pointwise(seed=2).eval()
    c1 = EvalConfig(size=(6, 9))
    c2 = EvalConfig(size=(16, 24), scales=(0.5, 1.0), flip=True)
    pred = Predictor([Member(m1, c1, 3.0, "a.pt"), Member(m2, c2, 1.0, "b.pt")])
    assert pred.input_size is None and pred.weights == [0.75, 0.25]
    got = pred(x, (12, 18))
    want = 0.75 * Predictor.single(m1, c1)(x, (12, 18)) + 0.25 * Predictor.single(m2, c2)(x, (12, 18))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    labels, _ = pred.predict(x, (12, 18))
    assert torch.equal(labels, want.argmax(1))
    # same size everywhere and single scale: frames prepared once at that size
    assert Predictor([(m1, c1), (m2, EvalConfig(size=(6, 9), flip=True))]).input_size == (6, 9)
    with pytest.raises(ConfigError, match="wide.pt predicts 5 classes"):
        Predictor([Member(m1, c1, name="a.pt"), Member(Pointwise(c=5), c1, name="wide.pt")])(x, (12, 18))


def test_evaluate_items_with_weighted_ensemble() -> None:
    """An ensemble of a perfect and a wrong model scores as the one its weights select."""
    num_classes = 3
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, num_classes, (6, 8)) for _ in range(3)]

    class Oracle(nn.Module):  # the class is encoded in the first channel of the image
        def forward(self, x):
            return {"logits": 10.0 * F.one_hot(x[:, 0].round().long(), num_classes).permute(0, 3, 1, 2).float()}

    class Wrong(Oracle):
        def forward(self, x):
            return {"logits": super().forward(x)["logits"].roll(1, dims=1)}

    def items():
        for i, lab in enumerate(labels):
            img = torch.zeros(3, 6, 8)
            img[0] = torch.from_numpy(lab).float()
            yield {"image": img, "label": torch.from_numpy(lab), "video": "v", "index": i}

    cfg = EvalConfig(size=None, vc=(2,), flip=True)
    for weights, miou in (((1, 0), 1.0), ((3, 1), 1.0), ((0, 1), 0.0), ((1, 3), 0.0)):
        pred = Predictor([(Oracle(), cfg), (Wrong(), cfg)], weights)
        res = evaluate_items(pred, items(), ["a", "b", "c"], cfg, "cpu", progress=False)
        assert res["mIoU"] == miou and res["n_frames"] == 3, weights


def test_predictor_restores_training_mode() -> None:
    m1, m2 = Pointwise(seed=1).train(), Pointwise(seed=2).eval()
    pred = Predictor([(m1, EvalConfig(size=None)), (m2, EvalConfig(size=None))])
    with pred.eval_mode():
        assert not m1.training and not m2.training
    assert m1.training and not m2.training
