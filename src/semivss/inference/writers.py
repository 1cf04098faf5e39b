"""Output writers: palette label PNGs, colour overlays and H.264 mp4 (prediction PNGs:
docs/protocols.md#5-evaluation)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from PIL import Image

from semivss.engine.checkpoint import fsync_dir, atomic_write
from semivss.errors import DataError

Palette = Any  # sequence of (r, g, b) per class, or a (C, 3) array

__all__ = [
    "Mp4Writer",
    "OutputExistsError",
    "check_new_output",
    "staged_dir",
    "colorize",
    "overlay",
    "palette_lut",
    "save_label_png",
]


class OutputExistsError(DataError, FileExistsError):
    """An output file or non-empty directory exists and overwriting was not asked for."""


def check_new_output(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse to write over an existing file or a non-empty directory unless ``overwrite``.

    Nothing is deleted: with ``overwrite`` existing files are simply replaced as they are
    written again (:func:`staged_dir` replaces a whole folder instead).
    """
    p = Path(path)
    if overwrite or not p.exists():
        return p
    if p.is_dir():
        if any(p.iterdir()):
            raise OutputExistsError(
                f"{p}: output folder exists and is not empty (use --overwrite to replace it, or another folder)"
            )
        return p
    raise OutputExistsError(f"{p}: output file exists (use --overwrite to replace it)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_siblings(path: Path) -> None:
    """Delete ``<name>.partial-<pid>`` / ``<name>.old-<pid>`` folders left by killed runs."""
    if not path.parent.is_dir():
        return
    for tag in ("partial", "old"):
        for stale in path.parent.glob(f"{glob.escape(path.name)}.{tag}-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Write a whole output folder at once: yields an empty temporary sibling folder
    (``<name>.partial-<pid>``) that replaces ``path`` when the block succeeds and is deleted when
    it fails, so a failed command leaves nothing half-written and never blocks its own re-run.

    A non-empty ``path`` is refused unless ``overwrite``, which replaces its whole previous
    contents (the old folder is moved aside, the new one renamed in, then the old one deleted).
    An existing file at ``path`` is refused. Temporary folders of killed runs are removed first.
    The files inside are written without per-file fsyncs (``atomic_write(durable=False)``); one
    ``os.sync`` before the swap and a fsync of the parent after it make the swap durable, so a
    power cut leaves the old folder or the complete new one.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputExistsError(f"{p}: output path is a file, not a folder")
    check_new_output(p, overwrite)
    _remove_stale_siblings(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    staging = p.parent / f"{p.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if hasattr(os, "sync"):
        os.sync()  # the staged files reach the disk before the rename publishes them
    if p.exists() and any(p.iterdir()):
        old = p.parent / f"{p.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(p, old)
        os.replace(staging, p)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if p.exists():
            p.rmdir()
        os.replace(staging, p)
    fsync_dir(p.parent)


def palette_lut(palette: Palette) -> np.ndarray:
    """(256, 3) uint8 lookup table: class c -> palette[c]; unused entries and 255 black."""
    pal = np.asarray(palette)
    if pal.ndim != 2 or pal.shape[1] != 3 or not 1 <= pal.shape[0] <= 255:
        raise DataError(f"palette must be 1..255 (r, g, b) triples, got shape {pal.shape}")
    if pal.min() < 0 or pal.max() > 255:
        raise DataError("palette colours must lie in 0..255")
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: pal.shape[0]] = pal.astype(np.uint8)
    return lut


def _label_array(label: Any, num_classes: int, where: str) -> np.ndarray:
    arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if arr.ndim != 2:
        raise DataError(f"{where}: label must be 2-D (H, W), got shape {arr.shape}")
    if arr.dtype.kind not in "ui":
        raise DataError(f"{where}: label must hold integer class ids, got dtype {arr.dtype}")
    bad = (arr != 255) & ((arr < 0) | (arr >= num_classes))
    if bad.any():
        raise DataError(
            f"{where}: label value {int(arr[bad][0])} outside 0..{num_classes - 1} and not 255"
        )
    return arr.astype(np.uint8)


def save_label_png(path: str | Path, label: Any, palette: Palette) -> Path:
    """Write ``label`` (H, W; 0..C-1, 255 void) as a palette ('P' mode) PNG; void is black.

    The pixel values are the class ids, so ``np.array(Image.open(path))`` gives ``label`` back.
    """
    path = Path(path)
    lut = palette_lut(palette)
    arr = _label_array(label, len(np.asarray(palette)), str(path))
    img = Image.fromarray(arr)
    img.putpalette(lut.reshape(-1).tolist())
    atomic_write(path, lambda f: img.save(f, format="PNG"), durable=False)  # never half-written
    return path


def colorize(label: Any, palette: Palette) -> np.ndarray:
    """uint8 (H, W, 3) colour image of ``label``; void (255) black."""
    lut = palette_lut(palette)
    return lut[_label_array(label, len(np.asarray(palette)), "colorize")]


def overlay(image: np.ndarray, label: Any, palette: Palette, alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised ``label`` over the uint8 RGB ``image`` (void pixels left as is)."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise DataError(f"overlay: image must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    lab = _label_array(label, len(np.asarray(palette)), "overlay")
    if lab.shape != img.shape[:2]:
        raise DataError(f"overlay: label size {lab.shape} differs from image {img.shape[:2]}")
    col = palette_lut(palette)[lab].astype(np.float32)
    out = img.astype(np.float32)
    m = lab != 255
    out[m] = (1.0 - alpha) * out[m] + alpha * col[m]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class Mp4Writer:
    """H.264 (libx264, yuv420p) mp4 writer; a context manager fed uint8 RGB (H, W, 3) frames.

    The size is fixed by the first frame; odd sizes are padded by one replicated row/column (yuv420p
    needs even dimensions). Frames are encoded into a temporary file beside ``path`` (created on
    the first ``write``), renamed to ``path`` when the block ends without an error and removed
    when it fails, so a failed run never leaves a plausible but truncated video.
    """

    def __init__(self, path: str | Path, fps: float = 10, crf: int = 23) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.crf = int(crf)
        self.size: tuple[int, int] | None = None
        self.n_frames = 0
        self._container: Any = None
        self._stream: Any = None

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close(keep=False)
        except Exception:  # noqa: BLE001 - the original error matters, not the cleanup's
            pass

    @property
    def _tmp(self) -> Path:
        return self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")

    def _open(self, h: int, w: int) -> None:
        import av

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.size = (h, w)
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        stream = self._container.add_stream("libx264", rate=self.fps)
        stream.height = h + h % 2
        stream.width = w + w % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(self.crf)}
        self._stream = stream

    def write(self, frame: np.ndarray) -> None:
        """Encode one uint8 RGB frame of the same size as the first."""
        import av

        arr = np.asarray(frame)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise DataError(f"{self.path}: frames must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
        h, w = arr.shape[:2]
        if self._container is None:
            self._open(h, w)
        elif (h, w) != self.size:
            raise DataError(f"{self.path}: frame {self.n_frames} is {h}x{w}, earlier frames {self.size}")
        if h % 2 or w % 2:
            arr = np.pad(arr, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self.n_frames += 1

    def close(self, keep: bool = True) -> None:
        """Flush the encoder, close the file and move it to ``path`` (``keep=False``: delete it
        instead). Idempotent."""
        if self._container is None:
            return
        try:
            if keep:
                for packet in self._stream.encode():
                    self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None
            self._stream = None
            if keep:
                os.replace(self._tmp, self.path)
            else:
                self._tmp.unlink(missing_ok=True)
