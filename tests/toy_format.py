"""A toy dataset format in one file: the whole cost of adding a format (docs/extending.md).

Layout: ``root/<split>/<video>/<index>.png`` frames and ``<index>_label.png`` labels next to them
(labels 0..C-1, 255 = ignore); ``root/classes.txt`` one class name per line.
"""

from __future__ import annotations

from pathlib import Path

from semivss.data.video import Frame, Video, VideoSet
from semivss.errors import DataError
from semivss.registry import FORMATS


@FORMATS.register("toy")
def load_toy(root: Path, split: str | None) -> VideoSet:
    root = Path(root)
    folder = root / (split or "train")
    if not folder.is_dir():
        raise DataError(f"toy split folder not found: {folder}")
    classes = (root / "classes.txt").read_text().split()
    videos = []
    for vdir in sorted(p for p in folder.iterdir() if p.is_dir()):
        frames = []
        for img in sorted(vdir.glob("*.png")):
            if img.stem.endswith("_label"):
                continue
            label = img.with_name(f"{img.stem}_label.png")
            frames.append(Frame(vdir.name, int(img.stem), image=img,
                                label=label if label.is_file() else None))
        videos.append(Video(vdir.name, frames))
    return VideoSet(f"toy/{split or 'train'}", videos, classes, root=folder)
