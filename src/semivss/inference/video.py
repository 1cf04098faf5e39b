"""Predict a folder of frames or a video file: palette PNGs, overlay JPEGs and an H.264 mp4."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from semivss.errors import DataError
from semivss.inference.config import EvalConfig
from semivss.inference.evaluate import make_progress
from semivss.inference.predict import as_predictor
from semivss.inference.video_predictor import VideoPredictor, run_videos
from semivss.engine.checkpoint import atomic_write
from semivss.inference.writers import Mp4Writer, check_new_output, overlay, save_label_png

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_EXTS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"})

__all__ = ["IMAGE_EXTS", "VIDEO_EXTS", "iter_source", "predict_source", "source_fps"]

_INT = re.compile(r"\d+")


def _image_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(sorted(IMAGE_EXTS))})")
    nums = {p: _INT.findall(p.stem) for p in files}
    with_num = [p for p in files if nums[p]]
    if with_num and len(with_num) != len(files):
        odd = sorted(p.name for p in files if not nums[p])[0]
        raise DataError(
            f"{folder}: cannot order frames, {odd} has no frame number while others have one"
        )
    if with_num:
        files.sort(key=lambda p: (int(nums[p][-1]), p.name))
    else:
        files.sort(key=lambda p: p.name)
    stems: dict[str, Path] = {}
    for p in files:
        if p.stem in stems:
            raise DataError(f"{folder}: {stems[p.stem].name} and {p.name} have the same name")
        stems[p.stem] = p
    return files


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from e


def source_fps(path: str | Path) -> float | None:
    """Average frame rate of a video file (None for folders or when unknown)."""
    p = Path(path)
    if p.is_dir():
        return None
    import av

    try:
        with av.open(str(p)) as c:
            rate = c.streams.video[0].average_rate
    except (av.error.FFmpegError, IndexError) as e:
        raise DataError(f"{p}: cannot read video ({e})") from e
    return float(rate) if rate else None


def iter_source(path: str | Path) -> Iterator[tuple[str, int, np.ndarray]]:
    """Yield ``(name, frame_index, uint8 RGB frame)`` from a folder of images or a video file.

    Folder frames are ordered by the last integer in the file name (names without a number are
    sorted by name) and named by their stem; video frames (decoded with ``av``) are named
    ``<stem>_<index:06d>``. ``frame_index`` counts from 0.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: source does not exist")
    if p.is_dir():
        for i, f in enumerate(_image_files(p)):
            yield f.stem, i, _read_image(f)
        return
    if p.suffix.lower() not in VIDEO_EXTS:
        raise DataError(f"{p}: not a folder of images or a video ({', '.join(sorted(VIDEO_EXTS))})")
    import av

    try:
        container = av.open(str(p))
    except av.error.FFmpegError as e:
        raise DataError(f"{p}: cannot open video ({e})") from e
    with container:
        if not container.streams.video:
            raise DataError(f"{p}: no video stream")
        stream = container.streams.video[0]
        expected = int(stream.frames or 0)  # from the container's index; 0 when unknown
        n = 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                yield f"{p.stem}_{i:06d}", i, frame.to_ndarray(format="rgb24")
                n = i + 1
        except av.error.FFmpegError as e:
            raise DataError(f"{p}: cannot decode video ({e})") from e
        if expected and n < expected:
            raise DataError(f"{p}: truncated or corrupt video: decoded {n} of the {expected} frames "
                            "its index lists")


def _normalise(frame: np.ndarray, size: tuple[int, int] | None) -> torch.Tensor:
    """uint8 HxWx3 -> float32 (3, h, w) ImageNet-normalised, resized (bilinear) to ``size``,
    exactly as ``EvalFrames`` prepares evaluation frames."""
    from semivss.data.transforms import EvalResize, to_tensor

    return to_tensor(EvalResize(size)(frame))


def predict_source(
    model: nn.Module | VideoPredictor,
    source: str | Path,
    out_dir: str | Path,
    palette: Any,
    cfg: EvalConfig,
    device: torch.device | str,
    fps: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    alpha: float = 0.5,
) -> dict[str, Any]:
    """Segment every frame of ``source``; write ``labels/<name>.png`` (palette PNGs at the frame's
    resolution), ``overlays/<name>.jpg`` and ``overlay.mp4`` (H.264) under ``out_dir``.

    ``model``: one model run with ``cfg`` (TTA included), or a ``VideoPredictor`` (ensemble,
    temporal model; ``cfg`` then only gives ``batch_size``), stepped through the frames in order. ``fps`` of the mp4 defaults to the source video's rate
    (10 for a folder); frames whose size differs from the first are resized for the mp4 only.
    Refuses a non-empty ``out_dir`` unless ``overwrite``. Returns a summary dict (frames, sizes,
    paths, seconds).
    """
    device = torch.device(device)
    predictor = as_predictor(model, cfg)
    out = check_new_output(out_dir, overwrite)
    if fps is None:
        fps = source_fps(source) or 10.0
    labels_dir, overlays_dir = out / "labels", out / "overlays"
    mp4_path = out / "overlay.mp4"
    labels_dir.mkdir(parents=True, exist_ok=True)
    overlays_dir.mkdir(parents=True, exist_ok=True)
    sizes: set[tuple[int, int]] = set()
    n = 0
    start = time.perf_counter()

    with predictor.eval_mode(), Mp4Writer(mp4_path, fps=fps) as mp4, make_progress(progress) as bar:
        task = bar.add_task(f"predict {Path(source).name}", total=None)
        frames = ((name, frame, _normalise(frame, predictor.input_size))
                  for name, _, frame in iter_source(source))
        batches = run_videos(predictor, frames, video=lambda _: "source", image=lambda f: f[2],
                             out_size=lambda f: (int(f[1].shape[0]), int(f[1].shape[1])),
                             batch_size=cfg.batch_size, device=device)
        for batch, preds, _ in batches:
            preds = preds.to("cpu", torch.uint8)
            for j, (name, frame, _) in enumerate(batch):
                h, w = frame.shape[:2]
                lab = preds[j].numpy()
                save_label_png(labels_dir / f"{name}.png", lab, palette)
                blend = overlay(frame, lab, palette, alpha)
                jpg = Image.fromarray(blend)
                atomic_write(overlays_dir / f"{name}.jpg", lambda f, jpg=jpg: jpg.save(f, format="JPEG", quality=90),
                             durable=False)
                if mp4.size is not None and mp4.size != (h, w):
                    blend = cv2.resize(blend, (mp4.size[1], mp4.size[0]),
                                       interpolation=cv2.INTER_AREA)
                mp4.write(blend)
                sizes.add((h, w))
                n += 1
            bar.advance(task, len(batch))

    if n == 0:
        raise DataError(f"{source}: no frames")
    return {
        "frames": n,
        "sizes": sorted(sizes),
        "fps": float(fps),
        "out_dir": str(out),
        "labels": str(labels_dir),
        "overlays": str(overlays_dir),
        "mp4": str(mp4_path),
        "seconds": time.perf_counter() - start,
    }
