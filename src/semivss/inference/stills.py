"""Stills of evaluated frames (``semivss evaluate --save-stills N``): image | ground truth |
prediction | errors side by side, one PNG per frame, listed in ``stills.json``; ``semivss report``
shows them."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from semivss.engine.checkpoint import atomic_write
from semivss.inference.writers import check_new_output, colorize

__all__ = ["PANELS", "StillWriter", "compose_still", "pick_frames"]

PANELS = ("image", "ground truth", "prediction", "errors")
GAP = 4  # white pixels between the panels
INDEX = "stills.json"

T = TypeVar("T")


def pick_frames(frames: Sequence[T], n: int) -> list[T]:
    """``n`` items spread evenly over ``frames`` (first and last included), in their order;
    all of them when there are no more than ``n``."""
    if n <= 0 or not frames:
        return []
    if n >= len(frames):
        return list(frames)
    if n == 1:
        return [frames[len(frames) // 2]]
    return [frames[round(i * (len(frames) - 1) / (n - 1))] for i in range(n)]


def compose_still(image: np.ndarray, label: np.ndarray, pred: np.ndarray, palette: Any) -> np.ndarray:
    """uint8 (H, 4W + 3 GAP, 3): the RGB ``image`` (resized to the label size if needed), the
    colourised ``label`` and ``pred`` (void black) and an error map: the image in dim grey, wrong
    pixels red, void pixels black."""
    label = np.asarray(label)
    pred = np.asarray(pred)
    h, w = label.shape
    img = np.asarray(image, dtype=np.uint8)
    if img.shape[:2] != (h, w):
        img = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))
    grey = (0.35 * img.mean(axis=2, keepdims=True)).astype(np.uint8).repeat(3, axis=2)
    void = label == 255
    errors = grey.copy()
    errors[(pred != label) & ~void] = (230, 25, 25)
    errors[void] = 0
    gap = np.full((h, GAP, 3), 255, dtype=np.uint8)
    panels = [img, gap, colorize(label, palette), gap, colorize(pred, palette), gap, errors]
    return np.concatenate(panels, axis=1)


def _file_name(video: str, index: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', video)}-{index:08d}.png"


class StillWriter:
    """Writes the stills of the chosen ``(video, index)`` frames as they are scored (each PNG
    atomically) and, in :meth:`finish`, ``stills.json``: one entry per still with its file,
    frame and pixel accuracy."""

    def __init__(
        self,
        out_dir: str | Path,
        frames: Sequence[tuple[str, int]],
        read_image: Callable[[str, int], np.ndarray],
        palette: Any,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = check_new_output(out_dir, overwrite)
        self.wanted = {(str(v), int(i)) for v, i in frames}
        self.read_image = read_image
        self.palette = palette
        self.entries: list[dict[str, Any]] = []

    def __call__(self, video: str, index: int, pred: Any, label: Any) -> None:
        """Write the still of this frame if it is one of the chosen ones."""
        if (video, index) not in self.wanted:
            return
        pred_np = np.asarray(pred.numpy() if hasattr(pred, "numpy") else pred).astype(np.int64)
        label_np = np.asarray(label.numpy() if hasattr(label, "numpy") else label).astype(np.int64)
        still = compose_still(self.read_image(video, index), label_np, pred_np, self.palette)
        name = _file_name(video, index)
        atomic_write(self.out_dir / name, lambda f: Image.fromarray(still).save(f, format="PNG"), durable=False)
        valid = label_np != 255
        acc = float((pred_np[valid] == label_np[valid]).mean()) if valid.any() else None
        self.entries.append({"file": name, "video": video, "index": index, "pixel_acc": acc,
                             "panels": list(PANELS)})

    def finish(self) -> Path:
        """Write ``stills.json`` (atomically) and return its path."""
        text = json.dumps({"stills": self.entries}, indent=2) + "\n"
        path = self.out_dir / INDEX
        atomic_write(path, lambda f: f.write(text.encode()))
        return path
