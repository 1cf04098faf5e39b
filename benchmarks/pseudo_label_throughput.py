"""Pseudo-labelling throughput (frames/s, PNG writing included): 1 scale vs the docs/methods.md#7-offline-teacher-student-self-training TTA of 8
scales {512, 640, ..., 1408}/896 x horizontal flip (16 forward passes per frame).

A MobileNetV2 DeepLabV3+ (random init; speed does not depend on the weights) labels synthetic
frames (generated with ``semivss.data.synthetic``) or the frames of a ``--data`` dataset through
``semivss.inference.pseudo_label`` into a temporary set that is deleted afterwards.

    python benchmarks/pseudo_label_throughput.py --size 240x320 --frames 8 --threads 2
    python benchmarks/pseudo_label_throughput.py --data data/camvid --format camvid --split train --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCALES_8 = tuple(s / 896 for s in (512, 640, 768, 896, 1024, 1152, 1280, 1408))
CONFIGS = {"1 scale": ((1.0,), False), "8 scales x flip": (SCALES_8, True)}


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 240x320, got {text!r}") from None
    if h < 16 or w < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16x16, got {text!r}")
    return h, w


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=_size, default=(240, 320),
                   help="model input size HxW at scale 1 (synthetic frames are generated at it)")
    p.add_argument("--frames", type=int, default=8, help="frames labelled per configuration")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--batch", type=int, default=4, help="frames per forward pass")
    p.add_argument("--write-threads", type=int, default=2, help="PNG writer threads")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CPU, fp16 on CUDA")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    p.add_argument("--data", type=Path, help="label this dataset's frames instead of synthetic ones")
    p.add_argument("--format", default="camvid", help="dataset format of --data")
    p.add_argument("--split", default="train", help="split of --data")
    args = p.parse_args(argv)
    if min(args.frames, args.batch) < 1 or args.threads < 0:
        p.error("--frames and --batch must be >= 1, --threads >= 0")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    from semivss.data import formats
    from semivss.data.synthetic import generate_synthetic
    from semivss.inference import EvalConfig, Member, Predictor
    from semivss.inference.pseudo_label import make_manifest, pseudo_label
    from semivss.models import ModelConfig, build_model

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    work = Path(tempfile.mkdtemp(prefix="semivss-plabel-bench-"))
    try:
        if args.data is None:
            # 1 warm-up frame + --frames timed frames per configuration, one video
            generate_synthetic(work / "data", videos=2, frames=args.frames + 1,
                               height=args.size[0], width=args.size[1], seed=0, val_videos=1)
            videoset = formats.load_dataset("synthetic", work / "data", "train")
            source = f"synthetic {args.size[0]}x{args.size[1]} frames"
        else:
            videoset = formats.load_dataset(args.format, args.data, args.split)
            source = f"{args.data} ({args.format}, {args.split})"
        frames = videoset.frames()[: args.frames + 1]
        if len(frames) < 2:
            raise SystemExit("need at least 2 frames (1 warm-up + 1 timed)")
        num_classes = videoset.num_classes
        torch.manual_seed(0)
        model = build_model(ModelConfig(backbone="mobilenet_v2", pretrained=None), num_classes)
        model = model.to(device).eval()
        dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
            platform.processor() or platform.machine())
        print(f"pseudo-labelling {len(frames) - 1} frames of {source}, MobileNetV2 DeepLabV3+ "
              f"(random init, {num_classes} classes), input {args.size[0]}x{args.size[1]} at scale 1, "
              f"batch {args.batch}, {args.write_threads} PNG writer threads, amp {args.amp}")
        print(f"device {device} ({dev_name}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{torch.get_num_threads()} torch threads, Python {sys.version.split()[0]}, "
              f"{platform.platform()}")
        header = f"{'configuration':<18} {'passes/frame':>12} {'frames/s':>9} {'s/frame':>8}"
        print(header)
        print("-" * len(header))
        rates = {}
        for name in args.configs:
            scales, flip = CONFIGS[name]
            cfg = EvalConfig(size=args.size, scales=scales, flip=flip, batch_size=args.batch,
                             amp=args.amp)
            predictor = Predictor([Member(model, cfg)])
            manifest = make_manifest(
                dataset={"format": "benchmark", "root": str(work), "split": "-"},
                classes=list(videoset.classes), models=[{"path": "random", "weight": 1.0}],
                scales=scales, flip=flip, eval_cfg=cfg.model_dump(mode="json"), frames=frames)
            out = work / f"set-{len(rates)}"
            common = dict(device=device, batch_size=args.batch, write_threads=args.write_threads,
                          progress=False, rank=0, world_size=1)
            # warm-up on the first frame (allocations, autotuning), then the timed frames
            pseudo_label(predictor, videoset, frames, out, num_classes, manifest, limit=1, **common)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            counts = pseudo_label(predictor, videoset, frames, out, num_classes, manifest,
                                  resume=True, **common)
            elapsed = time.perf_counter() - start
            assert counts["complete"] and counts["written"] == len(frames) - 1
            rate = counts["written"] / elapsed
            rates[name] = rate
            print(f"{name:<18} {len(scales) * (2 if flip else 1):>12} {rate:>9.2f} "
                  f"{1 / rate:>8.3f}")
        if len(rates) == 2:
            a, b = (rates[c] for c in CONFIGS)
            print(f"TTA slow-down: {a / b:.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
