"""Tests of the IFR method (docs/methods.md#3-ifr): prototypes, reconstruction, the loss of a term by hand,
per-sample independence, gradient paths, ramp, config / data spec, joint vs separate forward,
frame sharing, DDP wrapping and a short engine run on a synthetic set."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semivss.data.batch import LabeledBatch, UnlabeledBatch
from semivss.data.requests import LabeledRequest, UnlabeledRequest
from semivss.errors import ConfigError
from semivss.methods.base import DataSpec
from semivss.methods.ifr import IFR, class_prototypes, ramp, reconstruct

E2 = math.exp(2.0)  # cosine 1 vs 0 at temperature 0.5 -> attention e^2 : e^0


def spec(ctx: int, ctx_off: tuple[int, int], ctx_strong: bool, unl: int, unl_off: tuple[int, int],
         unl_strong: bool) -> DataSpec:
    """The DataSpec of ``ctx`` context frames and ``unl`` unlabeled frames (none: no request)."""
    labeled = LabeledRequest(context_frames=ctx, context_offsets=ctx_off, context_strong=ctx_strong)
    if unl == 0:
        return DataSpec.of(labeled)
    return DataSpec.of(labeled, UnlabeledRequest(frames=unl, offsets=unl_off,
                                                 strong_copies=1 if unl_strong else 0))


class IdentitySeg(nn.Module):
    """feature = scale * image[:, :2] at stride 1; logits = classify(feature); ``classify`` is a
    1x1 conv initialised to the identity (so the argmax of a pixel is its larger channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.classifier = nn.Conv2d(2, 2, 1)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.classifier.bias.zero_()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feature = self.scale * x[:, :2]
        return {"logits": self.classifier(feature), "feature": feature}

    def classify(self, feature: torch.Tensor) -> torch.Tensor:
        return self.classifier(feature)


class TwoLayer(nn.Module):
    """SegModel-like: two 3x3 conv + BN + ReLU (the first with stride 2), 1x1 classifier."""

    def __init__(self, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)
        self.output_stride_total = 2

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.body(x)
        return {"logits": self.classifier(f), "feature": f}

    def classify(self, feature: torch.Tensor) -> torch.Tensor:
        return self.classifier(feature)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.body.parameters()),
                "head": list(self.classifier.parameters())}


def image(pixels: list[tuple[float, float]]) -> torch.Tensor:
    """A (3,1,W) image whose first two channels hold the given per-pixel 2-d features."""
    t = torch.zeros(3, 1, len(pixels))
    for i, (a, b) in enumerate(pixels):
        t[0, 0, i], t[1, 0, i] = a, b
    return t


def random_batch(
    b: int, u: int, h: int = 16, w: int = 16, c: int = 4, seed: int = 0, k: int = 1
) -> dict:
    """Random labeled clips (``k`` context frames) and ``u`` unlabeled pairs; row 0 ignored."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, h, w, generator=g)
    label = torch.randint(0, c, (b, h, w), generator=g)
    context = torch.randn(b, k, 3, h, w, generator=g)
    context_strong = torch.randn(b, k, 3, h, w, generator=g)
    label[:, 0] = 255
    lab = LabeledBatch(image, label, torch.ones(b, h, w, dtype=torch.bool), context,
                       torch.ones(b, k, dtype=torch.int64), context_strong)
    u_image = torch.randn(u, 2, 3, h, w, generator=g)
    u_strong = torch.randn(u, 2, 3, h, w, generator=g)
    unl = UnlabeledBatch(u_image, torch.tensor([[0, 3]] * u, dtype=torch.int64).reshape(u, 2),
                         torch.ones(u, 2, h, w, dtype=torch.bool), [u_strong])
    return {"labeled": lab, "unlabeled": unl}


# ---------------------------------------------------------------- pure functions, by hand
def test_prototypes_and_reconstruction_by_hand() -> None:
    # sample 0: 2x2 map of 2-d features; class 0 at (2,0),(4,0); class 1 at (0,1),(0,3)
    # sample 1: every pixel class 1 -> class 0 absent
    feat = torch.tensor([
        [[[2.0, 4.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 3.0]]],
        [[[1.0, 3.0], [5.0, 7.0]], [[0.0, 2.0], [4.0, 6.0]]],
    ])
    assign = torch.tensor([[[0, 0], [1, 1]], [[1, 1], [1, 1]]])
    protos, present = class_prototypes(feat, assign, num_classes=2)
    assert present.tolist() == [[True, True], [False, True]]
    torch.testing.assert_close(protos[0], torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(protos[1], torch.tensor([[0.0, 0.0], [4.0, 3.0]]))  # mean of 4

    # targets: (1,0) -> cos 1 with P0, 0 with P1 -> weights e^2/(1+e^2), 1/(1+e^2);
    # (1,1) -> equal cosines -> (P0+P1)/2 = (1.5, 1); (0,5) -> mirror of the first;
    # (-1,0) -> cosines -1, 0 -> weights e^-2/(1+e^-2), 1/(1+e^-2)
    target = torch.tensor([[[[1.0, 1.0], [0.0, -1.0]], [[0.0, 1.0], [5.0, 0.0]]]])
    target = target.repeat(2, 1, 1, 1)
    out = reconstruct(target, protos, present, tau=0.5)
    w = E2 / (1 + E2)
    wn = math.exp(-2.0) / (1 + math.exp(-2.0))
    hand0 = torch.tensor([
        [[3 * w, 1.5], [3 * (1 - w), 3 * wn]],
        [[2 * (1 - w), 1.0], [2 * w, 2 * (1 - wn)]],
    ])
    torch.testing.assert_close(out[0], hand0)
    # sample 1: only class 1 present -> every pixel reconstructs to P1 (the absent zero prototype
    # would otherwise take cos = 0 and a non-zero weight)
    torch.testing.assert_close(out[1], torch.tensor([4.0, 3.0]).view(2, 1, 1).expand(2, 2, 2))


def _loop_prototypes(
    feat: torch.Tensor, assign: torch.Tensor, c: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle: per sample and class, the mean of the matching pixel vectors (float64)."""
    b, d = feat.shape[:2]
    protos, present = torch.zeros(b, c, d, dtype=torch.float64), torch.zeros(b, c, dtype=torch.bool)
    for i in range(b):
        for k in range(c):
            vecs = [
                feat[i, :, y, x].double()
                for y in range(feat.shape[2])
                for x in range(feat.shape[3])
                if int(assign[i, y, x]) == k
            ]
            if vecs:
                protos[i, k] = torch.stack(vecs).mean(0)
                present[i, k] = True
    return protos, present


def _loop_reconstruct(
    target: torch.Tensor, protos: torch.Tensor, present: torch.Tensor, tau: float
) -> torch.Tensor:
    """Oracle: pixel by pixel softmax over the present classes of cos / tau (float64)."""
    out = torch.zeros(target.shape, dtype=torch.float64)
    for i in range(target.shape[0]):
        ks = [k for k in range(protos.shape[1]) if present[i, k]]
        for y in range(target.shape[2]):
            for x in range(target.shape[3]):
                f = target[i, :, y, x].double()
                sims = [float(f @ protos[i, k] / (f.norm() * protos[i, k].norm())) / tau
                        for k in ks]
                z = sum(math.exp(s) for s in sims)
                out[i, :, y, x] = sum(math.exp(s) / z * protos[i, k] for s, k in zip(sims, ks))
    return out


def test_functions_match_explicit_loops_and_samples_are_independent() -> None:
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(3, 5, 4, 6, generator=g)
    assign = torch.randint(0, 4, (3, 4, 6), generator=g)
    assign[0] = assign[0].clamp(max=2)  # class 3 absent from sample 0
    assign[1, 0, 0] = 255  # out-of-range ids are left out
    protos, present = class_prototypes(feat, assign, 4)
    ref_p, ref_present = _loop_prototypes(feat, assign, 4)
    assert torch.equal(present, ref_present) and not present[0, 3]
    torch.testing.assert_close(protos.double(), ref_p)
    target = torch.randn(3, 5, 3, 2, generator=g)
    torch.testing.assert_close(reconstruct(target, protos, present, 0.5).double(),
                               _loop_reconstruct(target, ref_p, ref_present, 0.5))

    # perturbing sample 2 (features and grouping) leaves the prototypes of samples 0 and 1 unchanged
    feat2, assign2 = feat.clone(), assign.clone()
    feat2[2] = 100 * torch.randn(5, 4, 6, generator=g)
    assign2[2] = 0
    protos2, present2 = class_prototypes(feat2, assign2, 4)
    assert torch.equal(protos2[:2], protos[:2]) and torch.equal(present2[:2], present[:2])
    assert not torch.equal(protos2[2], protos[2])


def test_gradients_reach_source_through_prototypes_and_target_through_attention() -> None:
    g = torch.Generator().manual_seed(2)
    source = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    assign = torch.randint(0, 3, (2, 3, 3), generator=g)
    protos, present = class_prototypes(source, assign, 3)
    out = reconstruct(target, protos, present, 0.5)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    assert source.grad is not None and source.grad.abs().sum() > 0
    assert target.grad is not None and target.grad.abs().sum() > 0
    # the target's gradient comes only from the attention weights: with a single present class the
    # attention is constant (1) and the target gets exactly zero gradient
    target.grad = None
    one = torch.zeros(2, 3, 3, dtype=torch.int64)
    p1, pr1 = class_prototypes(source, one, 3)
    reconstruct(target, p1, pr1, 0.5).sum().backward()
    assert torch.equal(target.grad, torch.zeros_like(target))


def test_ramp_values() -> None:
    assert ramp(0, 4000) == pytest.approx(math.exp(-5))
    assert ramp(2000, 4000) == pytest.approx(math.exp(-1.25))
    assert ramp(4000, 4000) == 1.0 and ramp(10**6, 4000) == 1.0
    assert ramp(0, 0) == 1.0 and ramp(7, 0) == 1.0


# ---------------------------------------------------------------- the method
def test_labeled_terms_equal_hand_computation() -> None:
    # 1x3 frames, 2-d features = the first two image channels, classify = identity.
    # Labeled frame: (1,0) label 0, (0,1) label 1, (1,0) ignored (255).
    # Source: (0.03,0) -> argmax 0; (0,0.02), (0,0.02) -> argmax 1: P0 = (0.03,0), P1 = (0,0.02).
    # Cosine attention (tau 0.5), w = e^2/(1+e^2): pixel 1 weights (w, 1-w) -> logits / 0.01 =
    # (3w, 2(1-w)); pixel 2 weights (1-w, w) -> (3(1-w), 2w).
    # Distorted source (0,0.03), (0.02,0), (0,0.04) grouped by the UNDISTORTED source's argmax
    # (0, 1, 1): P0 = (0,0.03), P1 = (0.01,0.02) (its own argmax (1, 0, 1) would give another
    # partition). cos(e1, P1) = 1/sqrt(5), cos(e2, P1) = 2/sqrt(5): pixel 1 weights
    # (1, e^a)/(1+e^a) with a = 2/sqrt(5), pixel 2 weights (e^2, e^b)/(e^2+e^b) with
    # b = 4/sqrt(5); logits / 0.01 = (v1, 3 v0 + 2 v1) for weights (v0, v1).
    method = IFR({"use_unlabeled": False, "use_unlabeled_strong": False, "ramp_iters": 4000},
                 num_classes=2)
    assert method.data_spec() == spec(1, (-19, 10), True, 0, (-29, 29), False)
    batch = {"labeled": LabeledBatch(
        image=image([(1, 0), (0, 1), (1, 0)])[None],
        label=torch.tensor([[[0, 1, 255]]]),
        valid=torch.ones(1, 1, 3, dtype=torch.bool),
        context=image([(0.03, 0), (0, 0.02), (0, 0.02)])[None, None],
        context_offset=torch.tensor([[5]]),
        context_strong=image([(0, 0.03), (0.02, 0), (0, 0.04)])[None, None],
    )}
    models = nn.ModuleDict({"model": IdentitySeg()})
    out = method.training_step(models, batch, step=2000, max_steps=10)
    w = E2 / (1 + E2)

    def ce(logits: tuple[float, float], y: int) -> float:
        return -logits[y] + math.log(math.exp(logits[0]) + math.exp(logits[1]))

    hand_1 = (ce((3 * w, 2 * (1 - w)), 0) + ce((3 * (1 - w), 2 * w), 1)) / 2
    ea, eb = math.exp(2 / math.sqrt(5)), math.exp(4 / math.sqrt(5))
    v = (1 / (1 + ea), ea / (1 + ea))  # pixel 1
    u = (E2 / (E2 + eb), eb / (E2 + eb))  # pixel 2
    hand_2 = (ce((v[1], 3 * v[0] + 2 * v[1]), 0) + ce((u[1], 3 * u[0] + 2 * u[1]), 1)) / 2
    hand_sup = math.log(1 + math.exp(-1.0))  # logits (1,0) label 0 and (0,1) label 1
    assert out["loss_rec_labeled"].item() == pytest.approx(hand_1, rel=1e-5)
    assert out["loss_rec_labeled_strong"].item() == pytest.approx(hand_2, rel=1e-5)
    assert out["loss_sup"].item() == pytest.approx(hand_sup, rel=1e-5)
    hand_rec = 1e-2 * hand_1 + 1e-3 * hand_2
    assert out["loss_rec"].item() == pytest.approx(hand_rec, rel=1e-5)
    assert out["ramp"].item() == pytest.approx(math.exp(-1.25))
    total = hand_sup + math.exp(-1.25) * hand_rec
    assert out["loss"].item() == pytest.approx(total, rel=1e-5)
    assert set(out) == {"loss", "loss_sup", "loss_rec", "ramp", "loss_rec_labeled",
                        "loss_rec_labeled_strong"}


def test_full_loss_combines_four_terms_and_pseudo_label_at_image_resolution() -> None:
    torch.manual_seed(0)
    model = TwoLayer()
    batch = random_batch(2, 3)
    method = IFR({"ramp_iters": 100}, num_classes=4)
    out = method.training_step(nn.ModuleDict({"model": model}), batch, step=50, max_steps=200)
    weights = {"labeled": 1e-2, "labeled_strong": 1e-3, "unlabeled": 1e-3, "unlabeled_strong": 1e-4}
    rec = sum(w * out[f"loss_rec_{k}"] for k, w in weights.items())
    torch.testing.assert_close(out["loss_rec"], rec)
    torch.testing.assert_close(out["loss"], out["loss_sup"] + math.exp(-1.25) * rec)

    # independent recomputation of the four terms: one forward of the same network per image
    # group (BN in train mode sees each group alone, as the official code); pseudo-label = argmax
    # of u0's logits upsampled to the image size (16x16, not the 8x8 feature map)
    lab, unl = batch["labeled"], batch["unlabeled"]
    xs = [lab.image, lab.context[:, 0], lab.context_strong[:, 0],
          unl.image[:, 0], unl.image[:, 1], unl.strong[0][:, 1]]
    torch.manual_seed(0)
    ref_model = TwoLayer()
    outs = [ref_model(x) for x in xs]
    feat, groups = [o["feature"] for o in outs], [o["logits"] for o in outs]
    pseudo = F.interpolate(groups[3], size=(16, 16), mode="bilinear", align_corners=False)
    pseudo = pseudo.argmax(1)

    def term(target: torch.Tensor, source: torch.Tensor, group_logits: torch.Tensor,
             y: torch.Tensor) -> torch.Tensor:
        protos, present = class_prototypes(source, group_logits.argmax(1), 4)
        logits = ref_model.classify(reconstruct(target, protos, present, 0.5)) / 0.01
        logits = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, y, ignore_index=255)

    expect = {
        "labeled": term(feat[0], feat[1], groups[1], lab.label),
        "labeled_strong": term(feat[0], feat[2], groups[1], lab.label),
        "unlabeled": term(feat[3], feat[4], groups[4], pseudo),
        "unlabeled_strong": term(feat[3], feat[5], groups[4], pseudo),
    }
    for key, value in expect.items():
        torch.testing.assert_close(out[f"loss_rec_{key}"], value)


def test_gradient_paths_in_training_step() -> None:
    """Term 1 sends gradient to the source frame (prototypes) and the labeled frame (attention);
    term 2 to the distorted source only: its grouping comes from the undistorted source's argmax."""
    method = IFR({"use_unlabeled": False, "use_unlabeled_strong": False}, num_classes=2)
    g = torch.Generator().manual_seed(3)
    lab = LabeledBatch(
        image=torch.randn(2, 3, 3, 4, generator=g).requires_grad_(),
        label=torch.randint(0, 2, (2, 3, 4), generator=g),
        valid=torch.ones(2, 3, 4, dtype=torch.bool),
        context=torch.randn(2, 1, 3, 3, 4, generator=g).requires_grad_(),
        context_strong=torch.randn(2, 1, 3, 3, 4, generator=g).requires_grad_(),
    )
    models = nn.ModuleDict({"model": IdentitySeg()})
    out = method.training_step(models, {"labeled": lab}, 0, 1)
    inputs = [lab.image, lab.context, lab.context_strong]
    grads = torch.autograd.grad(out["loss_rec_labeled"], inputs, allow_unused=True,
                                retain_graph=True)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert grads[2] is None or grads[2].abs().sum() == 0
    grads = torch.autograd.grad(out["loss_rec_labeled_strong"], inputs[1:], allow_unused=True,
                                retain_graph=True)
    assert grads[0] is None or grads[0].abs().sum() == 0  # no gradient through the argmax
    assert grads[1].abs().sum() > 0
    out["loss"].backward()
    model = models["model"]
    assert model.scale.grad.abs() > 0 and model.classifier.weight.grad.abs().sum() > 0


def test_forward_pass_layouts_agree_without_batch_statistics() -> None:
    torch.manual_seed(0)
    model = TwoLayer().eval()  # BN from running stats: batching cannot change any output
    batch = random_batch(2, 3, seed=4)
    models = nn.ModuleDict({"model": model})
    separate = IFR(None, 4).training_step(models, batch, 10, 100)
    for passes in ("joint", [["u0", "u1", "u1_s"]], [["x", "src_s"], ["u1"]]):
        other = IFR({"forward_passes": passes}, 4).training_step(models, batch, 10, 100)
        assert set(other) == set(separate)
        for key in separate:
            torch.testing.assert_close(other[key], separate[key], rtol=1e-5, atol=1e-6)


class CountingModel(nn.Module):
    """Records the batch size of every forward pass of a wrapped model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batches: list[int] = []
        self.classify = inner.classify

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.batches.append(x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize(
    ("passes", "expected"),
    [
        ("per_group", [2, 2, 2, 3, 3, 3]),  # official: x, src, src_s, u0, u1, u1_s
        ("joint", [15]),
        ([["u0", "u1", "u1_s"]], [9, 2, 2, 2]),  # listed passes first, then the rest alone
        ([["src", "x"], ["u1_s"]], [4, 3, 2, 3, 3]),
    ],
)
def test_forward_passes_partition_the_groups(passes: object, expected: list[int]) -> None:
    model = CountingModel(TwoLayer().eval())
    IFR({"forward_passes": passes}, 4).training_step(
        nn.ModuleDict({"model": model}), random_batch(2, 3, seed=4), 10, 100
    )
    assert model.batches == expected


def test_forward_passes_errors() -> None:
    with pytest.raises(ConfigError, match=r"method\.forward_passes.*repeated: \['u1'\]"):
        IFR({"forward_passes": [["u0", "u1"], ["u1"]]}, 3)
    with pytest.raises(ConfigError, match=r"method\.forward_passes"):
        IFR({"forward_passes": [["u2"]]}, 3)

    class PooledBN(nn.Module):  # BN after a global pooling, as the ASPP image branch
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            f = self.conv(x)
            g = self.bn(f.mean(dim=(2, 3), keepdim=True))
            return {"logits": f + g, "feature": f + g}

        def classify(self, f: torch.Tensor) -> torch.Tensor:
            return f

    model = PooledBN().train()
    with pytest.raises(ConfigError, match=r"forward_passes.*\['u0'\] holds a single image"):
        IFR(None, 4).training_step(nn.ModuleDict({"model": model}), random_batch(2, 1), 10, 100)
    out = IFR({"forward_passes": [["u0", "u1", "u1_s"]]}, 4).training_step(
        nn.ModuleDict({"model": model}), random_batch(2, 1), 10, 100
    )
    assert torch.isfinite(out["loss"])


def test_share_frames_uses_source_frame_as_u1() -> None:
    torch.manual_seed(0)
    model = TwoLayer().eval()
    batch = random_batch(2, 0, seed=5, k=2)
    lab = batch["labeled"]
    shared = IFR({"share_frames": True}, 4)
    assert shared.data_spec() == spec(2, (-19, 10), True, 0, (-29, 29), False)
    out = shared.training_step(nn.ModuleDict({"model": model}), {"labeled": lab}, 10, 100)
    # the same as the default method fed an unlabeled pair (u0 = 2nd context frame, u1 = source)
    unl = UnlabeledBatch(
        image=torch.stack([lab.context[:, 1], lab.context[:, 0]], 1),
        offset=torch.zeros(2, 2, dtype=torch.int64),
        valid=torch.ones(2, 2, 16, 16, dtype=torch.bool),
        strong=[torch.stack([lab.context[:, 1], lab.context_strong[:, 0]], 1)],
    )
    lab1 = dataclasses.replace(lab, context=lab.context[:, :1], context_offset=lab.context_offset[:, :1],
                               context_strong=lab.context_strong[:, :1])
    ref = IFR(None, 4).training_step(
        nn.ModuleDict({"model": model}), {"labeled": lab1, "unlabeled": unl}, 10, 100
    )
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-6)


def test_config_switches_data_spec_and_errors() -> None:
    assert IFR(None, 3).data_spec() == spec(1, (-19, 10), True, 2, (-29, 29), True)
    m = IFR({"use_labeled": False, "use_labeled_strong": False, "source_offsets": [-4, 4]}, 3)
    assert m.data_spec() == spec(0, (-4, 4), False, 2, (-29, 29), True)
    m = IFR({"use_unlabeled_strong": False, "use_labeled_strong": False,
             "unlabeled_offsets": (-2, 2)}, 3)
    assert m.data_spec() == spec(1, (-19, 10), False, 2, (-2, 2), False)
    # disabled terms are neither computed nor fed
    batch = random_batch(2, 2, c=3)
    batch = {"labeled": dataclasses.replace(batch["labeled"], context_strong=None),
             "unlabeled": dataclasses.replace(batch["unlabeled"], strong=[])}
    torch.manual_seed(0)
    out = m.training_step(nn.ModuleDict({"model": TwoLayer(3)}), batch, 0, 1)
    assert set(out) == {"loss", "loss_sup", "loss_rec", "ramp", "loss_rec_labeled",
                        "loss_rec_unlabeled"}
    with pytest.raises(ConfigError, match=r"method\.source_offsets"):
        IFR({"source_offsets": (3, -3)}, 3)
    with pytest.raises(ConfigError, match=r"method\.unlabeled_offsets"):
        IFR({"unlabeled_offsets": (0, 0)}, 3)
    with pytest.raises(ConfigError, match=r"method\.temperature_attn"):
        IFR({"temperature_attn": 0}, 3)
    with pytest.raises(ConfigError, match=r"method\.w_unlabled"):
        IFR({"w_unlabled": 1.0}, 3)


def test_ddp_wrapped_model(tmp_path: Path) -> None:
    import torch.distributed as dist

    assert not dist.is_initialized()
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        raw = TwoLayer()
        ref = TwoLayer()
        ref.load_state_dict(raw.state_dict())
        batch = random_batch(2, 2, seed=6)
        for passes in ("joint", "per_group"):
            method = IFR({"forward_passes": passes}, 4)
            wrapped = nn.ModuleDict({"model": nn.parallel.DistributedDataParallel(raw)})
            out = method.training_step(wrapped, batch, 4000, 4000)
            out["loss"].backward()
            expect = method.training_step(nn.ModuleDict({"model": ref}), batch, 4000, 4000)
            expect["loss"].backward()
            torch.testing.assert_close(out["loss"], expect["loss"])
            torch.testing.assert_close(raw.classifier.weight.grad, ref.classifier.weight.grad)
            raw.zero_grad()
            ref.zero_grad()
    finally:
        dist.destroy_process_group()


def test_engine_run_on_synthetic_set_lowers_loss(tmp_path: Path) -> None:
    from semivss.data.clips import LabeledClips, UnlabeledClips
    from semivss.data.formats import load_dataset
    from semivss.data.splits import single_frame
    from semivss.data.synthetic import generate_synthetic
    from semivss.data.transforms import ClipAugment
    from semivss.engine import OptimConfig, ScheduleConfig, TrainConfig, Trainer

    root = generate_synthetic(tmp_path / "synth", videos=3, frames=8, height=32, width=48, seed=0,
                              val_videos=1)
    videos = load_dataset("synthetic", root, "train")
    split = single_frame(videos, 3)
    method = IFR({"ramp_iters": 0, "source_offsets": (-3, 3), "unlabeled_offsets": (-3, 3)},
                 videos.num_classes)
    ds = method.data_spec()
    augment = ClipAugment((32, 32), (32, 48), (1.0, 1.25), hflip=True)
    lr, ur = ds.get("labeled"), ds.get("unlabeled")
    assert isinstance(lr, LabeledRequest) and isinstance(ur, UnlabeledRequest)
    sets = {
        "labeled": LabeledClips(videos, split.labeled, augment, lr.context_frames,
                                lr.context_offsets, lr.context_strong),
        "unlabeled": UnlabeledClips(videos, split.unlabeled, augment, ur.frames,
                                    ur.offsets, ur.strong_copies),
    }
    trainer = Trainer(
        method, lambda: TwoLayer(videos.num_classes, 16), sets, {"labeled": 2, "unlabeled": 2},
        OptimConfig(lr=0.05), ScheduleConfig(iters=40),
        TrainConfig(num_workers=0, log_interval=10, ckpt_interval=40, precision="fp32"),
        tmp_path / "run", tensorboard=False, progress=False,
    )
    last = trainer.fit()
    with (tmp_path / "run" / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]
    assert len(rows) == 4
    first, final = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert final < 0.8 * first, (first, final)
    for key in ("labeled", "labeled_strong", "unlabeled", "unlabeled_strong"):
        assert math.isfinite(last[f"loss_rec_{key}"])
    assert last["ramp"] == 1.0


def test_model_without_feature_classifier_is_refused() -> None:
    model = TwoLayer()
    model.supports_classify = False  # as the Mask2Former wrapper
    with pytest.raises(ConfigError, match=r"method 'ifr'.*mask2former"):
        IFR(None, 4).training_step(nn.ModuleDict({"model": model}), random_batch(2, 2), 0, 10)


def test_ifr_step_on_a_segformer_model() -> None:
    """IFR works with any model exposing the pre-classifier feature: a tiny SegFormer."""
    from semivss.models import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(arch="segformer", hf_config={
        "hidden_sizes": [8, 8, 8, 8], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 1, 1],
        "decoder_hidden_size": 8})
    model = build_model(cfg, 4)
    out = IFR({"ramp_iters": 0}, 4).training_step(
        nn.ModuleDict({"model": model}), random_batch(2, 2, h=32, w=32), 10, 100)
    assert {"loss_rec_labeled", "loss_rec_unlabeled_strong"} <= set(out)
    out["loss"].backward()
    enc = model.param_groups()["backbone"]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc)


def test_unlabeled_padding_gets_no_pseudo_label() -> None:
    """Pixels of u0 outside the frame (crop padding, batch["unlabeled"].valid False) are left
    out of the unlabeled reconstruction terms: the loss equals the one with those pixels' pseudo-
    labels ignored."""
    torch.manual_seed(0)
    model = TwoLayer().eval()
    models = nn.ModuleDict({"model": model})
    batch = random_batch(2, 2, seed=7)
    method = IFR({"use_labeled": False, "use_labeled_strong": False}, 4)
    plain = method.training_step(models, batch, 10, 100)  # all pixels valid
    valid = torch.ones(2, 2, 16, 16, dtype=torch.bool)
    valid[:, :, :, 8:] = False  # right half is padding
    padded = method.training_step(
        models, {**batch, "unlabeled": dataclasses.replace(batch["unlabeled"], valid=valid)}, 10, 100)
    # oracle: the unlabeled term computed by hand with the right half ignored
    u0 = batch["unlabeled"].image[:, 0]
    o0, o1 = model(u0), model(batch["unlabeled"].image[:, 1])
    pseudo = F.interpolate(o0["logits"], size=(16, 16), mode="bilinear",
                           align_corners=False).argmax(1)
    pseudo[:, :, 8:] = 255
    protos, present = class_prototypes(o1["feature"], o1["logits"].argmax(1), 4)
    logits = model.classify(reconstruct(o0["feature"], protos, present, 0.5)) / 0.01
    logits = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    expect = F.cross_entropy(logits, pseudo, ignore_index=255)
    torch.testing.assert_close(padded["loss_rec_unlabeled"], expect)
    assert not torch.allclose(padded["loss_rec_unlabeled"], plain["loss_rec_unlabeled"])
