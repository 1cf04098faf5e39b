"""Accuracy of flow propagation by the reference's age, and with key frames on both sides
(docs/methods.md#14-accel).

Key-frame inference at interval K shows every frame with a reference score map 0..K-1 frames
old, so its mIoU mixes ages. This diagnosis separates them. The reference scores, the update
branch's scores and the flows between neighbouring frames are computed once per video; then

- *age a* rows: every scored frame t is predicted from the reference scores of frame t - a carried
  to t along the flows (Eq. (ACC-1), chained or composed (ACC-1c), on the score or input grid),
  alone ("reference + flow") and fused with the update branch on frame t (Eq. (ACC-2), "Accel").
  Frames before ``--max-age`` only feed the propagation, so every age is scored on the same frames;
- *K* rows: key frames every K frames from each video's first frame, every frame scored; "causal"
  carries the previous key frame's scores forward (what ``KeyframePredictor`` does without an
  update branch), "both sides" also carries the next key frame's scores backward along the flows
  towards the past, and averages the two class-probability maps weighted by temporal nearness
  (an offline mode: a frame's output waits for the next key frame).

    python benchmarks/propagation_by_age.py runs/accel/camvid-ssvs-1-8-accel-supervised-u0.5-k0/model.safetensors \\
        --data ../shared/data/camvid --propagation composed --warp-at input \\
        --out results/benchmarks/propagation_by_age-camvid-supervised-composed-input.json

No speed is measured (every frame runs the reference network once).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from video_inference import accel_parser  # the sibling benchmark (this directory is on sys.path)

    p = accel_parser(__doc__)
    p.add_argument("--max-age", type=int, default=9, help="age rows 0..MAX_AGE frames")
    p.add_argument("--intervals", default="2,3,5,10", help="key-frame intervals K of the K rows")
    return p.parse_args(argv)


class Replay:
    """A VideoPredictor that returns precomputed score maps in the order ``evaluate`` asks for
    them (videos in set order, frames in index order), as labels at the requested size."""

    temporal = True

    def __init__(self, scores: list[list[Any]], size: tuple[int, int] | None) -> None:
        self._videos, self._size = scores, size
        self._next_video = 0
        self._queue: list[Any] = []

    @property
    def input_size(self) -> tuple[int, int] | None:
        return self._size

    def reset(self) -> None:
        self._queue = list(self._videos[self._next_video])
        self._next_video += 1

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[Replay]:
        yield self

    def step(self, images: Any, out_size: tuple[int, int], with_probs: bool = False) -> tuple[Any, None]:
        import torch

        from semivss.ops import class_argmax, resize_channels_last

        taken, self._queue = self._queue[: images.shape[0]], self._queue[images.shape[0]:]
        return torch.cat([class_argmax(resize_channels_last(s, out_size)) for s in taken]), None


def carry(score: Any, flows: list[Any], propagation: str) -> Any:
    """``score`` of a key frame carried along ``flows`` (the flow adjacent to the key frame first,
    the target frame's last): warped once per flow (chained) or once by their composition."""
    from semivss.models.flow import compose_flows, warp

    if not flows:
        return score
    if propagation == "chained":
        for f in flows:
            score, _ = warp(score, f)
        return score
    total = flows[0]
    for f in flows[1:]:
        total = compose_flows(total, f)
    return warp(score, total)[0]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch

    from video_inference import load_accel  # the sibling benchmark (this directory is on sys.path)

    from semivss.data.clips import EvalFrames
    from semivss.inference.evaluate import evaluate
    from semivss.inference.video_predictor import frames_until_last
    from semivss.models.flow import build_flow
    from semivss.ops import resize
    from semivss.results import git_commit, machine_info, write_record

    intervals = [int(k) for k in args.intervals.split(",") if k.strip()]
    if args.max_age < 0 or any(k < 1 for k in intervals):
        print("--max-age must be >= 0 and every interval >= 1", file=sys.stderr)
        return 2
    loaded = load_accel(args, need_update=False)
    if loaded is None:
        return 2
    dev, net, cfg, amp, videoset = loaded
    flow = build_flow(args.flow or net.flow)
    annotated = videoset.annotated()
    stream = EvalFrames(videoset, annotated, cfg.size,
                        context=[r for r in frames_until_last(videoset, annotated, max(intervals) - 1)
                                 if r not in set(annotated)])  # up to the next key frame of the last one
    videos: dict[str, list[dict[str, Any]]] = {}
    for i in range(len(stream)):
        item = stream[i]
        videos.setdefault(str(item["video"]), []).append({"ref": stream.frames[i], "image": item["image"]})

    # once per video: reference and update scores, backward flows (t -> t-1), forward flows (t -> t+1)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16 if dev.type == "cpu" else torch.float16)
                if amp else contextlib.nullcontext())
    pre: dict[str, dict[str, Any]] = {}
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        from semivss.inference.predict import eval_mode

        stack.enter_context(eval_mode(net))
        for name, items in videos.items():
            x = torch.stack([it["image"] for it in items]).to(dev)
            ref, upd = [], []
            for s in range(0, x.shape[0], 8):
                with autocast:
                    r = net.reference_scores(x[s : s + 8]).float()
                    if args.warp_at == "input":
                        r = resize(r, x.shape[-2:])
                    ref.append(r)
                    if net.update is not None:
                        upd.append(net.update_scores(x[s : s + 8], r.shape[-2:]).float())
            back = [None] + [flow(x[t : t + 1], x[t - 1 : t]) for t in range(1, x.shape[0])]
            fwd = [flow(x[t : t + 1], x[t + 1 : t + 2]) for t in range(x.shape[0] - 1)] + [None]
            pre[name] = {"ref": torch.cat(ref), "upd": torch.cat(upd) if upd else None, "back": back, "fwd": fwd}
            print(f"[propagation] {name}: {x.shape[0]} frames prepared", flush=True)

    def causal(name: str, t: int, key: int) -> Any:
        p = pre[name]
        return carry(p["ref"][key : key + 1], p["back"][key + 1 : t + 1], args.propagation)

    def both_sides(name: str, t: int, k: int) -> Any:
        """Probability-weighted blend of the previous and the next key frame's carried scores
        (log of the blend, so that the argmax and the resizing act on it as on scores)."""
        p = pre[name]
        prev, n = (t // k) * k, (t // k + 1) * k
        back = torch.softmax(causal(name, t, prev), dim=1)
        if t == prev or n >= p["ref"].shape[0]:
            return back.clamp_min(1e-12).log()
        ahead = torch.softmax(carry(p["ref"][n : n + 1], p["fwd"][t:n][::-1], args.propagation), dim=1)
        w = (n - t) / k  # the nearer key frame weighs more
        return (w * back + (1 - w) * ahead).clamp_min(1e-12).log()

    thin = [c for c in ("Pole", "SignSymbol", "Pedestrian", "Bicyclist", "Fence") if c in videoset.classes]
    rows: list[dict[str, Any]] = []

    def score(row: dict[str, Any], maps: dict[str, list[Any]], frames: list[Any]) -> None:
        shown = {r.video for r in frames}  # evaluate steps through the videos with scored frames only
        replay = Replay([maps[name] for name in videos if name in shown], cfg.size)
        m = evaluate(replay, videoset, frames, cfg, dev, progress=False).metrics
        row.update({"mIoU": m["mIoU"], "fwIoU": m["fwIoU"], "VC8": m.get("VC8"), "iou": {c: m["iou"][c] for c in thin}})
        rows.append(row)
        label = f"{row['row']} {'age' if 'age' in row else 'K'} {row.get('age', row.get('K')):>2}"
        print(f"{label:32s} mIoU {100 * m['mIoU']:5.2f}  VC8 {100 * (m.get('VC8') or 0):5.2f}  "
              + "  ".join(f"{c} {100 * m['iou'][c]:5.2f}" for c in thin), flush=True)

    is_annotated = set(annotated)
    scored = [it["ref"] for items in videos.values() for it in items[args.max_age:] if it["ref"] in is_annotated]
    if not scored:
        print(f"no video has more than {args.max_age} frames", file=sys.stderr)
        return 2
    with torch.inference_mode():
        kinds = [("reference + flow", False)] + ([("Accel", True)] if net.update is not None else [])
        for kind, fuse in kinds:
            for age in range(args.max_age + 1):
                maps: dict[str, list[Any]] = {}
                for name, items in videos.items():
                    out = []
                    for t in range(len(items)):
                        s = causal(name, t, max(0, t - age))
                        out.append(net.fuse(s, pre[name]["upd"][t : t + 1]).float() if fuse else s)
                    maps[name] = out
                score({"row": kind, "age": age}, maps, scored)
        for k in intervals:
            for kind, fn in (("causal", lambda n, t, k: causal(n, t, (t // k) * k)), ("both sides", both_sides)):
                maps = {name: [fn(name, t, k) for t in range(len(items))] for name, items in videos.items()}
                score({"row": f"reference + flow, {kind}", "K": k}, maps, annotated)
    for kind, _ in kinds:
        per_age = [r["mIoU"] for r in rows if r["row"] == kind and "age" in r]
        print(f"{kind}: mean per-age mIoU over ages 0..K-1: "
              + ", ".join(f"K={k} {100 * sum(per_age[:k]) / k:.2f}" for k in intervals if k <= len(per_age)))
    info = machine_info()
    print(f"machine: {info.get('cpu')}; device {dev}; {'bf16 autocast' if amp else 'fp32'}; input {cfg.size}; "
          f"flow {flow.name if hasattr(flow, 'name') else args.flow} ({args.propagation}, warp at {args.warp_at}); "
          f"{len(scored)} frames scored by age, {len(annotated)} by K, {args.format} {args.split}")
    if args.out is not None:
        record = {
            "benchmark": "propagation_by_age", "model": str(args.accel), "data": str(args.data),
            "format": args.format, "split": args.split, "frames_by_age": len(scored), "frames_by_k": len(annotated),
            "input_size": cfg.size, "precision": "bf16" if amp else "fp32", "device": str(dev),
            "flow": getattr(flow, "name", args.flow), "propagation": args.propagation, "warp_at": args.warp_at,
            "update_scale": net.update_scale, "commit": git_commit(Path.cwd()), "machine": info, "rows": rows,
        }
        write_record(record, args.out, overwrite=True)
        print(f"record -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
