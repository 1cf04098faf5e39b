"""Scoring stored predictions without a model, and writing them in a benchmark's submission layout.

:func:`score_predictions` reads one prediction PNG per annotated frame of a video set (values =
class ids 0..C-1, 255 = none) and computes exactly what ``semivss evaluate`` computes (mIoU,
fwIoU, pixel accuracy, VC8, VC16: docs/methods.md#9-metrics) by driving the same evaluation loop
with a predictor that returns the stored maps. :func:`write_submission` writes a predictor's
labels for every frame of a split in the VSPW submission layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from semivss.data.video import FrameRef
from semivss.errors import DataError
from semivss.inference.config import EvalConfig
from semivss.inference.evaluate import EvalResult, evaluate_items
from semivss.inference.video_predictor import VideoPredictor, run_videos

__all__ = ["prediction_path", "score_predictions", "write_submission"]


class _Stored:
    """A stateless ``VideoPredictor`` whose "images" are already label maps (B,1,H,W)."""

    temporal = False
    input_size = None

    def reset(self) -> None: ...

    def eval_mode(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()

    def step(self, images: Tensor, out_size: tuple[int, int], with_probs: bool = False) -> tuple[Tensor, None]:
        return images[:, 0].long(), None


def prediction_path(pred_dir: Path, videoset: Any, ref: FrameRef) -> Path:
    """Where the prediction of ``ref`` lies: ``<pred_dir>/<video>/<frame file stem>.png`` (the VSPW
    submission layout), else ``<pred_dir>/<video>/<index:08d>.png`` (``evaluate --save-preds``)."""
    frame = videoset.frame(ref)
    stem = Path(frame.image).stem if frame.image is not None else f"{ref.index:08d}"
    named = pred_dir / ref.video / f"{stem}.png"
    if named.is_file():
        return named
    return pred_dir / ref.video / f"{ref.index:08d}.png"


def _read_prediction(path: Path, num_classes: int, size: tuple[int, int]) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"prediction missing: {path}")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"{path}: a prediction must be a single-channel PNG of class ids, got mode {im.mode}")
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read the prediction PNG ({exc})") from None
    if arr.shape != size:
        raise DataError(f"{path}: prediction is {arr.shape[1]}x{arr.shape[0]}, its label {size[1]}x{size[0]}")
    bad = np.unique(arr[(arr >= num_classes) & (arr != 255)])
    if bad.size:
        raise DataError(f"{path}: values {bad[:5].tolist()} are not class ids 0..{num_classes - 1} (or 255)")
    return arr


def score_predictions(
    pred_dir: str | Path, videoset: Any, vc: tuple[int, ...] = (8, 16), progress: bool = True
) -> EvalResult:
    """Score the prediction PNGs under ``pred_dir`` against every annotated frame of ``videoset``."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"prediction folder not found: {pred_dir}")
    refs = videoset.annotated()
    if not refs:
        raise DataError(f"video set {videoset.name!r} has no annotated frames to score")
    num_classes = videoset.num_classes
    order = {v.name: i for i, v in enumerate(videoset.videos)}

    def items() -> Iterator[dict[str, Any]]:
        for ref in sorted(refs, key=lambda r: (order[r.video], r.index)):
            label = torch.from_numpy(videoset.read_label(ref).astype(np.int64))
            pred = _read_prediction(prediction_path(pred_dir, videoset, ref), num_classes,
                                    tuple(label.shape))
            yield {"image": torch.from_numpy(pred.astype(np.int64))[None], "label": label,
                   "video": ref.video, "index": ref.index}

    cfg = EvalConfig(size=None, batch_size=1, vc=tuple(vc))
    return evaluate_items(_Stored(), items(), list(videoset.classes), cfg, "cpu", subset=str(pred_dir),
                          progress=progress, total=len(refs))


def write_submission(
    predictor: VideoPredictor,
    videoset: Any,
    out_dir: str | Path,
    cfg: EvalConfig,
    device: torch.device | str,
    progress: bool = True,
) -> int:
    """Predict every frame of ``videoset`` and write ``<out_dir>/<video>/<frame stem>.png``:
    single-channel PNGs of class ids 0..C-1 at each frame's resolution (VSPW's submission layout).
    Each PNG is written atomically. Returns the number of frames written."""
    from semivss.data.clips import EvalFrames
    from semivss.engine.checkpoint import atomic_write
    from semivss.inference.evaluate import make_progress

    out = Path(out_dir)
    ds = EvalFrames(videoset, videoset.frames(), predictor.input_size)
    n = 0
    with predictor.eval_mode(), make_progress(progress) as bar:
        task = bar.add_task(f"submission {videoset.name}", total=len(ds))
        batches = run_videos(predictor, (ds[i] for i in range(len(ds))), video=lambda it: str(it["video"]),
                             image=lambda it: it["image"],
                             out_size=lambda it: (int(it["orig_size"][0]), int(it["orig_size"][1])),
                             batch_size=cfg.batch_size, device=device)
        for batch, preds, _ in batches:
            preds = preds.to("cpu", torch.uint8).numpy()
            for j, item in enumerate(batch):
                ref = FrameRef(str(item["video"]), int(item["index"]))
                image = videoset.frame(ref).image
                stem = Path(image).stem if image is not None else f"{ref.index:08d}"
                path = out / ref.video / f"{stem}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                img = Image.fromarray(preds[j], mode="L")
                atomic_write(path, lambda f, img=img: img.save(f, format="PNG"), durable=False)
                n += 1
            bar.advance(task, len(batch))
    return n
