"""Key-frame video inference (Accel, docs/methods.md#14-accel) against per-frame inference, in one run.

For each row the annotated frames of a split are predicted video by video, in order, and scored
(mIoU, fwIoU, VC8, VC16); frames/s counts only the predictor's own work (frames are read and
resized beforehand by the evaluation loop, outside the timer). Rows: the per-frame reference
network, the per-frame update branch (the reference's input scaled by ``update_scale``),
Accel with key frames every K frames for each ``--intervals`` K, with its time split into
reference, flow, warp, update and fusion, and the reference propagated along the flow without an
update branch (K > 1), which shows what the update branch and fusion add. A warm-up pass runs first.

    python benchmarks/video_inference.py runs/camvid-ssvs-1-8-accel/model.safetensors \\
        --data ../shared/data/camvid --format camvid --split val --out results/benchmarks/video_inference-camvid.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any


def accel_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every Accel benchmark shares (what :func:`load_accel` reads, the flow and the
    propagation, the record's path)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("accel", type=Path, help="a trained Accel model (semivss train ... method: accel)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--format", default="camvid")
    p.add_argument("--split", default="val")
    p.add_argument("--flow", default=None, help="dis-ultrafast | dis-fast | dis-medium, optionally @SCALE "
                                                "(default: the model's)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on CPU / fp16 on CUDA (default: on for CPUs with native bf16)")
    p.add_argument("--propagation", default="chained", choices=["chained", "composed"],
                   help="chained (Accel) or composed flows since the key frame")
    p.add_argument("--warp-at", default="score", choices=["score", "input"],
                   help="warp on the reference's output grid or at the input size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="write the figures as a JSON record")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = accel_parser(__doc__)
    p.add_argument("--intervals", default="1,2,5,10", help="key-frame intervals K, comma-separated")
    p.add_argument("--bidirectional", action="store_true",
                   help="key-frame rows: also carry the next key frame's scores back (offline; output delayed)")
    p.add_argument("--fuse-from-ages", default="0",
                   help="Accel rows for each N, comma-separated: the update branch fused only from N frames "
                        "after the key frame (docs/methods.md#14-accel, Eq. ACC-5; 0: every frame, Accel); "
                        "an N runs with the intervals K > N")
    p.add_argument("--rows", default="per-frame,accel,flow",
                   help="row groups, comma-separated: per-frame (reference and update; the speed-ups need "
                        "the reference row), accel (Accel K), flow (reference + flow K)")
    return p.parse_args(argv)


def load_accel(args: argparse.Namespace, need_update: bool) -> tuple[Any, Any, Any, bool, Any] | None:
    """``(device, Accel model, eval config, amp, videoset)`` from the shared options (``accel``,
    ``threads``, ``device``, ``amp``, ``data``, ``format``, ``split``); None, with a message, when
    the checkpoint is not an Accel model (with an update branch if ``need_update``)."""
    import torch

    from semivss.data.formats import load_dataset
    from semivss.engine.precision import Precision
    from semivss.experiment import eval_config_from, load_trained_model
    from semivss.models.accel import AccelNet

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    net, meta = load_trained_model(args.accel, dev)
    if not isinstance(net, AccelNet) or (need_update and net.update is None):
        print(f"{args.accel}: not an Accel model{' with an update branch' if need_update else ''}", file=sys.stderr)
        return None
    amp = args.amp if args.amp is not None else Precision.from_config("auto", dev).name == "bf16"
    return dev, net, eval_config_from(meta, amp=amp, batch_size=8), amp, load_dataset(args.format, args.data, args.split)


class Timed:
    """A VideoPredictor proxy that adds up the seconds spent in ``step``."""

    def __init__(self, base: Any) -> None:
        self.base, self.seconds, self.frames = base, 0.0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def step(self, images: Any, out_size: Any, with_probs: bool = False) -> Any:
        import torch

        if images.device.type == "cuda":
            torch.cuda.synchronize(images.device)
        t0 = time.perf_counter()
        out = self.base.step(images, out_size, with_probs)
        if images.device.type == "cuda":
            torch.cuda.synchronize(images.device)
        self.seconds += time.perf_counter() - t0
        self.frames += images.shape[0]
        return out

    def finish(self) -> Any:
        """A delaying predictor's last answers of a video (timed too); empty for the others."""
        import torch

        from semivss.inference.video_predictor import finish_video

        t0 = time.perf_counter()
        out = finish_video(self.base, True)
        if isinstance(out[0], torch.Tensor) and out[0].device.type == "cuda":
            torch.cuda.synchronize(out[0].device)
        self.seconds += time.perf_counter() - t0
        return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch
    from torch import nn

    from semivss.errors import ConfigError
    from semivss.inference.evaluate import evaluate
    from semivss.inference.keyframes import KeyframePredictor
    from semivss.inference.predict import Predictor
    from semivss.models.accel import AccelNet
    from semivss.models.flow import build_flow
    from semivss.results import git_commit, machine_info, write_record

    loaded = load_accel(args, need_update=True)
    if loaded is None:
        return 2
    dev, net, cfg, amp, videoset = loaded
    frames = videoset.annotated()
    flow_name = args.flow or net.flow
    intervals = [int(k) for k in args.intervals.split(",") if k.strip()]
    fuse_ages = [int(a) for a in args.fuse_from_ages.split(",") if a.strip()] or [0]
    if net.update is None and fuse_ages != [0]:
        print("--fuse-from-ages needs an Accel model with an update branch", file=sys.stderr)
        return 2

    class UpdateOnly(nn.Module):
        """The update branch as a per-frame network (its logits at its own resolution)."""

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": net.update_scores(x, x.shape[-2:])}

    groups = {g.strip() for g in args.rows.split(",") if g.strip()}
    if not groups or groups - {"per-frame", "accel", "flow"}:
        print(f"--rows: choose from per-frame, accel, flow; got {args.rows!r}", file=sys.stderr)
        return 2
    build_flow(flow_name)  # a bad flow name fails here, before any row runs
    # The (K, N) pairs the predictor accepts (one rule: KeyframePredictor's); an age no K accepts
    # fails here, before any row runs, and an age only some K accept runs with those K.
    accel_rows: list[tuple[int, int]] = []
    if "accel" in groups:
        refused: dict[int, str] = {}
        for k in intervals:
            for age in fuse_ages:
                try:
                    KeyframePredictor(net, cfg, build_flow(flow_name), k, fuse_from_age=age)
                    accel_rows.append((k, age))
                except ConfigError as e:
                    refused[age] = str(e)
        never = [age for age in fuse_ages if age in refused and all(a != age for _, a in accel_rows)]
        if never:
            print(f"--fuse-from-ages: {refused[never[0]]}", file=sys.stderr)
            return 2
    rows: list[tuple[str, Any]] = []
    if "per-frame" in groups:
        rows += [("per-frame reference", lambda: Predictor.single(net.reference, cfg)),
                 (f"per-frame update (x{net.update_scale:g} input)", lambda: Predictor.single(UpdateOnly(), cfg))]
    prop = {"propagation": args.propagation, "warp_at": args.warp_at, "bidirectional": args.bidirectional}
    warp_only = AccelNet(net.reference, None, net.num_classes, flow=flow_name)
    for k, age in accel_rows:
        rows.append((f"Accel K={k}" + (f", fused from age {age}" if age else ""),
                     lambda k=k, age=age: KeyframePredictor(net, cfg, build_flow(flow_name), k,
                                                            fuse_from_age=age, **prop)))
    if "flow" in groups:
        for k in intervals:
            if k > 1:  # the reference warped along the flow, no update branch (what fusion adds to)
                rows.append((f"reference + flow K={k}",
                             lambda k=k: KeyframePredictor(warp_only, cfg, build_flow(flow_name), k, **prop)))
    if not rows:
        print("no rows to run (--rows flow needs an interval K > 1)", file=sys.stderr)
        return 2

    def run(make: Any, subset: list[Any]) -> tuple[Any, Timed]:
        timed = Timed(make())
        with torch.inference_mode(), (timed.eval_mode() if hasattr(timed.base, "eval_mode") else contextlib.nullcontext()):
            res = evaluate(timed, videoset, subset, cfg, dev, progress=False)
        return res, timed

    run(rows[-1][1], frames[: min(len(frames), 12)])  # warm-up (allocator, threads, DIS)
    results = []
    for name, make in rows:
        res, timed = run(make, frames)
        m = res.scalars()
        row = {"row": name, "frames": timed.frames, "seconds": round(timed.seconds, 3),
               "fps": round(timed.frames / timed.seconds, 2),
               "mIoU": m["mIoU"], "fwIoU": m["fwIoU"], "VC8": m.get("VC8"), "VC16": m.get("VC16")}
        base = timed.base
        if isinstance(base, KeyframePredictor):
            row["keyframes"] = base.keyframes
            row["stage_seconds"] = {k: round(v, 3) for k, v in base.timings.items()}
        results.append(row)
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in row.get("stage_seconds", {}).items())
        print(f"{name:34s} {row['fps']:7.2f} frames/s  mIoU {100 * row['mIoU']:5.2f}  "
              f"VC8 {100 * (row['VC8'] or 0):5.2f}  VC16 {100 * (row['VC16'] or 0):5.2f}"
              + (f"  [{row['keyframes']} key frames; {stages}]" if stages else ""), flush=True)
    if results[0]["row"] == "per-frame reference":
        for row in results:
            row["speedup_vs_reference"] = round(row["fps"] / results[0]["fps"], 3)
    info = machine_info()
    print(f"machine: {info.get('cpu')}; device {dev}; {'bf16 autocast' if amp else 'fp32'}; input "
          f"{cfg.size}; flow {flow_name} ({args.propagation}{', bidirectional' if args.bidirectional else ''}, warp at {args.warp_at}); {len(frames)} frames of {args.format} {args.split}")
    if args.out is not None:
        record = {
            "benchmark": "video_inference", "model": str(args.accel), "data": str(args.data),
            "format": args.format, "split": args.split, "frames": len(frames), "input_size": cfg.size,
            "precision": "bf16" if amp else "fp32", "device": str(dev), "flow": flow_name,
            "propagation": args.propagation, "warp_at": args.warp_at, "bidirectional": args.bidirectional,
            "fuse_from_ages": fuse_ages, "update_scale": net.update_scale, "commit": git_commit(Path.cwd()), "machine": info,
            "rows": results,
        }
        write_record(record, args.out, overwrite=True)
        print(f"record -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
