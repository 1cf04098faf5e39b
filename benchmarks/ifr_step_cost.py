"""Cost of one IFR training step relative to one supervised step with the same labeled batch.

One step = the method's ``training_step`` (forward, losses), backward and an SGD step (momentum
0.9, wd 1e-4, head LR x10) on random images and labels, fp32 + channels_last, for a DeepLabV3+
(MobileNetV2 by default, random init). The supervised step sees ``--batch`` labeled frames; the
IFR step sees the same labeled frames plus one source frame and its distorted copy per labeled
clip, and ``--unlabeled-batch`` unlabeled clips of two frames plus a distorted copy of the second:
``3 * batch + 3 * unlabeled_batch`` images in total (``4 * batch`` with ``--share-frames``),
in forward passes laid out by ``--forward-passes`` (IFR's ``forward_passes``: ``per_group`` as the
official code, ``joint`` = one pass, ``split`` = one pass per labeled group and one for the three
unlabeled groups). The two kinds of step are timed alternately (so that load from other processes
hits both alike); the median and the minimum of each are reported (the ratio uses the medians).

    python benchmarks/ifr_step_cost.py --batch 8 --unlabeled-batch 1 --forward-passes split
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import replace
from typing import Any


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="labeled clips per step")
    p.add_argument("--unlabeled-batch", type=int, default=8,
                   help="unlabeled clips per step (0: none)")
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--iters", type=int, default=5, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each kind first")
    p.add_argument("--arch", default="deeplabv3plus")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--output-stride", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=11)
    p.add_argument("--forward-passes", choices=["per_group", "joint", "split"],
                   default="per_group",
                   help="IFR forward_passes (split = [[x], [src], [src_s], [u0, u1, u1_s]])")
    p.add_argument("--share-frames", action="store_true",
                   help="IFR share_frames=true: unlabeled pair from the labeled clip (u1 = source "
                        "frame), 4 images per labeled clip; --unlabeled-batch is ignored")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc's mmap/trim thresholds alone (the trainer tunes them)")
    args = p.parse_args(argv)
    if min(args.batch, args.height, args.width, args.iters) < 1:
        p.error("--batch, --height, --width and --iters must be >= 1")
    if min(args.warmup, args.unlabeled_batch) < 0:
        p.error("--warmup and --unlabeled-batch must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch
    from torch import nn

    from semivss.data.batch import LabeledBatch, UnlabeledBatch
    from semivss.methods.ifr import IFR
    from semivss.methods.supervised import Supervised
    from semivss.models import ModelConfig, build_model

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not args.no_malloc_tuning:
        from semivss.engine.memory import tune_malloc

        tune_malloc()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    cl = torch.channels_last
    cfg = ModelConfig(arch=args.arch, backbone=args.backbone, output_stride=args.output_stride,
                      pretrained=None)
    b, u, h, w, c = args.batch, args.unlabeled_batch, args.height, args.width, args.num_classes
    gen = torch.Generator().manual_seed(0)

    def images(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, 3, h, w, generator=gen).to(device)
        return x.contiguous(memory_format=cl) if len(shape) == 1 else x

    label = torch.randint(0, c, (b, h, w), generator=gen)
    label[torch.rand(label.shape, generator=gen) < 0.05] = 255
    valid = torch.ones(b, h, w, dtype=torch.bool, device=device)
    labeled = LabeledBatch(images(b), label.to(device), valid)
    passes: Any = ([["u0", "u1", "u1_s"]] if args.forward_passes == "split"
                   else args.forward_passes)
    ifr_params: dict[str, Any] = {"forward_passes": passes, "share_frames": args.share_frames}
    if args.share_frames:
        u = 0
    elif u == 0:
        ifr_params.update(use_unlabeled=False, use_unlabeled_strong=False)
    k = 2 if args.share_frames else 1
    methods = {"supervised": Supervised(None, c), "ifr": IFR(ifr_params, c)}
    batches: dict[str, dict[str, Any]] = {
        "supervised": {"labeled": labeled},
        "ifr": {"labeled": replace(labeled, context=images(b, k), context_strong=images(b, k),
                                   context_offset=torch.ones(b, k, dtype=torch.int64, device=device))},
    }
    if u > 0:
        batches["ifr"]["unlabeled"] = UnlabeledBatch(
            images(u, 2), torch.tensor([[0, 1]] * u, dtype=torch.int64, device=device),
            torch.ones(u, 2, h, w, dtype=torch.bool, device=device), [images(u, 2)],
        )
    runs: dict[str, Any] = {}
    for name in methods:
        torch.manual_seed(0)
        model = build_model(cfg, c).to(device).to(memory_format=cl).train()
        groups = model.param_groups()
        opt = torch.optim.SGD([{"params": groups["backbone"], "lr": 0.01},
                               {"params": groups["head"], "lr": 0.1}],
                              lr=0.01, momentum=0.9, weight_decay=1e-4)
        runs[name] = (nn.ModuleDict({"model": model}), opt)

    def step(name: str) -> float:
        models, opt = runs[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = methods[name].training_step(models, batches[name], 4000, 4000)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(args.warmup + args.iters):
        for name in methods:
            t = step(name)
            if i >= args.warmup:
                times[name].append(t)
    sup, ifr = statistics.median(times["supervised"]), statistics.median(times["ifr"])
    n_img = 4 * b if args.share_frames else 3 * b + 3 * u
    mode = f"forward_passes {args.forward_passes}"
    what = (f"{b} labeled clips sharing frames" if args.share_frames
            else f"{b} labeled + {u} unlabeled clips")
    print(f"{args.arch} / {args.backbone} OS{args.output_stride}, {h}x{w}, fp32 + channels_last, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; {args.iters} timed steps each after "
          f"{args.warmup} warm-up")
    print(f"supervised step ({b} images): median {sup:.3f} s, min {min(times['supervised']):.3f} s")
    print(f"IFR step ({what} = {n_img} images, {mode}): median {ifr:.3f} s, "
          f"min {min(times['ifr']):.3f} s")
    print(f"ratio IFR / supervised: {ifr / sup:.2f}x median, "
          f"{min(times['ifr']) / min(times['supervised']):.2f}x min  (images {n_img / b:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
