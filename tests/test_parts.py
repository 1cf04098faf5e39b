"""Reusable parts of the online pseudo-label methods: entropy split, EMA, CutMix, memory bank,
U2PL contrastive loss (docs/methods.md#4-u2pl)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semivss.errors import DataError
from semivss.methods.parts import (
    ClassMemoryBank,
    EMATeacher,
    alpha_schedule,
    apply_cutmix,
    average_buffers,
    batch_cutmix_boxes,
    box_mix_mask,
    class_ranks,
    cutmix_box,
    ema_decay,
    ema_update,
    entropy,
    entropy_rank_mask,
    ignore_invalid,
    make_teacher,
    reliability_split,
    roll_permutation,
    u2pl_contrastive_loss,
    u2pl_negative_masks,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ entropy / reliability
def test_entropy_hand_values() -> None:
    prob = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    ent = entropy(prob.view(3, 4, 1, 1))[:, 0, 0]
    assert torch.allclose(ent, torch.tensor([math.log(4), 0.0, math.log(2)]), atol=1e-6)


def test_alpha_schedule_is_linear_decay() -> None:
    assert alpha_schedule(0, 100) == 20.0
    assert alpha_schedule(25, 100) == pytest.approx(15.0)
    assert alpha_schedule(100, 100) == 0.0
    assert alpha_schedule(10, 40, alpha0=40.0) == pytest.approx(30.0)


@pytest.mark.parametrize("alpha", [0.0, 7.5, 20.0, 33.3, 50.0, 100.0])
def test_reliability_split_keeps_exactly_the_intended_share(alpha: float) -> None:
    g = gen(1)
    # quantised entropies: many ties, which a percentile threshold would not split exactly
    ent = torch.randint(0, 5, (3, 7, 9), generator=g).float() / 4
    valid = torch.rand(3, 7, 9, generator=g) > 0.2
    n_valid = int(valid.sum())
    reliable, unreliable = reliability_split(ent, alpha, valid)
    k = int(math.floor(alpha / 100 * n_valid + 0.5))
    assert int(unreliable.sum()) == k
    assert int(reliable.sum()) == n_valid - k
    assert not (reliable & unreliable).any()
    assert not ((reliable | unreliable) & ~valid).any()  # invalid pixels in neither set
    if 0 < k < n_valid:  # the unreliable pixels are the highest-entropy ones
        assert ent[unreliable].min() >= ent[reliable].max()
    low = entropy_rank_mask(ent, alpha, valid, highest=False)
    assert int(low.sum()) == k and not (low & ~valid).any()
    if 0 < k < n_valid:
        assert ent[low].max() <= ent[valid & ~low].min()


def test_reliability_split_without_mask_counts_the_batch() -> None:
    ent = torch.arange(20.0).view(2, 2, 5)
    reliable, unreliable = reliability_split(ent, 20.0)
    assert unreliable.sum() == 4 and set(ent[unreliable].tolist()) == {16.0, 17.0, 18.0, 19.0}
    assert reliable.sum() == 16
    with pytest.raises(ValueError, match="percent"):
        reliability_split(ent, 120.0)


# ------------------------------------------------------------------ EMA
class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_ema_decay_formula() -> None:
    assert ema_decay(0) == 0.0
    assert ema_decay(1) == pytest.approx(0.5)
    assert ema_decay(4) == pytest.approx(0.8)
    assert ema_decay(1000) == 0.99
    assert ema_decay(500, max_decay=0.999) == pytest.approx(1 - 1 / 501)


def test_ema_update_matches_formula_and_keeps_the_teachers_buffers() -> None:
    """Parameters follow t = d t + (1 - d) s; BatchNorm statistics stay the teacher's own
    (docs/methods.md#43-ema-teacher: EMA over parameters) unless copy_buffers makes the teacher a full copy."""
    torch.manual_seed(0)
    student = _BNNet()
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student(torch.randn(4, 2, 3, 3))  # changes the student's BN running statistics
    teacher(torch.randn(4, 2, 3, 3))  # and the teacher's own, differently
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    decay = EMATeacher(0.99).update(teacher, student, step=4)
    assert decay == pytest.approx(0.8)
    s_state = student.state_dict()
    for name, _ in student.named_parameters():
        expected = 0.8 * before[name] + 0.2 * s_state[name]
        assert torch.allclose(teacher.state_dict()[name], expected, atol=1e-6), name
    for name, _ in student.named_buffers():
        assert torch.equal(teacher.state_dict()[name], before[name]), name
    assert not torch.equal(before["bn.running_mean"], s_state["bn.running_mean"])
    ema_update(teacher, student, step=0, copy_buffers=True)  # decay 0 + buffers: the student
    for name, value in teacher.state_dict().items():
        assert torch.allclose(value.float(), s_state[name].float()), name


def _average_buffers_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        net = _BNNet()
        with torch.no_grad():
            net.bn.running_mean.fill_(float(rank))  # rank 0: 0, rank 1: 1
            net.bn.running_var.fill_(2.0 + 2 * rank)  # 2, 4
            net.bn.num_batches_tracked.fill_(7)
        average_buffers(net)
        torch.save({k: v for k, v in net.bn.state_dict().items()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_average_buffers_over_two_gloo_ranks(tmp_path) -> None:
    """Under DDP the teachers' BatchNorm statistics become the mean over the ranks."""
    import torch.multiprocessing as mp

    mp.spawn(_average_buffers_worker, args=(f"file://{tmp_path}/store", str(tmp_path)), nprocs=2)
    for rank in range(2):
        bn = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(bn["running_mean"], torch.full((3,), 0.5))
        assert torch.equal(bn["running_var"], torch.full((3,), 3.0))
        assert int(bn["num_batches_tracked"]) == 7
    net = _BNNet()
    ref = {k: v.clone() for k, v in net.state_dict().items()}
    average_buffers(net)  # no process group: nothing changes
    assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())


# ------------------------------------------------------------------ CutMix
def _is_one_rectangle(mask: torch.Tensor) -> bool:
    ys, xs = mask.nonzero(as_tuple=True)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return bool(box.all()) and int(box.numel()) == int(mask.sum())


def test_cutmix_box_u2pl_rule_is_half_the_image() -> None:
    g = gen(3)
    h, w = 24, 40
    for _ in range(20):
        m = cutmix_box(h, w, p=1.0, area=0.5, generator=g)
        assert _is_one_rectangle(m)
        bw = int(m.any(0).sum())
        assert w // 2 < bw < w
        assert abs(int(m.sum()) - h * w / 2) <= bw / 2 + 1e-9  # height rounded from area / width
    assert not cutmix_box(h, w, p=0.0, generator=g).any()
    a = cutmix_box(h, w, p=1.0, generator=gen(9))
    b = cutmix_box(h, w, p=1.0, generator=gen(9))
    assert torch.equal(a, b)


def test_cutmix_box_unimatch_rule_and_probability() -> None:
    g = gen(4)
    h = w = 64
    masks = batch_cutmix_boxes(200, h, w, p=0.5, area=(0.02, 0.4), ratio=(0.3, 1 / 0.3), generator=g)
    nonempty = [m for m in masks if m.any()]
    assert 70 < len(nonempty) < 130  # p = 0.5
    for m in nonempty:
        assert _is_one_rectangle(m)
        assert int(m.sum()) <= 0.4 * h * w + 1e-9
        assert int(m.sum()) >= 0.3 * 0.02 * h * w  # int() truncation of both sides


def test_apply_cutmix_mixes_image_label_and_confidence_with_one_box() -> None:
    g = gen(5)
    b, h, w = 3, 8, 10
    image = torch.randn(b, 3, h, w, generator=g)
    label = torch.randint(0, 5, (b, h, w), generator=g)
    conf = torch.rand(b, h, w, generator=g)
    box = batch_cutmix_boxes(b, h, w, p=1.0, area=0.5, generator=g)
    perm = roll_permutation(b)
    assert perm.tolist() == [1, 2, 0]
    mi, ml, mc = apply_cutmix(image, label, conf, box, perm)
    assert mi is not None and ml is not None and mc is not None
    for i in range(b):
        j = int(perm[i])
        inside, outside = box[i], ~box[i]
        assert _is_one_rectangle(inside)
        for src, out in ((image, mi), (label, ml), (conf, mc)):
            o, s_i, s_j = out[i], src[i], src[j]
            if o.dim() == 3:  # image: every channel follows the same box
                assert torch.equal(o[:, inside], s_j[:, inside]) and torch.equal(o[:, outside], s_i[:, outside])
            else:
                assert torch.equal(o[inside], s_j[inside]) and torch.equal(o[outside], s_i[outside])
    only_label = apply_cutmix(None, label, None, box, perm)
    assert only_label[0] is None and only_label[2] is None and torch.equal(only_label[1], ml)
    with pytest.raises(ValueError, match="does not match box_mask"):
        apply_cutmix(image[:, :, :4], None, None, box, perm)


def test_box_mix_mask_cps_generator() -> None:
    m1 = box_mix_mask(32, 48, n_boxes=1, prop_range=(0.25, 0.5), generator=gen(6))
    assert _is_one_rectangle(m1)
    assert 0.2 * 32 * 48 <= int(m1.sum()) <= 0.55 * 32 * 48
    m3 = box_mix_mask(32, 48, generator=gen(7))
    assert torch.equal(m3, box_mix_mask(32, 48, generator=gen(7)))
    assert 0 < int(m3.sum()) <= 0.5 * 32 * 48 + 3 * 48  # toggled boxes never exceed their total area
    assert not box_mix_mask(8, 8, prop_range=(0.0, 0.0), generator=gen(0)).any()


# ------------------------------------------------------------------ memory bank
def test_memory_bank_fifo_and_state_round_trip() -> None:
    bank = ClassMemoryBank(3, None, size=5)
    bank.push(0, torch.arange(8.0).view(4, 2))
    bank.push(0, torch.arange(8.0, 14.0).view(3, 2))
    assert bank.count(0) == 5 and bank.dim == 2
    assert bank.features(0)[:, 0].tolist() == [4.0, 6.0, 8.0, 10.0, 12.0]  # the newest 5 rows
    bank.push(2, torch.ones(1, 2))
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = ClassMemoryBank(3, None, size=5)
    other.load_state_dict(state)
    for c in range(3):
        assert torch.equal(other.features(c), bank.features(c))
    assert torch.equal(bank.sample(0, 7, gen(2)), other.sample(0, 7, gen(2)))
    with pytest.raises(DataError, match="ckpt.pt: state has 3 classes"):
        ClassMemoryBank(4).load_state_dict(state, where="ckpt.pt")
    with pytest.raises(ValueError, match="dim 3"):
        bank.push(1, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="empty"):
        bank.sample(1, 2)


# ------------------------------------------------------------------ contrastive loss
def _infonce(anchor: np.ndarray, pos: np.ndarray, negs: list[np.ndarray], t: float) -> float:
    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    logits = np.array([cos(anchor, pos)] + [cos(anchor, n) for n in negs]) / t
    return float(-logits[0] + np.log(np.exp(logits).sum()))


def _pixels(*vectors: list[float]) -> torch.Tensor:
    """(1, D, 1, P) feature map from P D-dim vectors."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, -1, 1, len(vectors))


def test_cosine_logits_equal_torch_cosine_similarity_with_gradients() -> None:
    from semivss.methods.parts.contrastive import cosine_logits

    gen = torch.Generator().manual_seed(0)
    anchor = torch.randn(7, 5, generator=gen, requires_grad=True)
    keys = torch.randn(7, 4, 5, generator=gen)
    keys[0, 1] *= 1e-3  # a short vector
    ref = F.cosine_similarity(anchor.unsqueeze(1), keys, dim=2) / 0.5
    out = cosine_logits(anchor, keys, 0.5)
    torch.testing.assert_close(out, ref)
    w = torch.randn(7, 4, generator=gen)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), anchor)
    (g_out,) = torch.autograd.grad((out * w).sum(), anchor)
    torch.testing.assert_close(g_out, g_ref)


def test_contrastive_loss_equals_hand_computation() -> None:
    # one labeled image of two pixels: pixel 0 is class 0, pixel 1 is class 1 (2 classes, 4-d)
    a0, a1 = [1.0, 0.5, 0.0, -0.2], [0.1, 1.0, 0.3, 0.0]
    t0, t1 = [0.8, 0.2, 0.1, 0.0], [0.0, 0.9, 0.5, 0.1]
    rep = _pixels(a0, a1).requires_grad_()
    rep_t = _pixels(t0, t1)
    prob = torch.tensor([[0.9, 0.2], [0.1, 0.8]]).view(1, 2, 1, 2)
    label = torch.tensor([[[0, 1]]])
    ones = torch.ones(1, 1, 2, dtype=torch.bool)
    bank = ClassMemoryBank(2, 4, size=10)
    loss = u2pl_contrastive_loss(
        rep, rep_t, prob, label, ones, ones, torch.tensor([True]), bank,
        num_anchors=3, num_negatives=2, temperature=0.5, generator=gen(0),
    )
    # labeled negatives of class c: pixels NOT labeled c with c among their top-3 classes
    assert torch.equal(bank.features(0), torch.tensor([t1]))
    assert torch.equal(bank.features(1), torch.tensor([t0]))
    n0, n1 = np.array(t1), np.array(t0)
    expected = (
        _infonce(np.array(a0), np.array(t0), [n0, n0], 0.5)
        + _infonce(np.array(a1), np.array(t1), [n1, n1], 0.5)
    ) / 2
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert rep.grad is not None and rep.grad.abs().sum() > 0


def test_contrastive_loss_indexes_prototypes_by_class_id() -> None:
    # classes 1 and 3 of 4 present (issue #111: the loop counter would pick classes 0 and 1)
    a0, a1 = [1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.5]
    t0, t1 = [0.9, 0.1, 0.4, 0.0], [0.2, 0.8, 0.1, 0.6]
    rep, rep_t = _pixels(a0, a1), _pixels(t0, t1)
    prob = torch.tensor([[0.05, 0.6, 0.15, 0.2], [0.05, 0.25, 0.1, 0.6]]).T.reshape(1, 4, 1, 2)
    label = torch.tensor([[[1, 3]]])
    ones = torch.ones(1, 1, 2, dtype=torch.bool)
    bank = ClassMemoryBank(4, 4, size=10)
    loss = u2pl_contrastive_loss(
        rep, rep_t, prob, label, ones, ones, torch.tensor([True]), bank,
        num_anchors=2, num_negatives=3, temperature=0.5, generator=gen(1),
    )
    assert bank.count(0) == 0 and bank.count(2) == 2  # class 2 is in both pixels' top 3
    expected = (
        _infonce(np.array(a0), np.array(t0), [np.array(t1)] * 3, 0.5)
        + _infonce(np.array(a1), np.array(t1), [np.array(t0)] * 3, 0.5)
    ) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def _brute_force_negatives(prob, label, cand, is_labeled, c, lo, hi):  # type: ignore[no-untyped-def]
    """Independent oracle: per-pixel python loops over sorted class lists."""
    b, n_cls, h, w = prob.shape
    out = set()
    for i in range(b):
        for y in range(h):
            for x in range(w):
                lab = int(label[i, y, x])
                if not cand[i, y, x] or lab == 255 or lab == c:
                    continue
                order = sorted(range(n_cls), key=lambda k: -float(prob[i, k, y, x]))
                r = order.index(c)
                if (r < lo) if is_labeled[i] else (lo <= r < hi):
                    out.add((i, y, x))
    return out


def test_negatives_never_contain_pixels_labeled_c_and_match_oracle() -> None:
    g = gen(11)
    b, n_cls, h, w = 4, 7, 5, 6
    prob = torch.softmax(torch.randn(b, n_cls, h, w, generator=g) * 2, dim=1)
    label = prob.argmax(1)
    label[:2] = torch.randint(0, n_cls, (2, h, w), generator=g)  # labeled: GT differs from argmax
    label[0, 0, :3] = 255
    cand = torch.rand(b, h, w, generator=g) > 0.3
    cand[:2] = True
    is_labeled = torch.tensor([True, True, False, False])
    # teacher features encode the pixel: one-hot over the b*h*w pixels
    d = b * h * w
    rep_t = torch.eye(d).T.reshape(d, b, h, w).permute(1, 0, 2, 3).contiguous()
    rep = torch.randn(b, d, h, w, generator=g)
    bank = ClassMemoryBank(n_cls, d, size=10_000)
    u2pl_contrastive_loss(
        rep, rep_t, prob, label, torch.ones(b, h, w, dtype=torch.bool), cand, is_labeled, bank,
        num_anchors=4, num_negatives=2, low_rank=2, high_rank=5, generator=g,
    )
    masks = u2pl_negative_masks(prob, label, cand, is_labeled, low_rank=2, high_rank=5)
    labeled_negatives = 0
    for c in range(n_cls):
        stored = bank.features(c)
        pixels = {np.unravel_index(int(k), (b, h, w)) for k in stored.argmax(1)}
        pixels = {tuple(int(v) for v in p) for p in pixels}
        assert all(int(label[p]) != c for p in pixels), f"class {c} negative labeled {c}"
        oracle = _brute_force_negatives(prob, label, cand, is_labeled, c, 2, 5)
        assert pixels == oracle and len(stored) == len(oracle)
        assert {tuple(int(v) for v in p) for p in masks[:, c].nonzero().tolist()} == oracle
        labeled_negatives += sum(1 for p in pixels if p[0] < 2)
    assert labeled_negatives > 0  # the official code (issue #171) gets none


def test_class_ranks() -> None:
    prob = torch.tensor([0.1, 0.5, 0.15, 0.25]).view(1, 4, 1, 1)
    assert class_ranks(prob).flatten().tolist() == [3, 0, 2, 1]


def test_contrastive_loss_single_class_is_zero_with_graph() -> None:
    rep = torch.randn(1, 4, 1, 3, requires_grad=True)
    prob = torch.tensor([[0.9, 0.1]] * 3).T.reshape(1, 2, 1, 3)
    loss = u2pl_contrastive_loss(
        rep, rep.detach(), prob, torch.zeros(1, 1, 3, dtype=torch.long),
        torch.ones(1, 1, 3, dtype=torch.bool), torch.ones(1, 1, 3, dtype=torch.bool),
        torch.tensor([True]), ClassMemoryBank(2), generator=gen(0),
    )
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert rep.grad is not None and float(rep.grad.abs().sum()) == 0.0


def test_contrastive_sampling_is_reproducible_with_a_generator() -> None:
    g = gen(12)
    b, c, h, w, d = 2, 3, 4, 4, 8
    rep = torch.randn(b, d, h, w, generator=g)
    rep_t = torch.randn(b, d, h, w, generator=g)
    prob = torch.softmax(torch.randn(b, c, h, w, generator=g), 1)
    label = torch.randint(0, c, (b, h, w), generator=g)
    ones = torch.ones(b, h, w, dtype=torch.bool)
    lab = torch.tensor([True, False])
    kw = dict(num_anchors=5, num_negatives=4, low_rank=1, high_rank=3)
    bank_a, bank_b = ClassMemoryBank(c), ClassMemoryBank(c)
    la = u2pl_contrastive_loss(rep, rep_t, prob, label, ones, ones, lab, bank_a, generator=gen(3), **kw)
    lb = u2pl_contrastive_loss(rep, rep_t, prob, label, ones, ones, lab, bank_b, generator=gen(3), **kw)
    lc = u2pl_contrastive_loss(rep, rep_t, prob, label, ones, ones, lab, ClassMemoryBank(c),
                               generator=gen(4), **kw)
    assert float(la) == float(lb) and float(la) > 0
    assert float(la) != float(lc)


# ------------------------------------------------------------------ padding masks
def test_ignore_invalid_sets_the_ignore_label() -> None:
    target = torch.tensor([[[0, 1], [2, 3]]])
    valid = torch.tensor([[[True, False], [False, True]]])
    assert ignore_invalid(target, valid).tolist() == [[[0, 255], [255, 3]]]
    with pytest.raises(ValueError, match="does not match"):
        ignore_invalid(target, valid[:, :1])


def test_cutmix_carries_the_padding_mask_with_the_box() -> None:
    """A pasted padded region stays invalid; a pasted frame region becomes valid."""
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[1, :, 2:] = False  # sample 1: right half padded
    label = torch.arange(2).view(2, 1, 1).expand(2, 4, 4).clone()
    box = torch.zeros(2, 4, 4, dtype=torch.bool)
    box[0, 1:3, 1:4] = True  # sample 0 pastes columns 1..3 of sample 1
    box[1, :, 3] = True  # sample 1 pastes column 3 of sample 0
    perm = roll_permutation(2)
    _, mixed_label, mixed_valid = apply_cutmix(None, label, valid, box, perm)
    assert mixed_valid is not None and mixed_valid.dtype == torch.bool
    expected0 = torch.ones(4, 4, dtype=torch.bool)
    expected0[1:3, 2:4] = False  # the padded part of the pasted box
    expected1 = torch.tensor([[False, False, False, True]] * 4) | torch.tensor([True, True, False, False])
    assert torch.equal(mixed_valid[0], expected0) and torch.equal(mixed_valid[1], expected1)
    assert torch.equal(apply_cutmix(None, valid, None, box, perm)[1], mixed_valid)  # as a label too
    assert mixed_label is not None and torch.equal(mixed_label[0][box[0]], torch.ones(6, dtype=torch.long))
