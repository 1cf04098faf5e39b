"""Accel (docs/methods.md#14-accel): score-map warping against hand-shifted maps, DIS recovering a
known shift, the learned-flow interface, K = 1 equal to per-frame fusion, adaptive key frames,
fusion training lowering its loss, the exported model reloading, and key-frame evaluate/predict
through the command line with memory flat in the video length."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from semivss.cli import app
from semivss.data.transforms import to_tensor
from semivss.inference.config import EvalConfig
from semivss.inference.keyframes import KeyframePredictor
from semivss.models import build_model
from semivss.models.accel import AccelNet, build_accel
from semivss.models.config import ModelConfig
from semivss.models.flow import DISFlow, TorchFlow, build_flow, compose_flows, resize_flow, warp
from semivss.ops import resize

runner = CliRunner()
C = 4


def _invoke(args: list) -> None:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _texture(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth random texture (uint8 HxWx3) that optical flow can track."""
    import cv2

    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    return cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)


def _tiny_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone="mobilenet_v2", pretrained=None), C).eval()


def _accel(seed: int = 0, random_fusion: bool = True) -> AccelNet:
    net = AccelNet(_tiny_net(seed), _tiny_net(seed + 1), C, update_scale=0.5)
    if random_fusion:
        with torch.no_grad():
            net.fusion.weight.normal_(0, 0.5)
            net.fusion.bias.normal_(0, 0.1)
    return net.eval()


# ---------------------------------------------------------------- warping and flow
def test_warp_by_a_constant_flow_equals_the_hand_shifted_map() -> None:
    score = torch.randn(2, 3, 10, 12)
    flow = torch.zeros(2, 2, 10, 12)
    flow[:, 0], flow[:, 1] = 2.0, -1.0  # each current pixel comes from 2 right, 1 up
    warped, invalid = warp(score, flow)
    # out[y, x] = score[y - 1, x + 2] wherever that is inside the map
    assert torch.allclose(warped[:, :, 1:, :-2], score[:, :, :-1, 2:], atol=1e-5)
    # the rest is filled from the border (border padding) and counted as invalid
    assert torch.allclose(warped[:, :, 0, :-2], score[:, :, 0, 2:], atol=1e-5)
    outside = 1 - (9 * 10) / (10 * 12)
    assert invalid.tolist() == pytest.approx([outside, outside])


def test_warp_rescales_a_full_resolution_flow_to_the_score_map() -> None:
    score = torch.randn(1, 2, 8, 8)
    flow = torch.zeros(1, 2, 32, 32)
    flow[:, 0] = 8.0  # 8 input pixels = 2 score pixels at a quarter of the resolution
    warped, _ = warp(score, flow)
    assert torch.allclose(warped[..., :-2], score[..., 2:], atol=1e-5)
    assert torch.allclose(resize_flow(flow, (8, 8))[:, 0], torch.full((1, 8, 8), 2.0))


def test_zero_flow_warp_is_the_identity() -> None:
    score = torch.randn(1, 5, 7, 9)
    warped, invalid = warp(score, torch.zeros(1, 2, 14, 18))
    assert torch.allclose(warped, score, atol=1e-6) and float(invalid) == 0.0


@pytest.mark.parametrize("preset", ["ultrafast", "fast", "medium"])
def test_dis_flow_recovers_a_known_shift(preset: str) -> None:
    big = _texture(128, 160)
    dx, dy = 3, 2
    previous = big[10:106, 10:138]
    current = big[10 + dy : 106 + dy, 10 + dx : 138 + dx]  # current(x) = previous(x + (dx, dy))
    flow = DISFlow(preset)(to_tensor(current)[None], to_tensor(previous)[None])
    assert flow.shape == (1, 2, 96, 128)
    inner = flow[0, :, 16:-16, 16:-16]
    assert float(inner[0].median()) == pytest.approx(dx, abs=0.25)
    assert float(inner[1].median()) == pytest.approx(dy, abs=0.25)
    # warping the previous frame with it reproduces the current one inside the frame
    warped, _ = warp(to_tensor(previous)[None], flow)
    err = (warped - to_tensor(current)[None])[..., 16:-16, 16:-16].abs().mean()
    assert float(err) < 0.1


def test_dis_flow_on_shrunk_frames_returns_the_shift_in_input_pixels() -> None:
    big = _texture(256, 320)
    dx, dy = 6, 4
    previous = big[20:212, 20:276]
    current = big[20 + dy : 212 + dy, 20 + dx : 276 + dx]
    est = build_flow("dis-fast@0.5")
    assert isinstance(est, DISFlow) and est.scale == 0.5 and est.name == "dis-fast@0.5"
    flow = est(to_tensor(current)[None], to_tensor(previous)[None])
    assert flow.shape == (1, 2, 192, 256)  # the input grid, vectors in input pixels
    inner = flow[0, :, 32:-32, 32:-32]
    assert float(inner[0].median()) == pytest.approx(dx, abs=0.5)
    assert float(inner[1].median()) == pytest.approx(dy, abs=0.5)


@pytest.mark.parametrize("name", ["dis-fast@0", "dis-fast@0.05", "dis-fast@1.5", "dis-fast@half", "dis-fast@"])
def test_a_bad_flow_scale_is_a_config_error(name: str) -> None:
    from semivss.errors import ConfigError

    with pytest.raises(ConfigError, match="scale"):
        build_flow(name)


class ConstantFlowNet(torch.nn.Module):
    """A stand-in for a learned flow network (RAFT, FlowNet): a conv whose output is a constant
    flow at half resolution, in pixels of that grid (what such networks return)."""

    def __init__(self, dx: float, dy: float) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 2, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.copy_(torch.tensor([dx, dy]))
        self.inputs: list[float] = []

    def forward(self, current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        self.inputs.append(float(current.max()))
        x = torch.cat([current, previous], 1)[..., ::2, ::2]
        return self.conv(x)


def test_a_learned_flow_network_plugs_in_through_torchflow() -> None:
    net = ConstantFlowNet(1.5, -0.5)
    flow = TorchFlow(net)(torch.zeros(1, 3, 20, 30), torch.zeros(1, 3, 20, 30))
    # half-resolution flow of (1.5, -0.5) grid pixels = (3, -1) input pixels
    assert flow.shape == (1, 2, 20, 30)
    assert torch.allclose(flow[:, 0], torch.full((1, 20, 30), 3.0)) and torch.allclose(flow[:, 1], torch.full((1, 20, 30), -1.0))
    assert 0.0 <= net.inputs[0] <= 1.0  # frames given as RGB / 255
    # and drives key-frame inference like DIS does
    p = KeyframePredictor(_accel(), EvalConfig(size=(32, 48)), TorchFlow(ConstantFlowNet(0, 0)), interval=3)
    with p.eval_mode():
        labels, _ = p.step(torch.randn(4, 3, 32, 48), (32, 48))
    assert labels.shape == (4, 32, 48) and p.keyframes == 2


def test_composed_flow_of_affine_fields_is_the_hand_computed_one() -> None:
    # older(x) = A x + c and flow(x) = B x + d (pixel coordinates x = (col, row)); bilinear sampling
    # is exact on affine fields, so composed(x) = flow(x) + A (x + flow(x)) + c inside the frame
    h, w = 12, 16
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    A = torch.tensor([[0.05, -0.02], [0.01, 0.03]])
    c = torch.tensor([0.5, -0.25])
    B = torch.tensor([[-0.03, 0.02], [0.04, -0.01]])
    d = torch.tensor([0.75, 0.5])

    def affine(M: torch.Tensor, v: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
        return torch.stack([M[0, 0] * px + M[0, 1] * py + v[0], M[1, 0] * px + M[1, 1] * py + v[1]])[None]

    older, flow = affine(A, c, xs, ys), affine(B, d, xs, ys)
    sx, sy = xs + flow[0, 0], ys + flow[0, 1]
    expected = flow + affine(A, c, sx, sy)
    inside = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
    got = compose_flows(older, flow)
    assert bool(inside[2:-2, 2:-2].all())
    assert torch.allclose(got[..., 2:-2, 2:-2], expected[..., 2:-2, 2:-2], atol=1e-4)
    # two constant flows add up
    one, two = torch.zeros(1, 2, h, w), torch.zeros(1, 2, h, w)
    one[:, 0], two[:, 1] = 1.0, -2.0
    assert torch.allclose(compose_flows(one, two)[..., 3:-3, 3:-3], (one + two)[..., 3:-3, 3:-3])


@pytest.mark.parametrize("propagation", ["chained", "composed"])
def test_propagation_warps_the_key_scores_once_when_composed(propagation: str) -> None:
    """A half-pixel flow per frame at the input grid: composing carries the key frame's scores
    1.5 pixels in one bilinear step (a two-tap average); chaining interpolates three times (a
    four-tap blur)."""
    net = AccelNet(_tiny_net(0), None, C).eval()
    frames = torch.randn(4, 3, 32, 48)
    # ConstantFlowNet returns half-resolution flow: 0.25 grid pixels = 0.5 input pixels
    p = KeyframePredictor(net, EvalConfig(size=(32, 48)), TorchFlow(ConstantFlowNet(0.25, 0)), interval=4,
                          propagation=propagation, warp_at="input")
    with p.eval_mode():
        _, probs = p.step(frames, (32, 48), with_probs=True)
    with torch.no_grad():
        key = resize(net.reference(frames[:1])["logits"], (32, 48))
    assert p.keyframes == 1 and torch.allclose(probs[0], torch.softmax(key, 1)[0], atol=1e-5)
    k = key[0]
    once = 0.5 * (k[..., 1:-1] + k[..., 2:])  # out(x) = key(x + 1.5) for x <= W - 3
    thrice = (k[..., :-3] + 3 * k[..., 1:-2] + 3 * k[..., 2:-1] + k[..., 3:]) / 8  # (1 + z)^3 / 8, x <= W - 4
    logp = torch.log(probs[3])
    got = logp - logp.mean(0)  # the logits up to the softmax's per-pixel shift

    def same(want: torch.Tensor) -> bool:
        return torch.allclose(got[..., : want.shape[-1]], want - want.mean(0), atol=1e-4)

    assert same(once) == (propagation == "composed")
    assert same(thrice) == (propagation == "chained")


class Stripes(torch.nn.Module):
    """Logits that vary fast along x (a sub-pixel misplacement changes them visibly)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        phase = torch.arange(x.shape[-1], dtype=torch.float32) * 0.9
        logits = torch.stack([4 * torch.sin(phase + c) for c in range(C)])[None, :, None, :]
        return {"logits": logits.expand(x.shape[0], C, x.shape[-2], x.shape[-1])}


class SequenceFlow:
    """A flow estimator returning preset flows in call order (one per non-key frame)."""

    def __init__(self, flows: list[torch.Tensor]) -> None:
        self.flows = list(flows)

    def __call__(self, current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return self.flows.pop(0)


def test_composed_propagation_follows_the_flows_in_time_order() -> None:
    """Frame 1 moves by a constant (1, 0), frame 2 by a field varying along x: the key frame's
    scores reach frame 2 through F_2(x) + F_1(x + F_2(x)) = F_2(x) + (1, 0), not F_1 + F_2(x + F_1)."""
    h, w = 32, 48
    xs = torch.arange(w, dtype=torch.float32).expand(h, w)
    f1 = torch.zeros(1, 2, h, w)
    f1[:, 0] = 1.0
    f2 = torch.zeros(1, 2, h, w)
    f2[:, 0] = 0.1 * xs  # 0 .. 4.7 pixels


    net = AccelNet(Stripes(), None, C).eval()
    frames = torch.randn(3, 3, h, w)
    p = KeyframePredictor(net, EvalConfig(size=(h, w)), SequenceFlow([f1, f2]), interval=3,
                          propagation="composed", warp_at="input")
    with p.eval_mode():
        _, probs = p.step(frames, (h, w), with_probs=True)
    with torch.no_grad():
        key = resize(net.reference(frames[:1])["logits"], (h, w))
    right = warp(key, f2 + f1)[0]
    swapped = torch.zeros_like(f2)
    swapped[:, 0] = 1.0 + 0.1 * (xs + 1.0)  # F_1 + F_2(x + F_1): 0.1 pixel further
    wrong = warp(key, swapped)[0]
    inner = (..., slice(None), slice(0, 40))  # sources inside the frame: x + 0.1 x + 1.1 <= 47
    assert torch.allclose(probs[2:][inner], torch.softmax(right, 1)[inner], atol=1e-5)
    assert (probs[2:][inner] - torch.softmax(wrong, 1)[inner]).abs().max() > 0.05


def test_composed_propagation_carries_its_state_across_batches_and_resets_per_video() -> None:
    big = _texture(128, 192, seed=3)
    frames = torch.cat([to_tensor(big[8 + t : 104 + t, 8 + 2 * t : 136 + 2 * t])[None] for t in range(7)])
    net = _accel()

    def run(chunks: list[torch.Tensor]) -> torch.Tensor:
        p = KeyframePredictor(net, EvalConfig(size=(96, 128)), DISFlow("fast"), interval=4,
                              propagation="composed", warp_at="input")
        with p.eval_mode():
            return torch.cat([p.step(c, (96, 128), with_probs=True)[1] for c in chunks])

    whole = run([frames])
    assert torch.allclose(run([frames[:2], frames[2:5], frames[5:]]), whole, atol=1e-5)
    p = KeyframePredictor(net, EvalConfig(size=(96, 128)), DISFlow("fast"), interval=4, propagation="composed")
    with p.eval_mode():
        p.step(frames[:3], (96, 128))
        p.reset()  # a new video: no flow to the old key frame survives
        assert p._flow_to_key is None and p._key_score is None
        _, probs = p.step(frames[3:4], (96, 128), with_probs=True)
    assert p.keyframes == 2
    with torch.no_grad():
        fresh = torch.softmax(resize(net(frames[3:4])["logits"], (96, 128)), 1)
    assert torch.allclose(probs, fresh, atol=1e-5)


def test_unknown_propagation_or_warp_grid_is_a_config_error() -> None:
    from semivss.errors import ConfigError

    with pytest.raises(ConfigError, match="propagation"):
        KeyframePredictor(_accel(), EvalConfig(size=(32, 48)), DISFlow(), interval=2, propagation="cached")
    with pytest.raises(ConfigError, match="warp_at"):
        KeyframePredictor(_accel(), EvalConfig(size=(32, 48)), DISFlow(), interval=2, warp_at="half")


def test_unknown_flow_name_is_a_config_error() -> None:
    from semivss.errors import ConfigError

    with pytest.raises(ConfigError, match="dis-fast"):
        build_flow("raft")


# ---------------------------------------------------------------- the model and key frames
def test_untrained_fusion_is_the_reference_branch() -> None:
    net = _accel(random_fusion=False)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.allclose(net(x)["logits"], net.reference(x)["logits"], atol=1e-5)


def test_k1_accel_equals_fusion_of_reference_and_update_on_every_frame() -> None:
    net = _accel()
    frames = torch.randn(5, 3, 32, 48)
    p = KeyframePredictor(net, EvalConfig(size=(32, 48)), DISFlow("ultrafast"), interval=1)
    with p.eval_mode():
        _, probs = p.step(frames, (40, 60), with_probs=True)
    with torch.no_grad():
        ref = net.reference(frames)["logits"]
        upd = net.update(resize(frames, (16, 24)))["logits"]
        fused = net.fusion(torch.cat([ref, resize(upd, ref.shape[-2:])], 1))
    assert p.keyframes == 5
    assert torch.allclose(probs, torch.softmax(resize(fused, (40, 60)), 1), atol=1e-5)


def test_keyframes_every_k_frames_and_reference_warped_in_between() -> None:
    net = _accel()
    x = torch.randn(1, 3, 32, 48)
    frames = x.repeat(7, 1, 1, 1)  # a still video: the flow is zero and warping changes nothing
    p = KeyframePredictor(net, EvalConfig(size=(32, 48)), DISFlow("fast"), interval=3)
    q = KeyframePredictor(net, EvalConfig(size=(32, 48)), DISFlow("fast"), interval=1)
    with p.eval_mode():
        _, probs = p.step(frames[:4], (32, 48), with_probs=True)
        _, rest = p.step(frames[4:], (32, 48), with_probs=True)  # state carries across batches
        _, every = q.step(frames, (32, 48), with_probs=True)
    assert p.keyframes == 3 and p.frames == 7  # frames 0, 3, 6
    assert torch.allclose(torch.cat([probs, rest]), every, atol=1e-4)
    assert {"reference", "flow", "warp", "update", "fusion"} <= set(p.summary())
    p.reset()
    with p.eval_mode():
        p.step(frames[:1], (32, 48))
    assert p.keyframes == 4  # a new video starts with a key frame


class ZeroFlow:
    """A flow estimator that sees no motion, so warping is the identity."""

    def __call__(self, current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return torch.zeros(current.shape[0], 2, *current.shape[-2:])


class PixelClassifier(torch.nn.Module):
    """Logits at the input resolution from a fixed 1x1 map of the colours (scores move with the image)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv = torch.nn.Conv2d(3, C, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": 3 * self.conv(x)}


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_bidirectional_blends_both_key_frames_by_nearness(batch: int) -> None:
    """Zero flow, K = 3: frame 1 = log(2/3 p0 + 1/3 p3), frame 2 = log(1/3 p0 + 2/3 p3); frames after
    the last key frame come from it alone at the end of the video; whatever the batch size, every frame
    is answered once and in order."""
    from semivss.inference.video_predictor import run_videos

    net = AccelNet(PixelClassifier(), None, C).eval()
    frames = torch.randn(6, 3, 8, 12)
    p = KeyframePredictor(net, EvalConfig(size=(8, 12)), ZeroFlow(), interval=3, bidirectional=True)
    items = list(range(6))
    with p.eval_mode():
        out = list(run_videos(p, items, video=lambda i: "v", image=lambda i: frames[i], out_size=lambda i: (8, 12),
                              batch_size=batch, device="cpu", with_probs=True))
    assert [i for done, _, _ in out for i in done] == items
    probs = torch.cat([pr for _, _, pr in out])
    with torch.no_grad():
        pk = torch.softmax(net.reference(frames)["logits"], 1)
    want = [pk[0], 2 / 3 * pk[0] + 1 / 3 * pk[3], 1 / 3 * pk[0] + 2 / 3 * pk[3], pk[3], pk[3], pk[3]]
    for t, w in enumerate(want):
        assert torch.allclose(probs[t], w, atol=1e-5), t
    assert p.keyframes == 2


def test_bidirectional_carries_the_next_key_frame_back_along_the_motion() -> None:
    """A texture moving 2 px right per frame, scores that move with it, DIS flow: the next key
    frame's scores carried back to a middle frame land where that frame's own scores are, as the
    previous key frame's carried forward do; with the direction reversed they would be 2 px per
    frame off."""
    big = _texture(128, 192, seed=4)
    frames = torch.cat([to_tensor(big[16:112, 40 - 2 * t : 168 - 2 * t])[None] for t in range(5)])
    net = AccelNet(PixelClassifier(), None, C).eval()
    with torch.no_grad():
        own = torch.softmax(net.reference(frames)["logits"], 1)

    def run(bidirectional: bool, interval: int) -> torch.Tensor:
        p = KeyframePredictor(net, EvalConfig(size=(96, 128)), DISFlow("fast"), interval=interval,
                              propagation="composed", warp_at="input", bidirectional=bidirectional)
        with p.eval_mode():
            _, pr = p.step(frames, (96, 128), with_probs=True)
            _, rest = p.finish()
        return torch.cat([pr, rest]) if rest is not None else pr

    inner = (slice(None), slice(12, -12), slice(12, -12))
    both, forward = run(True, 4), run(False, 4)
    err_both = (both[2][inner] - own[2][inner]).abs().mean()
    err_fwd = (forward[2][inner] - own[2][inner]).abs().mean()
    with torch.no_grad():  # what the next key frame's scores give when not moved at all
        stale = (own[4][inner] - own[2][inner]).abs().mean()
    assert err_both < 0.5 * stale and err_both < 2 * err_fwd + 0.01


def test_bidirectional_fuses_each_side_with_the_update_branch() -> None:
    """Zero flow, K = 2, an Accel with a random fusion: frame 1 = 1/2 softmax(fuse(ref_0, upd_1))
    + 1/2 softmax(fuse(ref_2, upd_1)) on the score grid, then resized to the output size."""
    net = _accel()
    frames = torch.randn(3, 3, 32, 48)
    p = KeyframePredictor(net, EvalConfig(size=(32, 48)), ZeroFlow(), interval=2, bidirectional=True)
    with p.eval_mode():
        _, probs = p.step(frames, (40, 60), with_probs=True)
    with torch.no_grad():
        ref = net.reference_scores(frames)
        upd = net.update_scores(frames[1:2], ref.shape[-2:])
        sides = [torch.softmax(net.fuse(ref[k : k + 1], upd), 1) for k in (0, 2)]
        want = torch.softmax(resize((0.5 * sides[0] + 0.5 * sides[1]).log(), (40, 60)), 1)
    assert probs.shape[0] == 3 and torch.allclose(probs[1], want[0], atol=1e-5)


def _count_update_calls(net: AccelNet) -> list[int]:
    """Record the batch size of every call of ``net.update_scores`` (which frames ran the update branch)."""
    calls: list[int] = []
    update_scores = net.update_scores
    net.update_scores = lambda x, size: (calls.append(x.shape[0]), update_scores(x, size))[1]  # type: ignore[method-assign]
    return calls


def test_age_aware_fusion_fuses_only_from_age_n() -> None:
    """Zero flow, K = 4, fuse_from_age 2 (Eq. ACC-5): frames 0 (key) and 1 are the reference alone,
    frames 2 and 3 the fusion of the carried reference with their own update; the update branch
    runs on those two frames only."""
    net = _accel()
    frames = torch.randn(4, 3, 32, 48)
    calls = _count_update_calls(net)
    p = KeyframePredictor(net, EvalConfig(size=(32, 48)), ZeroFlow(), interval=4, fuse_from_age=2)
    with p.eval_mode():
        _, probs = p.step(frames, (40, 60), with_probs=True)
    assert calls == [2] and p.settings()["fuse_from_age"] == 2
    with torch.no_grad():
        ref = net.reference_scores(frames[:1])
        upd = net.update_scores(frames[2:], ref.shape[-2:])
        want = [ref, ref, net.fuse(ref, upd[:1]), net.fuse(ref, upd[1:])]
    for t, z in enumerate(want):
        assert torch.allclose(probs[t], torch.softmax(resize(z, (40, 60)), 1)[0], atol=1e-5), t


def test_age_aware_fusion_on_both_sides_fuses_the_side_that_is_far_enough() -> None:
    """Zero flow, K = 3, both sides, fuse_from_age 2: frame 1 is 1 frame after key frame 0 (not fused)
    and 2 before key frame 3 (fused): 2/3 softmax(ref_0) + 1/3 softmax(fuse(ref_3, upd_1));
    frame 2 the other way round. The update branch runs on frames 1 and 2 only."""
    net = _accel()
    frames = torch.randn(4, 3, 32, 48)
    calls = _count_update_calls(net)
    p = KeyframePredictor(net, EvalConfig(size=(32, 48)), ZeroFlow(), interval=3, bidirectional=True,
                          fuse_from_age=2)
    with p.eval_mode():
        _, probs = p.step(frames, (32, 48), with_probs=True)
    assert calls == [2]
    with torch.no_grad():
        ref = net.reference_scores(frames)
        upd = net.update_scores(frames[1:3], ref.shape[-2:])
        sm = lambda z: torch.softmax(z, 1)  # noqa: E731
        f1 = 2 / 3 * sm(ref[0:1]) + 1 / 3 * sm(net.fuse(ref[3:4], upd[0:1]))
        f2 = 1 / 3 * sm(net.fuse(ref[0:1], upd[1:2])) + 2 / 3 * sm(ref[3:4])
        out = lambda p: sm(resize(p.log(), (32, 48)))[0]  # noqa: E731  blended on the score grid
    assert torch.allclose(probs[1], out(f1), atol=1e-5) and torch.allclose(probs[2], out(f2), atol=1e-5)
    assert torch.allclose(probs[0], out(sm(ref[0:1])), atol=1e-5)


@pytest.mark.parametrize("age", [-1, 3, 4])
def test_fuse_from_age_below_the_interval(age: int) -> None:
    """A negative age, or one at or beyond K (no frame would ever be fused), is a config error."""
    from semivss.errors import ConfigError

    with pytest.raises(ConfigError, match="fuse_from_age"):
        KeyframePredictor(_accel(), EvalConfig(size=(32, 48)), ZeroFlow(), interval=3, fuse_from_age=age)


def test_bidirectional_composes_the_forward_flows_in_time_order() -> None:
    """K = 3, frames 0..3: the next key frame's scores reach frame 1 through G_1(x) + G_2(x + G_1(x))
    (G_t: the flow of frame t towards t + 1); with G_2 = (1, 0) and G_1 varying along x that is
    G_1 + (1, 0), not (1, 0) + G_1(x + 1)."""
    h, w = 32, 48
    xs = torch.arange(w, dtype=torch.float32).expand(h, w)
    zero = torch.zeros(1, 2, h, w)
    g1, g2 = torch.zeros(1, 2, h, w), torch.zeros(1, 2, h, w)
    g1[:, 0] = 0.3 * xs
    g2[:, 0] = 1.0

    net = AccelNet(Stripes(), None, C).eval()
    # call order: backward flows of frames 1 and 2 (zero), then forward flows of frames 1 and 2
    p = KeyframePredictor(net, EvalConfig(size=(h, w)), SequenceFlow([zero, zero, g1, g2]), interval=3,
                          propagation="composed", warp_at="input", bidirectional=True)
    with p.eval_mode():
        _, probs = p.step(torch.randn(4, 3, h, w), (h, w), with_probs=True)
    with torch.no_grad():
        key = net.reference(torch.zeros(1, 3, h, w))["logits"]
    right_flow = g1 + g2
    wrong_flow = g2.clone()
    wrong_flow[:, 0] += 0.3 * (xs + 1.0)

    def blend(flow: torch.Tensor) -> torch.Tensor:
        return 2 / 3 * torch.softmax(key, 1) + 1 / 3 * torch.softmax(warp(key, flow)[0], 1)

    inner = (..., slice(None), slice(0, 30))  # sources inside the frame: 1.3 x + 1.3 <= 47
    assert torch.allclose(probs[1:2][inner], blend(right_flow)[inner], atol=1e-5)
    assert (probs[1:2][inner] - blend(wrong_flow)[inner]).abs().max() > 0.01


def test_delayed_answers_across_videos_batches_and_smoothing() -> None:
    """run_videos with a delaying predictor over two videos and odd batch sizes: every frame
    answered once, in order, each video finished before the next one starts; smoothing around it
    keeps that, and evaluate steps past the last scored frame up to the next key frame."""
    from semivss.inference.video_predictor import TemporalSmoothing, frames_until_last, run_videos

    net = AccelNet(PixelClassifier(), None, C).eval()
    frames = torch.randn(12, 3, 8, 12)
    items = [("a", i) for i in range(7)] + [("b", i) for i in range(5)]
    for base_batch in (1, 3, 4):
        for smooth in (False, True):
            base = KeyframePredictor(net, EvalConfig(size=(8, 12)), ZeroFlow(), interval=3, bidirectional=True)
            pred = TemporalSmoothing(base, 0.3) if smooth else base
            with pred.eval_mode():
                out = list(run_videos(pred, items, video=lambda it: it[0], image=lambda it: frames[items.index(it)],
                                      out_size=lambda it: (8, 12), batch_size=base_batch, device="cpu"))
            answered = [it for done, _, _ in out for it in done]
            assert answered == items
            assert all(len({v for v, _ in done}) == 1 for done, _, _ in out)  # one video per answer
    assert pred.lookahead == 2

    class Refs:
        def __init__(self, v: str, i: int) -> None:
            self.video, self.index, self.ref = v, i, (v, i)

    class VideoSet:
        def video(self, name: str):  # noqa: ANN202
            return type("V", (), {"frames": [Refs(name, i) for i in range(10)]})()

    got = frames_until_last(VideoSet(), [Refs("a", 4)], beyond=2)
    assert got == [("a", i) for i in range(7)]
    assert frames_until_last(VideoSet(), [Refs("a", 8)], beyond=5) == [("a", i) for i in range(10)]


def test_adaptive_keyframes_on_a_scene_cut() -> None:
    a, b = to_tensor(_texture(seed=1))[None], to_tensor(_texture(seed=2))[None]
    frames = torch.cat([a, a, a, b, b, b])  # a cut after frame 2
    net = _accel()
    fixed = KeyframePredictor(net, EvalConfig(size=(96, 128)), DISFlow("fast"), interval=10)
    adaptive = KeyframePredictor(net, EvalConfig(size=(96, 128)), DISFlow("fast"), interval=10,
                                 max_flow=2.0)
    with fixed.eval_mode(), adaptive.eval_mode():
        fixed.step(frames, (96, 128))
        adaptive.step(frames, (96, 128))
    assert fixed.keyframes == 1 and adaptive.keyframes == 2
    # both sides: the key frame at the cut is not carried back into the other scene
    both = KeyframePredictor(net, EvalConfig(size=(96, 128)), DISFlow("fast"), interval=5, max_flow=2.0,
                             bidirectional=True)
    causal = KeyframePredictor(net, EvalConfig(size=(96, 128)), DISFlow("fast"), interval=5, max_flow=2.0)
    with both.eval_mode(), causal.eval_mode():
        _, pb = both.step(frames, (96, 128), with_probs=True)
        _, pc = causal.step(frames, (96, 128), with_probs=True)
        _, rest = both.finish()
    assert rest is not None and torch.allclose(torch.cat([pb, rest]), pc, atol=1e-5)


def test_keyframe_output_reference_uses_the_reference_alone_on_key_frames() -> None:
    net = _accel()
    frames = torch.randn(2, 3, 32, 48)
    p = KeyframePredictor(net, EvalConfig(size=(32, 48)), DISFlow("fast"), interval=1,
                          keyframe_output="reference")
    with p.eval_mode():
        _, probs = p.step(frames, (32, 48), with_probs=True)
    with torch.no_grad():
        ref = resize(net.reference(frames)["logits"], (32, 48))
    assert torch.allclose(probs, torch.softmax(ref, 1), atol=1e-5)


def test_keyframe_inference_refuses_tta() -> None:
    from semivss.errors import ConfigError

    with pytest.raises(ConfigError, match="single-scale"):
        KeyframePredictor(_accel(), EvalConfig(size=(32, 48), flip=True), DISFlow(), interval=2)


def test_build_accel_from_its_record_reloads_the_same_model() -> None:
    net = _accel()
    cfg = ModelConfig(backbone="mobilenet_v2", pretrained=None).model_dump()
    record = net.record(cfg, cfg)
    again = build_accel(json.loads(json.dumps(record)), C)
    again.load_state_dict(net.state_dict())
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.allclose(again.eval()(x)["logits"], net(x)["logits"])


# ---------------------------------------------------------------- training and the command line
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny synthetic set, a per-frame model trained on it, and Accel fusion trained on top."""
    root = tmp_path_factory.mktemp("accel")
    data = root / "synth"
    _invoke(["data", "synth", data, "--videos", "4", "--frames", "12", "--height", "48", "--width", "64", "--seed", "5"])
    base = {
        "data": {"format": "synthetic", "root": str(data), "split": {"mode": "single", "position": 6},
                 "base_size": [48, 64], "crop_size": [48, 64], "scale_range": [1.0, 1.0],
                 "batch_size": 2, "num_workers": 0},
        "model": {"backbone": "mobilenet_v2", "pretrained": None},
        "train": {"log_interval": 2, "eval_interval": 100, "ckpt_interval": 100, "precision": "fp32"},
        "eval": {"size": [48, 64]},
    }
    sup = {**base, "name": "sup", "out_dir": str(root / "sup"), "optim": {"lr": 0.01}, "schedule": {"iters": 4}}
    (root / "sup.yaml").write_text(yaml.safe_dump(sup))
    _invoke(["train", root / "sup.yaml"])
    acc = {**base, "name": "acc", "out_dir": str(root / "acc"), "optim": {"lr": 0.01}, "schedule": {"iters": 4},
           "method": {"name": "accel", "reference": str(root / "sup/model.safetensors"), "max_interval": 3,
                      "keyframe_interval": 3}}
    (root / "acc.yaml").write_text(yaml.safe_dump(acc))
    _invoke(["train", root / "acc.yaml"])
    return {"root": root, "data": data, "sup": root / "sup/model.safetensors", "acc": root / "acc/model.safetensors"}


def test_fusion_training_lowers_its_loss_on_fixed_clips(trained) -> None:
    from semivss.data.batch import LabeledBatch
    from semivss.methods import build_method

    method = build_method("accel", {"reference": str(trained["sup"]), "max_interval": 2}, 8)
    models = method.build_models(lambda: None)
    net = models["accel"]
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["fusion.weight", "fusion.bias"]
    torch.manual_seed(0)
    image = torch.randn(2, 3, 48, 64)
    with torch.no_grad():  # labels the update branch predicts: learnable only by using that branch
        label = resize(net.update_scores(image, (12, 16)), (48, 64)).argmax(1)
    batch = {"labeled": LabeledBatch(image, label, torch.ones(2, 48, 64, dtype=torch.bool),
                                     image[:, None].repeat(1, 2, 1, 1, 1), torch.tensor([[-2, -1]] * 2), None)}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for step in range(30):
        loss = method.training_step(models, batch, step, 30)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    assert not net.reference.training and not net.update.training  # frozen branches stay in eval mode


def test_min_interval_zero_adds_clips_of_the_labeled_frame_alone(trained) -> None:
    """k = 0: no warping, the loss is that of the per-frame Accel (fusion of both branches on the
    labeled frame); the official range stays 1..max_interval."""
    from semivss.data.batch import LabeledBatch
    from semivss.methods import build_method
    from semivss.methods.base import seg_ce_loss

    official = build_method("accel", {"reference": str(trained["sup"]), "max_interval": 2}, 8)
    assert {official._interval(s) for s in range(60)} == {1, 2}
    method = build_method("accel", {"reference": str(trained["sup"]), "max_interval": 2, "min_interval": 0}, 8)
    assert {method._interval(s) for s in range(60)} == {0, 1, 2}
    step = next(s for s in range(60) if method._interval(s) == 0)
    models = method.build_models(lambda: None)
    torch.manual_seed(0)
    image = torch.randn(2, 3, 48, 64)
    label = torch.randint(0, 8, (2, 48, 64))
    context = torch.randn(2, 2, 3, 48, 64)  # not used when k = 0
    batch = {"labeled": LabeledBatch(image, label, torch.ones(2, 48, 64, dtype=torch.bool), context,
                                     torch.tensor([[-2, -1]] * 2), None)}
    out = method.training_step(models, batch, step, 60)
    with torch.no_grad():
        expected = seg_ce_loss(models["accel"](image)["logits"], label, 255)
    assert float(out["k"]) == 0.0
    torch.testing.assert_close(out["loss"].detach(), expected)


def test_preceding_context_is_the_clip_before_the_labeled_frame(trained) -> None:
    from semivss.data.clips import LabeledClips
    from semivss.data.formats import load_dataset
    from semivss.data.transforms import ClipAugment
    from semivss.data.video import FrameRef

    vs = load_dataset("synthetic", trained["data"], "train")
    aug = ClipAugment(base_size=(48, 64), crop_size=(48, 64), scale_range=(1.0, 1.0), hflip=False)
    video = vs.videos[0]
    assert all(f.label is not None for f in video.frames)  # every synthetic frame is annotated
    refs = [FrameRef(video.name, video.frames[6].index), FrameRef(video.name, video.frames[1].index)]
    ds = LabeledClips(vs, refs, aug, context_frames=3, context_preceding=True)
    item = ds[(0, 7)]
    assert item.context_offset.tolist() == [-3, -2, -1]
    expect = [to_tensor(vs.read_image(video.frames[p])) for p in (3, 4, 5)]
    assert all(torch.allclose(item.context[i], expect[i], atol=1e-5) for i in range(3))
    # near the start of the video the first frame stands in for the missing predecessors
    assert ds[(1, 7)].context_offset.tolist() == [-1, -1, -1]


def test_exported_accel_reloads_as_a_keyframe_predictor(trained) -> None:
    from semivss.experiment import load_trained_model
    from semivss.inference.predict import as_predictor

    model, meta = load_trained_model(trained["acc"])
    assert isinstance(model, AccelNet) and meta["export"]["arch"]["kind"] == "accel"
    assert model.update_scale == 0.5 and model.keyframe_interval == 3
    pred = as_predictor(model, EvalConfig(size=(48, 64)))
    assert isinstance(pred, KeyframePredictor) and pred.interval == 3


def _video_benchmark() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "video_inference.py"
    spec = importlib.util.spec_from_file_location("video_inference_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_video_benchmark_rows_score_what_evaluate_scores(trained, tmp_path: Path, capsys) -> None:
    """benchmarks/video_inference.py: every row group, fusion ages, the record; each row's mIoU is
    the one `semivss evaluate` gives for the same predictor (the timing proxy changes nothing)."""
    bench = _video_benchmark()
    common = ["--data", str(trained["data"]), "--format", "synthetic", "--split", "val", "--no-amp",
              "--flow", "dis-ultrafast"]
    rec = tmp_path / "rec.json"
    assert bench.main([str(trained["acc"]), *common, "--intervals", "1,3", "--fuse-from-ages", "0,2",
                       "--out", str(rec)]) == 0
    record = json.loads(rec.read_text())
    rows = {r["row"]: r for r in record["rows"]}
    assert list(rows) == ["per-frame reference", "per-frame update (x0.5 input)", "Accel K=1", "Accel K=3",
                          "Accel K=3, fused from age 2", "reference + flow K=3"]
    assert rows["per-frame reference"]["speedup_vs_reference"] == 1.0
    assert all(r["frames"] == 12 and r["fps"] > 0 for r in rows.values())
    assert rows["Accel K=3"]["keyframes"] == 4 and rows["Accel K=1"]["keyframes"] == 12
    assert set(rows["Accel K=3"]["stage_seconds"]) >= {"reference", "update", "flow", "warp", "fusion"}
    assert record["fuse_from_ages"] == [0, 2] and record["frames"] == 12 and record["precision"] == "fp32"

    def evaluated(ckpt: Path, *opts: str) -> float:
        out = tmp_path / f"eval-{len(list(tmp_path.iterdir()))}"
        _invoke(["evaluate", ckpt, "--data", trained["data"], "--format", "synthetic", "--split", "val",
                 "--flow", "dis-ultrafast", *opts, "--out", out])
        return json.loads((out / "metrics.json").read_text())["metrics"]["mIoU"]

    assert rows["Accel K=3"]["mIoU"] == pytest.approx(evaluated(trained["acc"], "--keyframe-interval", "3"), abs=1e-9)
    assert rows["Accel K=3, fused from age 2"]["mIoU"] == pytest.approx(
        evaluated(trained["acc"], "--keyframe-interval", "3", "--fuse-from-age", "2"), abs=1e-9)
    assert rows["reference + flow K=3"]["mIoU"] == pytest.approx(
        evaluated(trained["sup"], "--keyframe-interval", "3"), abs=1e-9)
    # bad options stop before any row runs, with exit code 2 and the reason
    capsys.readouterr()
    assert bench.main([str(trained["acc"]), *common, "--intervals", "3", "--fuse-from-ages", "3"]) == 2
    assert "--fuse-from-ages" in capsys.readouterr().err
    assert bench.main([str(trained["acc"]), *common, "--rows", "per-frame,bogus"]) == 2
    assert "--rows" in capsys.readouterr().err
    assert bench.main([str(trained["sup"]), *common]) == 2
    assert "not an Accel model" in capsys.readouterr().err


def test_keyframe_evaluate_and_predict_through_the_cli(trained, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    _invoke(["evaluate", trained["acc"], "--data", trained["data"], "--format", "synthetic", "--split", "val",
             "--keyframe-interval", "4", "--smooth", "0.5", "--out", out])
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert 0.0 <= m["mIoU"] <= 1.0 and m["n_frames"] == 12
    # a per-frame checkpoint with --keyframe-interval: flow propagation of its scores
    out2 = tmp_path / "eval2"
    _invoke(["evaluate", trained["sup"], "--data", trained["data"], "--format", "synthetic", "--split", "val",
             "--keyframe-interval", "3", "--keyframe-max-invalid", "0.5", "--flow", "dis-ultrafast",
             "--propagation", "composed", "--warp-at", "input", "--out", out2])
    written = json.loads((out2 / "metrics.json").read_text())
    assert written["metrics"]["n_frames"] == 12
    # the file says what was scored and how: the options the predictor ran with, defaults included
    assert (written["split"], written["format"], written["checkpoint"]) == ("val", "synthetic", str(trained["sup"]))
    assert written["video"] == {"keyframe_interval": 3, "flow": "dis-ultrafast", "keyframe_max_flow": None,
                                "keyframe_max_invalid": 0.5, "keyframe_output": "fuse", "propagation": "composed",
                                "warp_at": "input", "bidirectional": False, "fuse_from_age": 0}
    # offline: both sides of each key frame, every annotated frame answered once
    out3 = tmp_path / "eval3"
    _invoke(["evaluate", trained["acc"], "--data", trained["data"], "--format", "synthetic", "--split", "val",
             "--keyframe-interval", "4", "--bidirectional", "--fuse-from-age", "2", "--out", out3])
    both = json.loads((out3 / "metrics.json").read_text())
    assert both["metrics"]["n_frames"] == 12 and both["video"]["bidirectional"] is True
    assert both["video"]["fuse_from_age"] == 2
    accel_video = json.loads((out / "metrics.json").read_text())["video"]
    assert (accel_video["keyframe_interval"], accel_video["propagation"], accel_video["warp_at"]) == (4, "chained", "score")
    assert accel_video["smooth"] == 0.5  # the smoothing around the key-frame predictor is recorded too
    # key-frame options on a per-frame model without --keyframe-interval are refused
    alone = runner.invoke(app, ["evaluate", str(trained["sup"]), "--data", str(trained["data"]), "--format",
                                "synthetic", "--split", "val", "--propagation", "composed", "--out", str(tmp_path / "x")])
    assert alone.exit_code != 0 and "--keyframe-interval" in str(alone.exception)
    bad = runner.invoke(app, ["evaluate", str(trained["sup"]), "--data", str(trained["data"]), "--format", "synthetic",
                              "--split", "val", "--keyframe-interval", "2", "--ensemble", str(trained["sup"]),
                              "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "not an --ensemble" in str(bad.exception)
    no_update = runner.invoke(app, ["evaluate", str(trained["sup"]), "--data", str(trained["data"]), "--format",
                                    "synthetic", "--split", "val", "--keyframe-interval", "3", "--fuse-from-age", "2",
                                    "--out", str(tmp_path / "no-update")])
    assert no_update.exit_code != 0 and "--fuse-from-age" in str(no_update.exception)
    alone = runner.invoke(app, ["evaluate", str(trained["sup"]), "--data", str(trained["data"]), "--format",
                                "synthetic", "--split", "val", "--fuse-from-age", "2", "--out", str(tmp_path / "y")])
    assert alone.exit_code != 0 and "needs an Accel model" in str(alone.exception)  # not ignored


def _peak_rss_of_predict(acc: Path, frames: int, tmp: Path) -> int:
    """Peak resident memory (kB) of a fresh process predicting a generated mp4 of ``frames``
    frames with key-frame inference."""
    script = textwrap.dedent(f"""
        import resource, numpy as np
        from semivss.inference.writers import Mp4Writer
        from semivss.cli import main
        import sys
        rng = np.random.default_rng(0)
        base = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
        with Mp4Writer({str(tmp / 'in.mp4')!r}, fps=15) as w:
            for t in range({frames}):
                w.write(np.roll(base, t, axis=1))
        sys.argv = ["semivss", "predict", {str(acc)!r}, {str(tmp / 'in.mp4')!r}, {str(tmp / 'out')!r},
                    "--keyframe-interval", "5", "--device", "cpu"]
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp)}, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp / "out/labels").glob("*.png"))) == frames
    return int(res.stdout.split("PEAK")[-1].split()[0])


def test_streaming_keyframe_predict_memory_is_flat_in_video_length(trained, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    short = _peak_rss_of_predict(trained["acc"], 40, tmp_path / "a")
    long = _peak_rss_of_predict(trained["acc"], 200, tmp_path / "b")
    # 160 more frames of 240x320 RGB are 37 MB: keeping one copy of each frame would show
    assert long - short < 15_000, (short, long)
