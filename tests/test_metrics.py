"""Metrics: confusion matrix vs the official Cityscapes evaluator, fwIoU and VC_n vs plain loop
re-implementations of the VSPW definitions (docs/methods.md#9-metrics), and the offset analysis."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from semivss.data.video import FrameRef
from semivss.errors import DataError
from semivss.metrics import (
    ConfusionMatrix,
    OffsetTable,
    VideoConsistency,
    metrics_from_matrix,
    offset_table,
    offset_table_text,
    plot_offsets,
    save_offset_tables,
    vc_window_scores,
    video_consistency,
)

# ----------------------------------------------------------------------------- oracles


def oracle_scores(preds: list[np.ndarray], gts: list[np.ndarray], c: int) -> dict:
    """Per-class loop over the pixels of every image (VSPW / docs/methods.md#9-metrics definitions)."""
    tp = np.zeros(c)
    fp = np.zeros(c)
    fn = np.zeros(c)
    gt_count = np.zeros(c)
    for p, g in zip(preds, gts):
        valid = g != 255
        for k in range(c):
            tp[k] += np.sum((p == k) & (g == k))
            fp[k] += np.sum((p == k) & (g != k) & valid)
            fn[k] += np.sum((p != k) & (g == k))
            gt_count[k] += np.sum(g == k)
    iou = [tp[k] / (tp[k] + fp[k] + fn[k]) if tp[k] + fp[k] + fn[k] else math.nan for k in range(c)]
    present = [k for k in range(c) if gt_count[k] > 0]
    total = gt_count.sum()
    return {
        "iou": iou,
        "mIoU": sum(iou[k] for k in present) / len(present) if present else math.nan,
        "fwIoU": sum(gt_count[k] / total * iou[k] for k in present) if total else math.nan,
        "pixel_acc": tp.sum() / total if total else math.nan,
    }


def oracle_vc_windows(preds: list[np.ndarray], gts: list[np.ndarray], n: int) -> list[float]:
    """The official VSPW loop: windows i in range(T - n), frames i..i+n-1 compared to frame i."""
    scores = []
    for i in range(len(gts) - n):
        gt_common = np.ones(gts[0].shape, dtype=bool)
        pred_common = np.ones(gts[0].shape, dtype=bool)
        for j in range(1, n):
            gt_common = np.logical_and(gt_common, gts[i] == gts[i + j])
            pred_common = np.logical_and(pred_common, preds[i] == preds[i + j])
        denom = gt_common.sum()
        scores.append(math.nan if denom == 0 else float((gt_common & pred_common).sum() / denom))
    return scores


def oracle_vc(videos: dict[str, tuple[list, list]], n: int) -> float:
    scores = []
    for preds, gts in videos.values():
        scores += oracle_vc_windows(preds, gts, n)
    scores = [s for s in scores if not math.isnan(s)]
    return float(np.mean(scores)) if scores else math.nan


def assert_same(a: float, b: float, tol: float = 1e-12) -> None:
    if math.isnan(b):
        assert math.isnan(a), (a, b)
    else:
        assert abs(a - b) <= tol, (a, b)


def random_video(rng: np.random.Generator, t: int, h: int, w: int, c: int, p_change: float,
                 void: float = 0.1) -> list[np.ndarray]:
    """Label frames that change a random fraction of pixels per frame (so windows are mixed)."""
    cur = rng.integers(0, c, (h, w))
    cur[rng.random((h, w)) < void] = 255
    out = [cur.copy()]
    for _ in range(t - 1):
        m = rng.random((h, w)) < p_change
        cur = cur.copy()
        cur[m] = rng.integers(0, c, int(m.sum()))
        out.append(cur.copy())
    return out


# ----------------------------------------------------------------------------- confusion matrix


def test_confusion_hand_computed() -> None:
    # 3 classes; gt row-major, pred; 255 ignored; pred 7 and -1 are invalid (wrong, no FP).
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = np.array([[0, 1, 1, 1], [2, 7, 0, -1]])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    expected = np.array([[1, 1, 0], [0, 2, 0], [0, 0, 1]])
    np.testing.assert_array_equal(cm.matrix, expected)
    np.testing.assert_array_equal(cm.invalid, [1, 0, 1])
    r = cm.compute()
    # class 0: TP 1, FN 2 (pred 1, pred -1), FP 0 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1,
    # FN 1 (pred 7) -> 1/2.
    np.testing.assert_allclose(r["iou"], [1 / 3, 2 / 3, 1 / 2])
    assert r["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert r["pixel_acc"] == pytest.approx(4 / 7)
    assert r["fwIoU"] == pytest.approx(3 / 7 * 1 / 3 + 2 / 7 * 2 / 3 + 2 / 7 * 1 / 2)
    np.testing.assert_allclose(r["class_acc"], [1 / 3, 1.0, 1 / 2])
    assert r["n_pixels"] == 7


def test_confusion_absent_classes_and_miou_over_gt_classes() -> None:
    cm = ConfusionMatrix(4)
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])  # class 2 predicted but absent from GT, class 3 absent from both
    cm.update(pred, gt)
    r = cm.compute()
    assert r["iou"][2] == 0.0
    assert math.isnan(r["iou"][3])
    # mIoU averages classes present in the GT only (docs/methods.md#9-metrics): (1/2 + 1) / 2
    assert r["mIoU"] == pytest.approx(0.75)
    assert math.isnan(r["class_acc"][2]) and math.isnan(r["class_acc"][3])


def test_confusion_empty_and_all_void() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.zeros((4, 4), np.int64), np.full((4, 4), 255, np.uint8))
    r = cm.compute()
    assert r["n_pixels"] == 0
    assert all(math.isnan(r[k]) for k in ("mIoU", "fwIoU", "pixel_acc", "mAcc"))
    assert np.isnan(r["iou"]).all()


def test_confusion_numpy_torch_merge_add() -> None:
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 5, (9, 11)).astype(np.uint8) for _ in range(4)]
    preds = [rng.integers(-1, 7, (9, 11)) for _ in range(4)]
    for g in gts:
        g[rng.random(g.shape) < 0.2] = 255
    whole = ConfusionMatrix(5)
    parts = [ConfusionMatrix(5), ConfusionMatrix(5)]
    for i, (p, g) in enumerate(zip(preds, gts)):
        whole.update(torch.from_numpy(p), torch.from_numpy(g))
        parts[i % 2].update(p, g)
    added = parts[0] + parts[1]
    np.testing.assert_array_equal(added.raw, whole.raw)
    parts[0].merge(parts[1])
    np.testing.assert_array_equal(parts[0].raw, whole.raw)
    with pytest.raises(ValueError, match="classes"):
        whole.merge(ConfusionMatrix(6))


def test_confusion_errors() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(DataError, match=r"shape \(2, 2\) differs from target shape \(2, 3\)"):
        cm.update(np.zeros((2, 2), np.int64), np.zeros((2, 3), np.int64))
    with pytest.raises(DataError, match="label 3"):
        cm.update(np.zeros(2, np.int64), np.array([0, 3]))
    with pytest.raises(TypeError, match="integer"):
        cm.update(np.zeros(2, np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="inside the class range"):
        ConfusionMatrix(3, ignore_index=1)
    assert cm.total == 0


def test_fwiou_miou_against_loop_oracle() -> None:
    rng = np.random.default_rng(1)
    c = 6
    gts = [rng.integers(0, c - 1, (13, 17)) for _ in range(5)]  # class 5 never in the GT
    for g in gts:
        g[rng.random(g.shape) < 0.15] = 255
    preds = [np.where(rng.random(g.shape) < 0.6, np.where(g == 255, 0, g), rng.integers(0, c, g.shape))
             for g in gts]
    cm = ConfusionMatrix(c)
    for p, g in zip(preds, gts):
        cm.update(p, g)
    r = cm.compute()
    o = oracle_scores(preds, gts, c)
    for k in range(c):
        assert_same(float(r["iou"][k]), o["iou"][k])
    for key in ("mIoU", "fwIoU", "pixel_acc"):
        assert_same(r[key], o[key])


@settings(max_examples=40, deadline=None)
@given(
    c=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    void=st.floats(0.0, 1.0),
)
def test_confusion_property_against_oracle(c: int, seed: int, void: float) -> None:
    rng = np.random.default_rng(seed)
    g = rng.integers(0, c, (6, 7))
    g[rng.random(g.shape) < void] = 255
    p = rng.integers(0, c, (6, 7))
    cm = ConfusionMatrix(c)
    cm.update(p, g)
    r = cm.compute()
    o = oracle_scores([p], [g], c)
    for key in ("mIoU", "fwIoU", "pixel_acc"):
        assert_same(r[key], o[key], 1e-12)


# ----------------------------------------------------------------------------- Cityscapes evaluator


def _cityscapes_case(tmp_path: Path, name: str, gt_ids: np.ndarray, pred_ids: np.ndarray) -> None:
    """Compare per-class IoU and mIoU with cityscapesscripts' evaluatePair / getIouScoreForLabel."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs
    from cityscapesscripts.helpers.labels import id2label

    gt_path, pred_path = tmp_path / f"{name}_gt.png", tmp_path / f"{name}_pred.png"
    Image.fromarray(gt_ids.astype(np.uint8)).save(gt_path)
    Image.fromarray(pred_ids.astype(np.uint8)).save(pred_path)
    conf = cs.generateMatrix(cs.args)
    cs.evaluatePair(str(pred_path), str(gt_path), conf, None, {}, cs.args)
    cs_iou = {}
    for lid in cs.args.evalLabels:
        lab = id2label[lid]
        if not lab.ignoreInEval:
            cs_iou[lab.trainId] = cs.getIouScoreForLabel(lid, conf, cs.args)

    # our side: labelIds -> the 19 trainIds (255 for ignored); ignored predictions are invalid
    lut = np.full(256, 255, np.int64)
    for lid, lab in id2label.items():
        if lid >= 0 and not lab.ignoreInEval:
            lut[lid] = lab.trainId
    cm = ConfusionMatrix(19)
    cm.update(lut[pred_ids], lut[gt_ids])
    r = cm.compute()
    for k in range(19):
        assert_same(float(r["iou"][k]), cs_iou[k])
    present = [k for k in range(19) if (lut[gt_ids] == k).any()]
    cs_miou_gt = float(np.mean([cs_iou[k] for k in present])) if present else math.nan
    assert_same(r["mIoU"], cs_miou_gt)
    # the official average runs over every non-NaN class, equal to ours when no class is only
    # predicted
    predicted_only = [k for k in range(19) if k not in present and (lut[pred_ids] == k).any()]
    if not predicted_only:
        assert_same(r["mIoU"], cs.getScoreAverage(cs_iou, cs.args))


def test_against_cityscapes_evaluator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs

    monkeypatch.setattr(cs.args, "evalInstLevelScore", False)
    monkeypatch.setattr(cs.args, "evalPixelAccuracy", False)
    monkeypatch.setattr(cs.args, "quiet", True)
    rng = np.random.default_rng(3)
    ids = np.arange(34)
    gt = rng.choice(ids, (40, 60))
    # mostly correct predictions, some random labelIds (including ignored ones)
    pred = np.where(rng.random(gt.shape) < 0.5, gt, rng.choice(ids, gt.shape))
    _cityscapes_case(tmp_path, "random", gt, pred)
    # perfect prediction on eval classes only
    eval_ids = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33])
    gt2 = rng.choice(eval_ids[:6], (20, 30))
    _cityscapes_case(tmp_path, "perfect", gt2, gt2.copy())
    # classes absent from the GT but predicted, and everything else absent
    gt3 = np.full((10, 10), 7)
    gt3[:, :5] = 0  # unlabeled (ignored)
    pred3 = np.full((10, 10), 26)
    pred3[:5] = 7
    _cityscapes_case(tmp_path, "absent", gt3, pred3)
    # all-void ground truth
    _cityscapes_case(tmp_path, "void", np.zeros((8, 8), np.int64), rng.choice(ids, (8, 8)))


# ----------------------------------------------------------------------------- distributed


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cm = ConfusionMatrix(3)
        cm.update(np.full(4, rank), np.full(4, rank))  # rank r adds 4 pixels of class r
        cm.all_reduce()
        vc = VideoConsistency((2,))
        for _ in range(4):  # T - n = 2 windows of score 1.0 on each rank
            vc.update(f"v{rank}", np.zeros(3, np.int64), np.zeros(3, np.int64))
        vc.all_reduce()
        if rank == 0:
            np.save(out, np.concatenate([cm.matrix.ravel(), [vc.window_counts()[2]]]))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_two_ranks(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "r.npy")
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, port, out), nprocs=2, join=True, start_method="fork"
    )
    res = np.load(out)
    np.testing.assert_array_equal(res[:9].reshape(3, 3), np.diag([4, 4, 0]))
    assert res[9] == 4


def test_all_reduce_without_distributed_is_noop() -> None:
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 1]), np.array([0, 0]))
    before = cm.raw
    cm.all_reduce()
    np.testing.assert_array_equal(cm.raw, before)


# ----------------------------------------------------------------------------- VC_n


def test_vc_hand_computed() -> None:
    # T = 4, n = 2 -> windows (0,1), (1,2) only (T - n = 2; window (2,3) never counts).
    g = [np.array([0, 0, 1, 1]), np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), np.array([5, 5, 5, 5])]
    p = [np.array([0, 1, 1, 1]), np.array([0, 0, 1, 2]), np.array([0, 0, 1, 2]), np.array([0, 0, 0, 0])]
    # window 0: gt_common = {0, 1, 2}, pred_common = {0, 2} -> 2/3
    # window 1: gt_common = {0, 2, 3}, pred_common = {0, 1, 2, 3} -> 3/3
    assert vc_window_scores(p, g, 2) == pytest.approx([2 / 3, 1.0])
    assert video_consistency(p, g, 2) == pytest.approx((2 / 3 + 1.0) / 2)


@pytest.mark.parametrize("t", [1, 7, 8, 9, 10, 16, 17, 30])
def test_vc_window_count_edge_cases(t: int) -> None:
    rng = np.random.default_rng(t)
    gts = random_video(rng, t, 5, 6, 3, 0.02)
    preds = random_video(rng, t, 5, 6, 3, 0.05)
    acc = VideoConsistency((8, 16))
    for p, g in zip(preds, gts):
        acc.update("v", p, g)
    for n in (8, 16):
        windows = oracle_vc_windows(preds, gts, n)
        assert len(windows) == max(t - n, 0)  # T == n contributes nothing, T == n + 1 one window
        assert acc.window_counts()[n] + acc.nan_windows()[n] == len(windows)
        assert_same(acc.compute()[n], oracle_vc({"v": (preds, gts)}, n))
        assert_same(video_consistency(preds, gts, n), oracle_vc({"v": (preds, gts)}, n))


def test_vc_against_oracle_many_videos_interleaved() -> None:
    rng = np.random.default_rng(7)
    videos = {}
    for i, t in enumerate([5, 9, 12, 20, 25]):
        gts = random_video(rng, t, 12, 10, 4, 0.03)
        preds = [np.where(rng.random(g.shape) < 0.9, np.where(g == 255, 0, g), 3) for g in gts]
        videos[f"v{i}"] = (preds, gts)
    acc = VideoConsistency((2, 8, 16))
    # interleave the videos frame by frame (each in temporal order)
    longest = max(len(v[1]) for v in videos.values())
    for j in range(longest):
        for name, (preds, gts) in videos.items():
            if j < len(gts):
                acc.update(name, torch.from_numpy(preds[j]), torch.from_numpy(gts[j]))
    res = acc.compute()
    for n in (2, 8, 16):
        assert_same(res[n], oracle_vc(videos, n), 1e-12)
    per_video = acc.per_video()
    for name, (preds, gts) in videos.items():
        assert_same(per_video[name][8], oracle_vc({name: (preds, gts)}, 8), 1e-12)


def test_vc_edge_cases() -> None:
    z = np.zeros((4, 4), np.int64)
    void = np.full((4, 4), 255)
    # constant video, constant prediction -> 1.0
    assert video_consistency([z] * 10, [z] * 10, 8) == 1.0
    # all void GT: gt_common = every pixel (void included); prediction flips on one pixel
    preds = [z.copy() for _ in range(10)]
    preds[3][0, 0] = 1
    assert video_consistency(preds, [void] * 10, 8) == pytest.approx(
        float(np.mean(oracle_vc_windows(preds, [void] * 10, 8)))
    )
    assert vc_window_scores(preds, [void] * 10, 8)[0] == pytest.approx(15 / 16)
    # GT changing everywhere every frame: all windows NaN -> skipped -> NaN overall
    alt = [np.full((4, 4), i % 2) for i in range(10)]
    acc = VideoConsistency((8,))
    for g in alt:
        acc.update("a", z, g)
    assert math.isnan(acc.compute()[8])
    assert acc.window_counts()[8] == 0 and acc.nan_windows()[8] == 2
    # T <= n: nothing
    assert math.isnan(video_consistency([z] * 8, [z] * 8, 8))
    # finish() drops the pending last window and frees the state
    fin = VideoConsistency((2,))
    for _ in range(3):
        fin.update("f", z, z)
    fin.finish("f")
    assert fin.window_counts()[2] == 1 and not fin._states
    with pytest.raises(DataError, match="after finish"):
        fin.update("f", z, z)
    with pytest.raises(DataError, match="video 'a'"):
        acc.update("a", np.zeros((3, 3), np.int64), np.zeros((3, 3), np.int64))


@settings(max_examples=30, deadline=None)
@given(
    t=st.integers(1, 14),
    n=st.integers(1, 6),
    c=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_vc_property_against_oracle(t: int, n: int, c: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    gts = random_video(rng, t, 3, 4, c, 0.2, void=0.2)
    preds = random_video(rng, t, 3, 4, c, 0.2, void=0.0)
    assert_same(video_consistency(preds, gts, n), oracle_vc({"v": (preds, gts)}, n), 1e-12)
    got = vc_window_scores(preds, gts, n)
    want = oracle_vc_windows(preds, gts, n)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert_same(a, b)


# ----------------------------------------------------------------------------- offsets


Ref = FrameRef


def test_offset_table_hand_made(tmp_path: Path) -> None:
    c = 2
    gt = np.array([0, 0, 1, 1])
    frames = {
        Ref("a", 0): (np.array([0, 0, 1, 1]), gt),  # offset 0: perfect
        Ref("a", 1): (np.array([0, 1, 1, 1]), gt),  # offset +1
        Ref("a", 2): (np.array([1, 1, 1, 1]), gt),  # offset +2
        Ref("b", 0): (np.array([0, 0, 0, 1]), gt),  # offset +1 (pooled with a#1)
        Ref("b", 9): (np.array([0, 0, 0, 0]), gt),  # no offset -> left out
    }
    offsets = {Ref("a", 0): 0, Ref("a", 1): 1, Ref("a", 2): 2, Ref("b", 0): 1}
    table = offset_table(frames, offsets, subset="train videos", model="m1", num_classes=c)
    assert table.offsets() == [0, 1, 2]
    r0 = table.get(0, "train videos", "m1")
    assert r0 is not None and r0.mIoU == 1.0 and r0.n_frames == 1
    # offset 1 pooled: gt 0 -> pred (0,1) from a#1, (0,0) from b#0; gt 1 -> (1,1) and (0,1)
    # confusion [[3,1],[1,3]] -> IoU0 = IoU1 = 3/5
    r1 = table.get(1, "train videos", "m1")
    assert r1 is not None and r1.n_frames == 2 and r1.n_pixels == 8
    assert r1.mIoU == pytest.approx(3 / 5)
    r2 = table.get(2, "train videos", "m1")
    assert r2 is not None and r2.mIoU == pytest.approx((0 + 2 / 4) / 2)
    # the same from ConfusionMatrix objects and raw (C, C) count arrays
    mats = {}
    for k, (p, g) in frames.items():
        cm = ConfusionMatrix(c)
        cm.update(p, g)
        mats[k] = cm if k.video == "a" else cm.matrix
    table2 = offset_table(mats, offsets, subset="train videos", model="m1")
    assert [r.mIoU for r in table2.rows] == [r.mIoU for r in table.rows]
    # absolute offsets fold -1/+1
    folded = offset_table(frames, {Ref("a", 0): -1, Ref("a", 1): 1}, num_classes=c, absolute=True)
    assert folded.offsets() == [1] and folded.rows[0].n_frames == 2

    held = offset_table(frames, {Ref("b", 0): 0, Ref("b", 9): 3}, subset="held-out videos",
                        model="m1", num_classes=c)
    both = table + held
    text = offset_table_text([table, held])
    lines = text.splitlines()
    assert "m1 / train videos" in lines[0] and "m1 / held-out videos" in lines[0]
    assert lines[2].split()[0] == "0" and "100.00 (1)" in lines[2]
    assert lines[-1].split()[0] == "+3"

    # JSON / CSV round trip
    jpath, cpath = save_offset_tables(both, tmp_path / "offsets.json")
    back = OffsetTable.from_json(jpath)
    assert [(r.model, r.subset, r.offset, r.n_frames) for r in back.rows] == [
        (r.model, r.subset, r.offset, r.n_frames) for r in both.rows
    ]
    assert all(a.mIoU == pytest.approx(b.mIoU) for a, b in zip(back.rows, both.rows))
    csv_lines = cpath.read_text().splitlines()
    assert csv_lines[0] == "model,subset,offset,mIoU,n_frames,n_pixels"
    assert len(csv_lines) == 1 + len(both)
    assert json.loads(jpath.read_text())[0]["subset"] in ("held-out videos", "train videos")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="bad.json"):
        OffsetTable.from_json(tmp_path / "bad.json")

    # mapping input relabels subsets
    relabelled = offset_table_text({"train videos (train)": table})
    assert "m1 / train videos (train)" in relabelled

    # plot: one line per (model, subset)
    png = plot_offsets({"train": table, "held-out": held}, tmp_path / "plot" / "offsets.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100
    with pytest.raises(DataError, match="empty"):
        plot_offsets(OffsetTable(), tmp_path / "empty.png")


def test_metrics_from_matrix_shape_error() -> None:
    with pytest.raises(ValueError, match="confusion matrix"):
        metrics_from_matrix(np.zeros((3, 5)))
