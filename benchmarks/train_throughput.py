"""Training throughput and peak memory of a segmentation model: fp32 vs bf16 autocast and
channels_last.

Each configuration runs in a fresh subprocess so that peak memory (``ru_maxrss`` on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) belongs to that configuration alone. One training
iteration = forward, cross-entropy (ignore 255) on logits upsampled to the input size, backward,
SGD step (momentum 0.9, wd 1e-4, head LR x10) on random images and labels.

    python benchmarks/train_throughput.py --batch 8 --height 240 --width 320 --iters 5 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from contextlib import nullcontext

MODES = {
    "fp32": "fp32, contiguous",
    "fp32-cl": "fp32 + channels_last",
    "bf16-cl": "bf16 autocast + channels_last",
}


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--iters", type=int, default=5, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--arch", default="deeplabv3plus")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--output-stride", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=11)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc's mmap/trim thresholds alone (the trainer tunes them)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    p.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.batch, args.height, args.width, args.iters) < 1 or args.warmup < 0:
        p.error("--batch, --height, --width and --iters must be >= 1, --warmup >= 0")
    return args


def _worker(args: argparse.Namespace) -> dict[str, float | str]:
    """One configuration; returns the measurements (printed as a JSON line)."""
    import torch
    import torch.nn.functional as F

    from semivss.models import ModelConfig, build_model

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not args.no_malloc_tuning:
        from semivss.engine.memory import tune_malloc

        tune_malloc()
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    cfg = ModelConfig(arch=args.arch, backbone=args.backbone, output_stride=args.output_stride,
                      pretrained=None)
    model = build_model(cfg, args.num_classes).to(device).train()
    groups = model.param_groups()
    lr = 0.01
    optimizer = torch.optim.SGD(
        [{"params": groups["backbone"], "lr": lr}, {"params": groups["head"], "lr": lr * 10}],
        lr=lr, momentum=0.9, weight_decay=1e-4,
    )
    low_precision = args.worker == "bf16-cl"
    memory_format = torch.channels_last if args.worker.endswith("-cl") else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    gen = torch.Generator().manual_seed(1)
    shape = (args.batch, 3, args.height, args.width)
    images = torch.randn(shape, generator=gen).to(device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, args.num_classes, (args.batch, args.height, args.width),
                           generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.05] = 255
    labels = labels.to(device)

    def step() -> float:
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if low_precision
                    else nullcontext())
        with autocast:
            logits = model(images)["logits"]
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear",
                               align_corners=False)
        loss = F.cross_entropy(logits, labels, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss = 0.0
    for _ in range(args.iters):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:  # Linux reports KiB, macOS bytes
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
    return {
        "mode": args.worker,
        "images_per_s": args.batch * args.iters / elapsed,
        "s_per_iter": elapsed / args.iters,
        "peak_mib": peak_mib,
        "loss": loss,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_worker(args)), flush=True)
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    base = sys.argv[1:] if argv is None else list(argv)
    rows = []
    for mode in modes:
        proc = subprocess.run([sys.executable, __file__, *base, "--worker", mode],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"configuration {mode} failed (exit {proc.returncode})")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    memory = "peak GPU MiB (max_memory_allocated)" if args.device == "cuda" else "peak RSS MiB"
    print(f"{args.arch} / {args.backbone} OS{args.output_stride}, batch {args.batch}, "
          f"{args.height}x{args.width}, {args.iters} timed iters after {args.warmup} warm-up, "
          f"device {args.device}, torch {rows[0]['torch']}, {rows[0]['threads']} threads, "
          f"{platform.processor() or platform.machine()}")
    header = f"{'configuration':<32} {'images/s':>9} {'s/iter':>8} {memory:>12}  {'last loss':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{MODES[r['mode']]:<32} {r['images_per_s']:>9.2f} {r['s_per_iter']:>8.3f} "
              f"{r['peak_mib']:>{len(memory)}.0f}  {r['loss']:>9.4f}")
    base = next((r for r in rows if r["mode"] == "fp32"), None)
    if base is not None:
        for r in rows:
            if r is not base:
                print(f"speed-up {r['mode']} / fp32: {r['images_per_s'] / base['images_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
