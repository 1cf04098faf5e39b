"""Evaluation loop: mIoU family, VC_n and the per-offset analysis over annotated frames.

Implements docs/protocols.md#5-evaluation: frames fed at ``cfg.size``, logits upsampled to the
full-resolution label, one confusion matrix over all frames (docs/methods.md#9-metrics), VC_n over
each video's annotated frames in order, and (optionally) per-frame confusion matrices pooled by
offset (docs/methods.md#10-inner-video-overfitting). Predictions go through a
:class:`~semivss.inference.predict.Predictor`, so multi-scale + flip TTA and checkpoint ensembles
work here too.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table
from torch import Tensor, nn

from semivss.errors import DataError
from semivss.inference.config import EvalConfig
from semivss.inference.predict import Predictor, as_predictor
from semivss.inference.video_predictor import VideoPredictor, frames_until_last, run_videos
from semivss.inference.writers import check_new_output, save_label_png
from semivss.metrics.confusion import ConfusionMatrix
from semivss.metrics.offset import OffsetTable, offset_table
from semivss.metrics.vc import VideoConsistency
from semivss.progress import make_progress

__all__ = ["EvalResult", "evaluate", "evaluate_items", "make_progress"]


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


@dataclass
class EvalResult:
    """Metrics of one evaluation (fractions in 0..1).

    ``metrics`` keys: ``mIoU``, ``fwIoU``, ``pixel_acc``, ``mAcc``, ``VC<n>`` for each n,
    ``n_frames``, ``n_pixels``, ``iou`` and ``class_acc`` (``{class name: value}``, NaN where
    undefined), ``vc_windows`` (``{n: windows averaged}``).
    """

    metrics: dict[str, Any]
    class_names: list[str]
    confusion: ConfusionMatrix
    offset_table: OffsetTable | None = None
    frame_matrices: dict[Any, np.ndarray] | None = field(default=None, repr=False)
    seconds: float = 0.0

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    @property
    def offsets(self) -> OffsetTable | None:
        """The per-offset table (only when ``offsets`` were given to :func:`evaluate`)."""
        return self.offset_table

    def scalars(self) -> dict[str, float]:
        """The scalar metrics as floats (mIoU, fwIoU, pixel_acc, mAcc, VC<n>), for logging."""
        keys = ["mIoU", "fwIoU", "pixel_acc", "mAcc"]
        keys += [k for k in self.metrics if k.startswith("VC") and k[2:].isdigit()]
        return {k: float(self.metrics[k]) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN -> null), with the offset table rows when present."""
        out: dict[str, Any] = {
            "metrics": _nan_to_none(
                {**self.metrics, "vc_windows": {str(k): v for k, v in
                                                self.metrics.get("vc_windows", {}).items()}}
            ),
            "class_names": list(self.class_names),
            "seconds": self.seconds,
            # rows: ground-truth class, columns: predicted class (pixel counts, class_names order)
            "confusion_matrix": self.confusion.matrix.tolist(),
        }
        if self.offset_table is not None:
            out["offsets"] = self.offset_table.to_dicts()
        return out

    def to_json(self, path: str | Path, context: dict[str, Any] | None = None) -> Path:
        """Write :meth:`to_dict` as JSON (atomically: a failed write leaves no partial file);
        ``context`` (what was scored: data, format, split, checkpoint, inference options) is
        written first, as top-level keys."""
        from semivss.engine.checkpoint import atomic_write

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps({**(context or {}), **self.to_dict()}, indent=2, default=str) + "\n").encode()
        atomic_write(path, lambda f: f.write(data))
        return path

    def summary(self) -> str:
        """One line: mIoU, fwIoU, pixel acc and VC_n in percent."""
        parts = [f"{k} {100 * self.metrics[k]:.2f}" for k in ("mIoU", "fwIoU", "pixel_acc")]
        parts += [
            f"{k} {100 * v:.2f}" for k, v in self.metrics.items()
            if k.startswith("VC") and k[2:].isdigit()
        ]
        return ", ".join(parts) + f" ({self.metrics['n_frames']} frames)"

    def table(self, title: str = "Evaluation") -> Table:
        """A ``rich`` table: per-class IoU / accuracy, then the summary metrics (percent)."""
        t = Table(title=title)
        t.add_column("class")
        t.add_column("IoU %", justify="right")
        t.add_column("Acc %", justify="right")

        def pct(v: float) -> str:
            return "-" if v is None or math.isnan(v) else f"{100 * v:.2f}"

        for name in self.class_names:
            t.add_row(name, pct(self.metrics["iou"][name]), pct(self.metrics["class_acc"][name]))
        t.add_section()
        t.add_row("[bold]mIoU[/bold]", pct(self.metrics["mIoU"]), pct(self.metrics["mAcc"]))
        t.add_row("fwIoU", pct(self.metrics["fwIoU"]), "")
        t.add_row("pixel acc", "", pct(self.metrics["pixel_acc"]))
        for k, v in self.metrics.items():
            if k.startswith("VC") and k[2:].isdigit():
                windows = self.metrics.get("vc_windows", {}).get(int(k[2:]), 0)
                t.add_row(f"{k} ({windows} windows)", pct(v), "")
        t.add_row("frames", str(self.metrics["n_frames"]), "")
        return t


def _as_label(x: Any) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(torch.int64)


def _sum_over_ranks(value: int) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def _in_order(items: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """``items`` unchanged, checked to come video by video and by increasing index (VC_n and
    temporal predictors need it); DataError naming the first frame out of order."""
    last_index: dict[str, int] = {}
    prev_video = ""
    for item in items:
        video, index = str(item["video"]), int(item["index"])
        if video in last_index and index <= last_index[video]:
            raise DataError(
                f"frame {video}/{index} comes after {video}/{last_index[video]}: evaluation "
                "frames must be ordered by index within each video (VC_n needs it)"
            )
        if video in last_index and video != prev_video:
            raise DataError(
                f"frame {video}/{index}: the frames of video {video!r} are not contiguous "
                "(evaluation frames must be ordered by video, then index)"
            )
        last_index[video] = index
        prev_video = video
        yield item


def evaluate_items(
    model: nn.Module | VideoPredictor,
    items: Iterable[Mapping[str, Any]],
    class_names: Sequence[str],
    cfg: EvalConfig,
    device: torch.device | str,
    offsets: Mapping[Any, int] | None = None,
    subset: str = "eval",
    model_name: str | None = None,
    palette: Any = None,
    save_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    total: int | None = None,
    ignore_index: int = 255,
    all_reduce: bool = False,
    on_frame: Callable[[str, int, Tensor, Tensor], None] | None = None,
) -> EvalResult:
    """Evaluate on ``items`` of the ``EvalFrames`` contract (see :func:`evaluate`).

    Each item is a dict with ``image`` (3, h, w) normalised, ``label`` (H, W) at original
    resolution, ``video``, ``index`` and optionally ``has_label`` (frames without a label are
    predicted, and saved with ``save_dir``, but not scored) and ``scored`` (False: a frame only a
    temporal predictor needs, neither saved nor scored); items come ordered by video, then index.
    ``model`` is a model (run with ``cfg``, TTA included) or a ``VideoPredictor`` (an ensemble, a
    temporal model; ``cfg`` then gives only ``batch_size`` and ``vc``); images must be prepared at
    ``predictor.input_size``. The predictor is reset at each video and gets up to
    ``cfg.batch_size`` consecutive frames of one video at a time; predictions are made at each
    frame's label size. ``on_frame(video, index, pred, label)`` is called on every scored frame
    (e.g. a :class:`~semivss.inference.stills.StillWriter`).
    """
    device = torch.device(device)
    predictor = as_predictor(model, cfg)
    num_classes = len(class_names)
    cm = ConfusionMatrix(num_classes, ignore_index)
    vc = VideoConsistency(cfg.vc)
    key_of: dict[tuple[str, int], Any] = {}
    if offsets is not None:
        for k in offsets:
            if not (hasattr(k, "video") and hasattr(k, "index")):
                raise DataError(f"offsets key {k!r} is not a frame reference (video, index)")
            key_of[(str(k.video), int(k.index))] = k
    frame_mats: dict[Any, np.ndarray] = {}
    out_dir: Path | None = None
    if save_dir is not None:
        if palette is None:
            raise ValueError("save_dir needs a palette")
        out_dir = check_new_output(save_dir, overwrite)
    scored: list[str | None] = [None]  # video of the last scored frame
    n_frames = 0
    start = time.perf_counter()

    def score(batch: list[Mapping[str, Any]], preds: Tensor) -> None:
        nonlocal n_frames
        preds = preds.to("cpu")
        for j, item in enumerate(batch):
            if not bool(item.get("scored", True)):
                continue  # a frame the (temporal) predictor needed: neither written nor scored
            label = _as_label(item["label"])
            video, index = str(item["video"]), int(item["index"])
            pred = preds[j]
            if out_dir is not None:
                save_label_png(out_dir / video / f"{index:08d}.png", pred.numpy(), palette)
            if not bool(item.get("has_label", True)):
                continue  # an unannotated frame: prediction written, nothing scored
            if scored[0] is not None and scored[0] != video:
                vc.finish(scored[0])  # frames come video by video: free the previous state
            scored[0] = video
            if on_frame is not None:
                on_frame(video, index, pred, label)
            key = key_of.get((video, index))
            try:
                if key is None:
                    cm.update(pred, label)
                else:  # count the frame once: its own matrix (offset analysis), merged into the total
                    fcm = ConfusionMatrix(num_classes, ignore_index)
                    fcm.update(pred, label)
                    frame_mats[key] = fcm.raw
                    cm.merge(fcm)
                vc.update(video, pred, label)
            except DataError as e:
                raise DataError(f"frame {video}/{index}: {e}") from e
            n_frames += 1

    with predictor.eval_mode(), make_progress(progress) as bar:
        task = bar.add_task(f"eval {subset}", total=total)
        batches = run_videos(
            predictor, _in_order(items), video=lambda it: str(it["video"]),
            image=lambda it: torch.as_tensor(it["image"]),
            out_size=lambda it: tuple(int(v) for v in torch.as_tensor(it["label"]).shape[-2:]),
            batch_size=cfg.batch_size, device=device,
        )
        for batch, preds, _ in batches:
            score(batch, preds)
            bar.advance(task, len(batch))

    if all_reduce:
        cm.all_reduce()
        vc.all_reduce()
        n_frames = _sum_over_ranks(n_frames)
    if n_frames == 0:
        raise DataError(f"evaluation of {subset!r}: no annotated frames to evaluate")
    res = cm.compute()
    vcs = vc.compute()
    metrics: dict[str, Any] = {
        "mIoU": res["mIoU"],
        "fwIoU": res["fwIoU"],
        "pixel_acc": res["pixel_acc"],
        "mAcc": res["mAcc"],
        **{f"VC{n}": v for n, v in vcs.items()},
        "n_frames": n_frames,
        "n_pixels": res["n_pixels"],
        "iou": {name: float(v) for name, v in zip(class_names, res["iou"])},
        "class_acc": {name: float(v) for name, v in zip(class_names, res["class_acc"])},
        "vc_windows": vc.window_counts(),
    }
    table = None
    if offsets is not None:
        table = offset_table(frame_mats, offsets, subset=subset, model=model_name)
    return EvalResult(
        metrics=metrics,
        class_names=list(class_names),
        confusion=cm,
        offset_table=table,
        frame_matrices=frame_mats if offsets is not None else None,
        seconds=time.perf_counter() - start,
    )


def evaluate(
    model: nn.Module | Predictor,
    videoset: Any,
    frames: Sequence[Hashable],
    cfg: EvalConfig,
    device: torch.device | str,
    offsets: Mapping[Any, int] | None = None,
    progress: bool = True,
    save_dir: str | Path | None = None,
    *,
    subset: str = "eval",
    model_name: str | None = None,
    overwrite: bool = False,
    num_workers: int = 0,
    all_reduce: bool = False,
    stills: int = 0,
    stills_dir: str | Path | None = None,
) -> EvalResult:
    """Evaluate ``model`` on the annotated ``frames`` (``FrameRef`` list) of ``videoset``.

    ``model``: one model run with ``cfg`` (including its TTA ``scales``/``flip``), or a
    ``VideoPredictor`` (ensemble, temporal model; ``cfg`` then only gives ``batch_size`` and
    ``vc``). Frames are read through ``semivss.data.clips.EvalFrames``; a temporal predictor also
    steps through the other frames of each video up to its last evaluated frame, and its
    ``lookahead`` frames beyond it (``frames_until_last``), which are neither scored nor saved.
    Returns an :class:`EvalResult` with mIoU, fwIoU, pixel accuracy, per-class IoU, VC_n and, when
    ``offsets`` (frame -> signed offset from the nearest labeled frame) is given, the per-offset
    table of ``subset`` / ``model_name``. ``save_dir``: prediction PNGs
    ``<save_dir>/<video>/<index:08d>.png`` in the dataset palette (refuses to write into a
    non-empty directory unless ``overwrite``). ``all_reduce``: sum counts over DDP ranks (each
    rank evaluating different videos). ``stills``: write that many stills (image | ground truth |
    prediction | errors) of frames spread over ``frames`` into ``stills_dir``
    (:mod:`semivss.inference.stills`).
    """
    from semivss.data.clips import EvalFrames
    from semivss.data.video import FrameRef

    predictor = as_predictor(model, cfg)
    wanted = set(frames)
    ahead = int(getattr(predictor, "lookahead", 0))  # frames a delaying predictor needs past the last one
    context = ([r for r in frames_until_last(videoset, wanted, ahead) if r not in wanted]
               if predictor.temporal else [])
    ds = EvalFrames(videoset, list(frames), predictor.input_size, context=context)
    writer = None
    if stills > 0:
        from semivss.inference.stills import StillWriter, pick_frames

        if stills_dir is None:
            raise ValueError("stills needs a stills_dir")
        chosen = pick_frames([(r.video, r.index) for r in ds.frames if r in wanted], stills)
        writer = StillWriter(stills_dir, chosen, lambda v, i: videoset.read_image(FrameRef(v, i)),
                             videoset.palette, overwrite=overwrite)
    items: Iterable[Mapping[str, Any]]
    if num_workers > 0:
        items = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False,
                                            num_workers=num_workers)
    else:
        items = (ds[i] for i in range(len(ds)))
    result = evaluate_items(
        predictor,
        items,
        list(videoset.classes),
        cfg,
        device,
        offsets=offsets,
        subset=subset,
        model_name=model_name,
        palette=getattr(videoset, "palette", None),
        save_dir=save_dir,
        overwrite=overwrite,
        progress=progress,
        total=len(ds),
        all_reduce=all_reduce,
        on_frame=writer,
    )
    if writer is not None:
        writer.finish()
    return result
