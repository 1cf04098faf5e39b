"""Training-step cost of each method relative to a supervised step, on the configs' own settings.

Every config is read as it trains (method parameters, model, batch sizes, crop size); the encoder
starts random instead of from ImageNet weights (the cost is the same) and the batches are random
tensors shaped as the method's ``data_spec`` asks, so data loading is NOT included. One step =
``method.training_step`` + backward + SGD step + ``method.on_step_end`` (EMA updates), timed at
the middle of the schedule (ramps on). Methods run interleaved, one step each in turn, so a
background load slows them alike.

    python benchmarks/method_step_cost.py                       # camvid-ssvs 1/8 configs
    python benchmarks/method_step_cost.py --iters 2 --size 64x64 configs/synthetic/{supervised,u2pl}.yaml
    python benchmarks/method_step_cost.py --flops --record results/benchmarks/method_step_cost-X.json

``--flops`` also counts the floating-point operations of one step of each method
(``torch.utils.flop_counter``: convolutions and matrix products, forward and backward), which do
not depend on the machine or its load: time ratio / FLOP ratio above 1 means the method spends
time outside those kernels (memory-bound ops, Python, sampling), a FLOP ratio above a target
means no kernel speed-up alone can meet it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIGS = [
    "configs/camvid-ssvs/supervised_1-8.yaml",
    "configs/camvid-ssvs/ifr_1-8.yaml",
    "configs/camvid-ssvs/u2pl_1-8.yaml",
    "configs/camvid-ssvs/cps_1-8.yaml",
    "configs/camvid-ssvs/unimatch_1-8.yaml",
    "configs/camvid-ssvs/cac_1-8.yaml",
    "configs/camvid-ssvs/recipe/student_self_training.yaml",
]


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS,
                   help="experiment YAMLs; the first is the reference (default: camvid-ssvs 1/8)")
    p.add_argument("--iters", type=int, default=4, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method first")
    p.add_argument("--size", default=None, help="crop HxW instead of each config's data.crop_size")
    p.add_argument("--num-classes", type=int, default=11)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--precision", default="auto",
                   help="auto (bf16 autocast on CPUs with native bf16, as train.precision) | fp32 | bf16")
    p.add_argument("--profile", default=None, metavar="CONFIG_STEM",
                   help="also print a torch.profiler table of one step of this config")
    p.add_argument("--flops", action="store_true",
                   help="also count the FLOPs of one step of each config (machine-independent)")
    p.add_argument("--notes", default="", help="a remark stored with the record (e.g. a shared CPU)")
    p.add_argument("--record", default=None, metavar="JSON",
                   help="write the table as a record (results.write_record; an existing file is refused)")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    return args


def random_batch(spec: Any, b: int, u: int, h: int, w: int, c: int, gen: Any) -> dict[str, Any]:
    """Random typed batches shaped as the trainer's datasets give them for ``spec``."""
    import torch

    from semivss.data.batch import LabeledBatch, OverlapBatch, PseudoBatch, UnlabeledBatch

    def img(*lead: int) -> torch.Tensor:
        return torch.randn(*lead, 3, h, w, generator=gen)

    def label(n: int) -> torch.Tensor:
        y = torch.randint(0, c, (n, h, w), generator=gen)
        y[torch.rand(y.shape, generator=gen) < 0.05] = 255
        return y

    ones = lambda *shape: torch.ones(*shape, dtype=torch.bool)  # noqa: E731
    lab = spec.get("labeled")
    k = lab.context_frames
    batch: dict[str, Any] = {"labeled": LabeledBatch(
        img(b), label(b), ones(b, h, w),
        context=img(b, k) if k else None,
        context_offset=torch.ones(b, k, dtype=torch.int64) if k else None,
        context_strong=img(b, k) if k and lab.context_strong else None,
    )}
    unl = spec.get("unlabeled")
    if unl is not None and u:
        n = unl.frames
        batch["unlabeled"] = UnlabeledBatch(img(u, n), torch.arange(n, dtype=torch.int64).repeat(u, 1),
                                            ones(u, n, h, w), [img(u, n) for _ in range(unl.strong_copies)])
    pseudo = spec.get("pseudo")
    if pseudo is not None and u:
        batch["pseudo"] = PseudoBatch(img(u), label(u).clamp(max=c - 1),
                                      torch.rand(u, h, w, generator=gen) * math.log(c), ones(u, h, w),
                                      [img(u)] if pseudo.strong else [])
    overlap = spec.get("overlap")
    if overlap is not None and u:
        dy, dx = overlap.stride * (h // overlap.stride // 4), overlap.stride * (w // overlap.stride // 4)
        boxes = torch.tensor([[dy, dx, h, w], [0, 0, h - dy, w - dx]]).repeat(u, 1, 1)
        batch["overlap"] = OverlapBatch(img(u, 2), ones(u, 2, h, w), boxes, torch.zeros(u, 2, dtype=torch.bool))
    return batch


def count_images(batch: dict[str, Any]) -> int:
    """Images in the batch (every 4-D/5-D float tensor of 3 channels); a method may leave some
    unused (IFR runs 27 of its 28: one strong copy of the unlabeled pair)."""
    n = 0

    def visit(t: Any) -> Any:
        nonlocal n
        if t.is_floating_point() and t.dim() >= 4 and t.shape[-3] == 3:
            n += math.prod(t.shape[:-3])
        return t

    for part in batch.values():
        part.map_tensors(visit)
    return n


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    from semivss.config import load_config
    from semivss.engine.memory import tune_malloc
    from semivss.engine.precision import Precision, images_channels_last
    from semivss.results import machine_info
    from semivss.methods import build_method
    from semivss.models import build_model

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tune_malloc()  # as the trainer does (train.malloc_tuning)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    c = args.num_classes
    precision = Precision.from_config(args.precision, device)
    runs: dict[str, dict[str, Any]] = {}
    for path in args.configs:
        cfg = load_config(path, ["model.pretrained=none", "model.init_from=null"])
        method = build_method(cfg.method_name, cfg.method_params, c)
        spec = method.data_spec()
        h, w = (int(v) for v in args.size.split("x")) if args.size else cfg.data.crop_size
        gen = torch.Generator().manual_seed(0)
        batch = random_batch(spec, cfg.data.batch_size, cfg.data.unlabeled_batch_size, h, w, c, gen)
        batch = images_channels_last(method.to_device(batch, device))
        torch.manual_seed(0)
        models = method.build_models(lambda cfg=cfg: build_model(cfg.model, c))
        models = models.to(device).to(memory_format=torch.channels_last)
        params = [p for name in method.trainable(models) for p in models[name].parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
        for name in method.trainable(models):
            models[name].train()
        key = Path(path).stem if Path(path).stem not in runs else path  # same stem twice: full path
        runs[key] = {
            "method": method, "models": models, "opt": opt, "batch": batch, "times": [],
            "images": count_images(batch), "max": cfg.schedule.iters, "name": cfg.method_name,
        }

    def step(r: dict[str, Any], i: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        at = r["max"] // 2 + i
        with precision.autocast():
            losses = r["method"].training_step(r["models"], r["batch"], at, r["max"])
        r["opt"].zero_grad(set_to_none=True)
        losses["loss"].backward()
        r["opt"].step()
        r["method"].on_step_end(r["models"], at)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for i in range(args.warmup + args.iters):
        for r in runs.values():
            t = step(r, i)
            if i >= args.warmup:
                r["times"].append(t)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{machine_info()['cpu']}; {precision.name} + channels_last; {args.iters} timed "
          f"steps each after {args.warmup} warm-up; data loading excluded")
    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        for r in runs.values():
            with FlopCounterMode(display=False) as counter:
                step(r, args.warmup + args.iters)
            r["flops"] = counter.get_total_flops()
    first = next(iter(runs.values()))
    ref = statistics.median(first["times"])
    head = "| config | method | images in batch | median s/step | x first |"
    head += " GFLOP/step | FLOPs x first |" if args.flops else ""
    print(head)
    print("|---|---|---|---|---|" + ("---|---|" if args.flops else ""))
    rows = []
    for key, r in runs.items():
        med = statistics.median(r["times"])
        row = {"config": key, "method": r["name"], "images": r["images"],
               "median_s_per_step": round(med, 3), "vs_first": round(med / ref, 2)}
        line = f"| {key} | {r['name']} | {r['images']} | {med:.3f} | {med / ref:.2f}x |"
        if args.flops:
            row.update(gflop_per_step=round(r["flops"] / 1e9, 1), flops_vs_first=round(r["flops"] / first["flops"], 2))
            line += f" {r['flops'] / 1e9:.1f} | {r['flops'] / first['flops']:.2f}x |"
        rows.append(row)
        print(line)
    if args.record:
        from semivss.results import git_commit, write_record

        write_record({
            "benchmark": "benchmarks/method_step_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "commit": git_commit(Path.cwd()), "machine": machine_info(),
            "precision": f"{precision.name} + channels_last", "threads": torch.get_num_threads(),
            "crop": args.size or "each config's data.crop_size",
            "notes": "random batches, data loading excluded; methods interleaved one step each"
                     + (f"; {args.notes}" if args.notes else ""),
            "rows": rows,
        }, args.record)
        print(f"record -> {args.record}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        r = runs[args.profile]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(r, args.warmup + args.iters)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
