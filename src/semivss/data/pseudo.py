"""Reader of a pseudo-label set written by ``semivss pseudo-label`` and the training dataset of
its frames (docs/methods.md#71-pseudo-label-sets; PVUW 2024 report, Eq. 1-2). The layout of a
set (the shared contract) is in docs/protocols.md#7-pseudo-label-sets.

:class:`PseudoLabeledFrames` yields the augmented image, the pseudo-label and the decoded entropy
under ONE geometric augmentation (label and entropy resampled nearest); crop padding becomes
label 255, entropy +inf and ``valid = False``, so it is neither reliable nor unreliable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from semivss.data.batch import PseudoBatch
from semivss.data.clips import SampleIndex, _resolve, _U32
from semivss.data.transforms import ClipAugment, StrongPhotometric, label_to_tensor, to_tensor
from semivss.data.video import IGNORE_INDEX, FrameRef, VideoSet, read_raw_label_file
from semivss.errors import DataError

__all__ = ["PSEUDO_FORMAT", "PSEUDO_VERSION", "PseudoLabelSet", "PseudoLabeledFrames", "read_pseudo_set"]

PSEUDO_FORMAT = "semivss-pseudo-labels"
PSEUDO_VERSION = 1


@dataclass(frozen=True, eq=False)
class PseudoLabelSet:
    """A validated pseudo-label set: its folder, class table, covered frames and the entropy scale
    (``H = q * entropy_max / 255``)."""

    root: Path
    num_classes: int
    classes: list[str] | None
    frames: list[FrameRef]
    entropy_max: float
    manifest: dict[str, Any]

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def label_path(self, ref: FrameRef) -> Path:
        return self.root / "labels" / ref.video / f"{ref.index:08d}.png"

    def entropy_path(self, ref: FrameRef) -> Path:
        return self.root / "entropy" / ref.video / f"{ref.index:08d}.png"

    def decode_entropy(self, q: np.ndarray) -> np.ndarray:
        """Quantised entropy (uint8) -> nats (float32)."""
        return q.astype(np.float32) * np.float32(self.entropy_max / 255.0)

    def read(self, ref: FrameRef, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(label uint8 HxW, quantised entropy uint8 HxW)`` of one frame. DataError naming the
        file when a PNG is missing or corrupt, a label value is not a class id (or 255), or the
        size differs from ``size`` (the frame's (H, W)) or from the other PNG."""
        label_path, ent_path = self.label_path(ref), self.entropy_path(ref)
        label = read_raw_label_file(label_path)
        q = read_raw_label_file(ent_path)
        for path, arr in ((label_path, label), (ent_path, q)):
            if size is not None and arr.shape != tuple(size):
                raise DataError(
                    f"pseudo-label file {path} is {arr.shape[1]}x{arr.shape[0]} (WxH) but frame {ref} "
                    f"is {size[1]}x{size[0]}"
                )
        if label.shape != q.shape:
            raise DataError(
                f"pseudo-label file {label_path} is {label.shape[1]}x{label.shape[0]} but its entropy "
                f"{ent_path} is {q.shape[1]}x{q.shape[0]}"
            )
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            values = np.unique(label[bad])[:10].tolist()
            raise DataError(
                f"pseudo-label file {label_path} has values {values} outside the class ids "
                f"0..{self.num_classes - 1} (or {IGNORE_INDEX})"
            )
        return label, q


def _fail(path: Path, msg: str) -> DataError:
    return DataError(f"pseudo-label manifest {path}: {msg}")


def read_pseudo_set(
    set_dir: str | Path, videoset: VideoSet | None = None, check_files: bool = True
) -> PseudoLabelSet:
    """Read and validate ``<set_dir>/manifest.json`` (DataError naming the file and key).

    Checks the format tag and version, ``num_classes`` / ``classes``, the uncertainty and its
    quantisation, and the frame list (non-empty, no duplicates). With ``videoset``: the class count
    (and names, when the manifest lists them) must equal the video set's and every frame must exist
    in it. With ``check_files``: both PNGs of every frame must exist (decoding and sizes are
    checked when a frame is read).
    """
    root = Path(set_dir)
    path = root / "manifest.json"
    if not root.is_dir():
        raise DataError(f"pseudo-label set not found: {root} (write one with `semivss pseudo-label`)")
    if not path.is_file():
        raise DataError(f"pseudo-label set {root} has no manifest.json ({path}); is it complete?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"cannot parse: {exc}") from None
    if not isinstance(manifest, dict):
        raise _fail(path, "must be a JSON object")
    if manifest.get("format") != PSEUDO_FORMAT:
        raise _fail(path, f"key 'format' is {manifest.get('format')!r}, expected {PSEUDO_FORMAT!r}")
    if manifest.get("version") != PSEUDO_VERSION:
        raise _fail(path, f"key 'version' is {manifest.get('version')!r}; this reader knows version {PSEUDO_VERSION}")
    num_classes = manifest.get("num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise _fail(path, f"key 'num_classes' must be a positive integer, got {num_classes!r}")
    classes = manifest.get("classes")
    if classes is not None:
        if not isinstance(classes, list) or len(classes) != num_classes:
            raise _fail(path, f"key 'classes' must list {num_classes} class names, got {classes!r}")
        classes = [str(c) for c in classes]
    if manifest.get("uncertainty", "entropy") != "entropy":
        raise _fail(path, f"key 'uncertainty' is {manifest.get('uncertainty')!r}; only 'entropy' is supported")
    quant = manifest.get("quantisation")
    if not isinstance(quant, dict) or quant.get("dtype") != "uint8":
        raise _fail(path, f"key 'quantisation' must be {{'dtype': 'uint8', 'max': <nats>}}, got {quant!r}")
    qmax = quant.get("max")
    if (
        isinstance(qmax, bool)
        or not isinstance(qmax, (int, float))
        or not math.isfinite(qmax)
        or qmax < 0
        or (qmax == 0 and num_classes > 1)  # ln 1 = 0: a single class has no uncertainty
    ):
        raise _fail(path, f"key 'quantisation.max' must be a positive number of nats, got {qmax!r}")
    raw_frames = manifest.get("frames")
    if not isinstance(raw_frames, list) or not raw_frames:
        raise _fail(path, "key 'frames' must be a non-empty list of {'video', 'index'}")
    frames: list[FrameRef] = []
    seen: set[FrameRef] = set()
    for i, item in enumerate(raw_frames):
        ok = isinstance(item, dict) and isinstance(item.get("video"), str)
        index = item.get("index") if isinstance(item, dict) else None
        if not ok or isinstance(index, bool) or not isinstance(index, int):
            raise _fail(path, f"key 'frames[{i}]' must be {{'video': str, 'index': int}}, got {item!r}")
        ref = FrameRef(item["video"], index)
        if ref in seen:
            raise _fail(path, f"key 'frames[{i}]': frame {ref} is listed twice")
        seen.add(ref)
        frames.append(ref)
    if videoset is not None:
        if num_classes != videoset.num_classes:
            raise _fail(
                path,
                f"key 'num_classes' is {num_classes} but the video set {videoset.name!r} has "
                f"{videoset.num_classes} classes",
            )
        if classes is not None and classes != list(videoset.classes):
            raise _fail(path, f"key 'classes' {classes} differs from the video set's {list(videoset.classes)}")
        for i, ref in enumerate(frames):
            try:
                videoset.frame(ref)
            except DataError as exc:
                raise _fail(path, f"key 'frames[{i}]': frame {ref} is not in the video set ({exc})") from None
    out = PseudoLabelSet(root, num_classes, classes, frames, float(qmax), manifest)
    if check_files:
        for ref in frames:
            for p in (out.label_path(ref), out.entropy_path(ref)):
                if not p.is_file():
                    raise DataError(
                        f"pseudo-label set {root}: file {p} of frame {ref} is missing "
                        f"(listed in {path}; an interrupted `semivss pseudo-label` run?)"
                    )
    return out


class PseudoLabeledFrames(Dataset[PseudoBatch]):
    """Frames of a pseudo-label set with their pseudo-labels and entropy (Eq. (ST-4b)).

    ``__getitem__`` takes an index or ``(index, sample_seed)`` (as the clip datasets of
    :mod:`semivss.data.clips`: every random draw comes from ``np.random.default_rng(seed)``) and
    returns ``image (3,H,W)``, ``label (H,W) int64`` (argmax; 255 = none / padding), ``entropy
    (H,W) float32`` in nats (+inf where not valid), ``valid (H,W) bool`` and, with ``strong``, a
    strong photometric copy ``strong (3,H,W)`` of the same geometry. ``frames`` restricts the set
    to a subset of its frames (default: all frames the manifest lists).
    """

    def __init__(
        self,
        videoset: VideoSet,
        pseudo: str | Path | PseudoLabelSet,
        augment: ClipAugment,
        strong: bool = False,
        frames: Sequence[FrameRef] | None = None,
    ) -> None:
        self.videoset = videoset
        self.set = pseudo if isinstance(pseudo, PseudoLabelSet) else read_pseudo_set(pseudo, videoset)
        if self.set.num_classes != videoset.num_classes:
            raise DataError(
                f"pseudo-label set {self.set.root} has {self.set.num_classes} classes, video set "
                f"{videoset.name!r} has {videoset.num_classes}"
            )
        if frames is None:
            self.frames = list(self.set.frames)
        else:
            known = set(self.set.frames)
            missing = [r for r in frames if r not in known]
            if missing:
                raise DataError(f"pseudo-label set {self.set.root} does not cover frames {[str(r) for r in missing[:5]]}")
            self.frames = list(frames)
        if not self.frames:
            raise DataError(f"pseudo-label set {self.set.root}: no frames to train on")
        self.augment = augment
        self.use_strong = strong
        self.strong = StrongPhotometric()

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, item: SampleIndex) -> PseudoBatch:
        idx, seed = _resolve(item)
        rng = np.random.default_rng(seed)
        ref = self.frames[idx]
        image = self.videoset.read_image(ref)
        label, q = self.set.read(ref, (int(image.shape[0]), int(image.shape[1])))
        # one call = one set of geometric parameters for the label and the entropy (both masks,
        # nearest, padded with 255)
        img, (lab, q_aug) = self.augment.image_with_masks(image, [label, q], int(rng.integers(_U32)))
        valid = lab != IGNORE_INDEX
        ent = np.where(valid, self.set.decode_entropy(q_aug), np.float32(np.inf)).astype(np.float32)
        strong = [to_tensor(self.strong(img, int(rng.integers(_U32))))] if self.use_strong else []
        return PseudoBatch(to_tensor(img), label_to_tensor(lab), torch.from_numpy(ent),
                           torch.from_numpy(valid), strong)
