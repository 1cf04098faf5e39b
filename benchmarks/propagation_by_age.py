"""Accuracy of flow propagation as a function of the reference's age (docs/methods.md#14-accel).

Key-frame inference at interval K shows every frame with a reference score map that is 0..K-1
frames old, so its mIoU mixes ages. This diagnosis separates them: for each age a, every scored
frame t is predicted from the reference scores of frame t - a carried to t along the flows
(Eq. (ACC-1), chained or composed, on the score or input grid), and, for an Accel model, fused
with the update branch on frame t (Eq. (ACC-2)). Frames before ``--max-age`` only feed the
propagation, so every age is scored on the same frames. The mean of the per-age mIoU over ages
0..K-1 estimates the K-row of benchmarks/video_inference.py without its key-frame phase.

    python benchmarks/propagation_by_age.py runs/accel/camvid-ssvs-1-8-accel-supervised-u0.5-k0/model.safetensors \\
        --data ../shared/data/camvid --propagation composed --warp-at input \\
        --out results/benchmarks/propagation_by_age-camvid-supervised-composed-input.json

No speed is measured (every frame runs the reference network).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("accel", type=Path, help="a trained Accel model (its reference, update branch and fusion)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--format", default="camvid")
    p.add_argument("--split", default="val")
    p.add_argument("--max-age", type=int, default=9, help="ages 0..MAX_AGE frames")
    p.add_argument("--flow", default=None, help="flow name (default: the model's), e.g. dis-fast, dis-medium")
    p.add_argument("--propagation", default="chained", choices=["chained", "composed"])
    p.add_argument("--warp-at", default="score", choices=["score", "input"])
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on CPU / fp16 on CUDA (default: on for CPUs with native bf16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="write the figures as a JSON record")
    return p.parse_args(argv)


class FixedAge:
    """A VideoPredictor whose every frame is predicted from the reference scores of the frame
    ``age`` frames earlier (fewer at the start of a video), warped along the flows in between;
    with ``fuse`` the Accel fusion with the update branch on the frame itself is applied."""

    temporal = True

    def __init__(self, net: Any, cfg: Any, flow: Any, age: int, propagation: str, warp_at: str, fuse: bool) -> None:
        self.net, self.cfg, self.flow, self.age = net, cfg, flow, age
        self.propagation, self.warp_at, self.fuse = propagation, warp_at, fuse
        self.reset()

    @property
    def input_size(self) -> tuple[int, int] | None:
        return self.cfg.size

    def reset(self) -> None:
        self._scores: deque[Any] = deque(maxlen=self.age + 1)  # reference scores of the last frames
        self._flows: deque[Any] = deque(maxlen=max(self.age, 1))  # flow of each of them from its predecessor
        self._prev: Any = None

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[FixedAge]:
        from semivss.inference.predict import eval_mode

        with eval_mode(self.net):
            yield self

    def _carry(self) -> Any:
        """The oldest kept reference scores carried to the newest frame."""
        from semivss.models.flow import compose_flows, warp

        score = self._scores[0]
        flows = list(self._flows)[len(self._flows) - (len(self._scores) - 1):] if len(self._scores) > 1 else []
        if self.propagation == "chained":
            for f in flows:
                score, _ = warp(score, f)
            return score
        if not flows:
            return score
        total = flows[0]
        for f in flows[1:]:
            total = compose_flows(total, f)
        return warp(score, total)[0]

    def step(self, images: Any, out_size: tuple[int, int], with_probs: bool = False) -> tuple[Any, None]:
        import torch

        from semivss.ops import class_argmax, resize, resize_channels_last

        dev = images.device
        labels = []
        with torch.inference_mode():
            amp = (torch.autocast(dev.type, dtype=torch.bfloat16 if dev.type == "cpu" else torch.float16)
                   if self.cfg.amp else contextlib.nullcontext())
            with amp:
                refs = self.net.reference_scores(images).float()
            if self.warp_at == "input":
                refs = resize(refs, images.shape[-2:])
            for j in range(images.shape[0]):
                x = images[j : j + 1]
                if self._prev is not None:
                    self._flows.append(self.flow(x, self._prev))
                self._prev = x
                self._scores.append(refs[j : j + 1])
                score = self._carry()
                if self.fuse:
                    with amp:
                        upd = self.net.update_scores(x, score.shape[-2:]).float()
                    score = self.net.fuse(score, upd).float()
                labels.append(class_argmax(resize_channels_last(score, out_size)))
        return torch.cat(labels), None


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    from video_inference import load_accel  # the sibling benchmark (this directory is on sys.path)

    from semivss.inference.evaluate import evaluate
    from semivss.models.flow import build_flow
    from semivss.results import git_commit, machine_info, write_record

    if args.max_age < 0:
        print("--max-age must be >= 0", file=sys.stderr)
        return 2
    loaded = load_accel(args, need_update=False)
    if loaded is None:
        return 2
    dev, net, cfg, amp, videoset = loaded
    frames = videoset.annotated()
    flow_name = args.flow or net.flow
    build_flow(flow_name)
    per_video: dict[str, list[Any]] = {}
    for r in frames:
        per_video.setdefault(str(r.video), []).append(r)
    scored = [r for refs in per_video.values() for r in sorted(refs, key=lambda r: r.index)[args.max_age:]]
    if not scored:
        print(f"no video has more than {args.max_age} annotated frames", file=sys.stderr)
        return 2
    thin = [c for c in ("Pole", "SignSymbol", "Pedestrian", "Bicyclist", "Fence") if c in videoset.classes]
    rows = []
    kinds = [("reference + flow", False)] + ([("Accel", True)] if net.update is not None else [])
    for name, fuse in kinds:
        for age in range(args.max_age + 1):
            pred = FixedAge(net, cfg, build_flow(flow_name), age, args.propagation, args.warp_at, fuse)
            with torch.inference_mode(), pred.eval_mode():
                m = evaluate(pred, videoset, scored, cfg, dev, progress=False).metrics
            row = {"row": name, "age": age, "mIoU": m["mIoU"], "fwIoU": m["fwIoU"], "VC8": m.get("VC8"),
                   "iou": {c: m["iou"][c] for c in thin}}
            rows.append(row)
            print(f"{name:18s} age {age:2d}  mIoU {100 * m['mIoU']:5.2f}  VC8 {100 * (m.get('VC8') or 0):5.2f}  "
                  + "  ".join(f"{c} {100 * m['iou'][c]:5.2f}" for c in thin), flush=True)
    for name, _ in kinds:
        per_age = [r["mIoU"] for r in rows if r["row"] == name]
        est = {k: sum(per_age[:k]) / k for k in (1, 2, 5, 10) if k <= len(per_age)}
        print(f"{name}: mean per-age mIoU over ages 0..K-1: "
              + ", ".join(f"K={k} {100 * v:.2f}" for k, v in est.items()))
    info = machine_info()
    print(f"machine: {info.get('cpu')}; device {dev}; {'bf16 autocast' if amp else 'fp32'}; input {cfg.size}; "
          f"flow {flow_name} ({args.propagation}, warp at {args.warp_at}); {len(scored)} scored frames of "
          f"{args.format} {args.split}")
    if args.out is not None:
        record = {
            "benchmark": "propagation_by_age", "model": str(args.accel), "data": str(args.data),
            "format": args.format, "split": args.split, "scored_frames": len(scored), "input_size": cfg.size,
            "precision": "bf16" if amp else "fp32", "device": str(dev), "flow": flow_name,
            "propagation": args.propagation, "warp_at": args.warp_at, "update_scale": net.update_scale,
            "commit": git_commit(Path.cwd()), "machine": info, "rows": rows,
        }
        write_record(record, args.out, overwrite=True)
        print(f"record -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
