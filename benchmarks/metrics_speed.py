"""Throughput of the metric accumulators (docs/methods.md#9-metrics).

Prints ConfusionMatrix.update throughput (Mpixels/s) and VideoConsistency accumulation (frames/s,
VC8 + VC16 together) at 360x480 and 1024x2048 with 11 (CamVid) and 124 (VSPW) classes.

    OMP_NUM_THREADS=1 python benchmarks/metrics_speed.py [--frames 20] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from semivss.metrics import ConfusionMatrix, VideoConsistency


def make_frames(n: int, h: int, w: int, c: int, seed: int = 0) -> tuple[list, list]:
    """Label-like frames: blocky class maps that change a little per frame, 5 % void, and
    predictions that agree with the ground truth on ~80 % of the pixels."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, c, (h // 16 + 1, w // 16 + 1))
    gt = np.kron(base, np.ones((16, 16), np.int64))[:h, :w].astype(np.uint8)
    gts, preds = [], []
    for _ in range(n):
        gt = gt.copy()
        flip = rng.random((h, w)) < 0.01
        gt[flip] = rng.integers(0, c, int(flip.sum()))
        g = gt.copy()
        g[rng.random((h, w)) < 0.05] = 255
        p = np.where(rng.random((h, w)) < 0.8, gt, rng.integers(0, c, (h, w))).astype(np.int64)
        gts.append(torch.from_numpy(g))
        preds.append(torch.from_numpy(p))
    return preds, gts


def bench(h: int, w: int, c: int, n: int) -> tuple[float, float]:
    preds, gts = make_frames(n, h, w, c)
    cm = ConfusionMatrix(c)
    cm.update(preds[0], gts[0])  # warm-up
    t0 = time.perf_counter()
    for p, g in zip(preds, gts):
        cm.update(p, g)
    dt_cm = time.perf_counter() - t0
    vc = VideoConsistency((8, 16))
    t0 = time.perf_counter()
    for p, g in zip(preds, gts):
        vc.update("video", p, g)
    dt_vc = time.perf_counter() - t0
    return n * h * w / dt_cm / 1e6, n / dt_vc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20, help="frames per setting")
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.frames} frames")
    print(f"{'size':>10} {'classes':>7} {'confusion Mpx/s':>16} {'VC8+VC16 frames/s':>18}")
    for h, w in ((360, 480), (1024, 2048)):
        for c in (11, 124):
            mpx, fps = bench(h, w, c, args.frames)
            print(f"{h:>4}x{w:<5} {c:>7} {mpx:>16.1f} {fps:>18.1f}")


if __name__ == "__main__":
    main()
