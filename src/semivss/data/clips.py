"""Torch datasets of clips and evaluation frames, and `collate`.

Every training `__getitem__` accepts an int or a tuple `(index, sample_seed)`; all randomness of
a sample (which context frames, augmentation, strong distortion) comes from
`np.random.default_rng(sample_seed)`, so the same pair always gives the same tensors. A plain int
draws its seed from torch's RNG (seeded per DataLoader worker); the engine's infinite sampler
(`semivss.engine.sampler`) yields the pairs. Offsets are signed differences of positions in the
video's ordered frame list (docs/methods.md#10-inner-video-overfitting, docs/methods.md#3-ifr).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from semivss.data.batch import LabeledBatch, OverlapBatch, UnlabeledBatch
from semivss.data.transforms import ClipAugment, EvalResize, StrongPhotometric, label_to_tensor, to_tensor
from semivss.data.video import Frame, FrameRef, VideoSet
from semivss.errors import ConfigError, DataError

__all__ = [
    "LabeledClips",
    "UnlabeledClips",
    "EvalFrames",
    "OverlapCrops",
    "collate",
    "pick_neighbours",
]

SampleIndex = int | tuple[int, int]
_U32 = 2**32


def _resolve(item: Any) -> tuple[int, int]:
    """(index, sample_seed) from an int or a pair; a bare int takes a seed from torch's RNG."""
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise TypeError(f"expected index or (index, sample_seed), got {item!r}")
        return int(item[0]), int(item[1])
    return int(item), int(torch.randint(0, 2**62, ()).item())


def pick_neighbours(
    rng: np.random.Generator, length: int, pos: int, count: int, offsets: tuple[int, int]
) -> list[int]:
    """`count` positions q != pos of a video of `length` frames with lo <= q - pos <= hi.

    Distinct when there are enough candidates (then repeats are drawn); with no candidate in
    range the other frame whose offset is nearest to the range is used, and a single-frame video
    returns `pos` itself.
    """
    if count <= 0:
        return []
    lo, hi = offsets
    cands = [q for q in range(max(0, pos + lo), min(length - 1, pos + hi) + 1) if q != pos]
    if not cands:
        if length == 1:
            return [pos] * count
        def gap(q: int) -> tuple[int, int, int]:  # distance of the offset to [lo, hi], then to 0
            d = q - pos
            return (max(lo - d, d - hi, 0), abs(d), q)

        nearest = min((q for q in range(length) if q != pos), key=gap)
        return [nearest] * count
    if len(cands) >= count:
        return [int(q) for q in rng.choice(cands, size=count, replace=False)]
    extra = rng.choice(cands, size=count - len(cands), replace=True)
    return [int(q) for q in rng.permutation(np.concatenate([cands, extra]))]


def _check_offsets(name: str, offsets: Sequence[int]) -> tuple[int, int]:
    if len(offsets) != 2 or int(offsets[0]) > int(offsets[1]):
        raise ConfigError(f"{name} must be (low, high) with low <= high, got {offsets}")
    return int(offsets[0]), int(offsets[1])


def _read_clip(videoset: VideoSet, frames: list[Frame]) -> list[np.ndarray]:
    images = [videoset.read_image(f) for f in frames]
    for f, im in zip(frames, images):
        if im.shape != images[0].shape:
            raise DataError(
                f"frames of video {f.video!r} differ in size: {frames[0].source} is "
                f"{images[0].shape[1]}x{images[0].shape[0]}, {f.source} is {im.shape[1]}x{im.shape[0]}"
            )
    return images


def _check_refs(videoset: VideoSet, refs: Sequence[FrameRef], what: str, need_label: bool) -> list[FrameRef]:
    refs = list(refs)
    for r in refs:
        fr = videoset.frame(r)  # DataError if unknown
        if need_label and fr.label is None:
            raise DataError(f"{what} frame {r} of video set {videoset.name!r} ({fr.source}) has no label file")
    return refs


class LabeledClips(Dataset[LabeledBatch]):
    """Labeled frame + optional K context frames of the same video, same geometry.

    Returns a `LabeledBatch`: `image (3,H,W)`, `label (H,W) int64`, `valid (H,W) bool` (True where the pixel comes
    from the frame, False in the crop padding, whose label is ignore; void pixels of the frame
    stay valid); with `context_frames=K > 0` also `context
    (K,3,H,W)` and `context_offset (K,) int64`, and `context_strong (K,3,H,W)` (strong photometric
    copies of the context frames) when `context_strong`. Context labels are never read.
    With `context_preceding` the context is the K frames right before the labeled one, in order
    (offsets -K..-1; the video's first frame repeated where the video starts later).
    """

    def __init__(
        self,
        videoset: VideoSet,
        labeled: Sequence[FrameRef],
        augment: ClipAugment,
        context_frames: int = 0,
        context_offsets: tuple[int, int] = (-29, 29),
        context_strong: bool = False,
        context_preceding: bool = False,
        split_name: str = "labeled",
    ) -> None:
        if not labeled:
            raise DataError(f"{split_name} split of video set {videoset.name!r} is empty: no labeled frames")
        if context_frames < 0:
            raise ConfigError(f"context_frames must be >= 0, got {context_frames}")
        self.videoset = videoset
        self.labeled = _check_refs(videoset, labeled, split_name, need_label=True)
        self.augment = augment
        self.context_frames = context_frames
        self.context_offsets = _check_offsets("context_offsets", context_offsets)
        self.context_strong = context_strong
        self.context_preceding = context_preceding
        self.strong = StrongPhotometric()

    def __len__(self) -> int:
        return len(self.labeled)

    def __getitem__(self, item: SampleIndex) -> LabeledBatch:
        idx, seed = _resolve(item)
        rng = np.random.default_rng(seed)
        ref = self.labeled[idx]
        video = self.videoset.video(ref.video)
        pos = video.position(ref.index)
        if self.context_preceding:
            ctx = [max(pos - d, 0) for d in range(self.context_frames, 0, -1)]
        else:
            ctx = pick_neighbours(rng, len(video), pos, self.context_frames, self.context_offsets)
        frames = [video.frames[pos]] + [video.frames[q] for q in ctx]
        images = _read_clip(self.videoset, frames)
        label = self.videoset.read_label(frames[0])
        imgs, masks, valid = self.augment.with_valid(images, [label] + [None] * len(ctx), int(rng.integers(_U32)))
        assert masks[0] is not None
        context = offset = context_strong = None
        if ctx:
            context = torch.stack([to_tensor(im) for im in imgs[1:]])
            offset = torch.tensor([q - pos for q in ctx], dtype=torch.int64)
            if self.context_strong:
                context_strong = torch.stack(
                    [to_tensor(self.strong(im, int(rng.integers(_U32)))) for im in imgs[1:]]
                )
        return LabeledBatch(to_tensor(imgs[0]), label_to_tensor(masks[0]), torch.from_numpy(valid),
                            context, offset, context_strong)


class UnlabeledClips(Dataset[UnlabeledBatch]):
    """Anchor frame + N-1 other frames of its video within `offsets`, same geometry.

    Returns an `UnlabeledBatch`: `image (N,3,H,W)`, `offset (N,) int64` (anchor first, offset 0),
    `valid (N,H,W) bool` (True where the pixel comes from the frame, False in the crop padding
    added when the rescaled frame is smaller than the crop; the same for every frame and every
    strong copy, which share the geometry) and `strong`: `strong_copies` independently distorted
    copies `(N,3,H,W)` (UniMatch's two strong views). Labels are never read.
    `valid` comes from an all-ones mask pushed through the same augmentation call as the frames
    (padded with the ignore value), so it neither changes the images nor any random draw.
    """

    def __init__(
        self,
        videoset: VideoSet,
        frames: Sequence[FrameRef],
        augment: ClipAugment,
        num_frames: int = 1,
        offsets: tuple[int, int] = (-29, 29),
        strong_copies: int = 0,
        split_name: str = "unlabeled",
    ) -> None:
        if not frames:
            raise DataError(f"{split_name} split of video set {videoset.name!r} is empty: no unlabeled frames")
        if num_frames < 1:
            raise ConfigError(f"num_frames must be >= 1, got {num_frames}")
        if strong_copies < 0:
            raise ConfigError(f"strong_copies must be >= 0, got {strong_copies}")
        self.strong_copies = strong_copies
        self.videoset = videoset
        self.frames = _check_refs(videoset, frames, split_name, need_label=False)
        self.augment = augment
        self.num_frames = num_frames
        self.offsets = _check_offsets("offsets", offsets)
        self.strong = StrongPhotometric()

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, item: SampleIndex) -> UnlabeledBatch:
        idx, seed = _resolve(item)
        rng = np.random.default_rng(seed)
        ref = self.frames[idx]
        video = self.videoset.video(ref.video)
        pos = video.position(ref.index)
        others = pick_neighbours(rng, len(video), pos, self.num_frames - 1, self.offsets)
        frames = [video.frames[pos]] + [video.frames[q] for q in others]
        images = _read_clip(self.videoset, frames)
        imgs, _, valid_np = self.augment.with_valid(images, [None] * len(images), int(rng.integers(_U32)))
        valid = torch.from_numpy(valid_np)
        strong = [torch.stack([to_tensor(self.strong(im, int(rng.integers(_U32)))) for im in imgs])
                  for _ in range(self.strong_copies)]
        return UnlabeledBatch(
            torch.stack([to_tensor(im) for im in imgs]),
            torch.tensor([0] + [q - pos for q in others], dtype=torch.int64),
            valid.unsqueeze(0).expand(len(imgs), *valid.shape).clone(),
            strong,
        )


class OverlapCrops(Dataset[OverlapBatch]):
    """Two overlapping crops of one unlabeled frame (CAC; docs/methods.md#13-cac).

    The frame is resized once to ``base_size`` x s, s ~ U[``scale_range``] (both crops share the
    scale), padded bottom/right where smaller than the crop; crop 1 is placed uniformly, crop 2 too,
    with its offset from crop 1 rounded toward zero to a multiple of ``stride``, until the two
    overlap with an IoU inside ``iou_bound`` (50 tries, then crop 2 = crop 1). Each crop is then
    mirrored with p = 0.5 and distorted photometrically on its own (``photometric``). Returns an
    :class:`OverlapBatch` sample.
    """

    def __init__(
        self,
        videoset: VideoSet,
        frames: Sequence[FrameRef],
        crop_size: tuple[int, int],
        base_size: tuple[int, int] | None,
        scale_range: tuple[float, float] = (0.8, 2.0),
        iou_bound: tuple[float, float] = (0.1, 1.0),
        stride: int = 8,
        photometric: bool = True,
        split_name: str = "unlabeled",
    ) -> None:
        if not frames:
            raise DataError(f"{split_name} split of video set {videoset.name!r} is empty: no unlabeled frames")
        if crop_size[0] % stride or crop_size[1] % stride:
            raise ConfigError(f"crop size {tuple(crop_size)} must be a multiple of the stride {stride}")
        self.videoset = videoset
        self.frames = _check_refs(videoset, frames, split_name, need_label=False)
        self.crop, self.base, self.scale_range = tuple(crop_size), base_size, tuple(scale_range)
        self.iou_bound, self.stride, self.photometric = tuple(iou_bound), stride, photometric
        self.strong = StrongPhotometric(jitter=(0.4, 0.4, 0.4, 0.1), blur_kernel=5, blur_sigma=(1.1, 1.1))

    def __len__(self) -> int:
        return len(self.frames)

    def _offsets(self, rng: np.random.Generator, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
        ch, cw = self.crop
        s = self.stride
        y1, x1 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        for _ in range(50):
            y2, x2 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            dy, dx = int((y2 - y1) / s) * s, int((x2 - x1) / s) * s  # toward zero: stays inside
            inter = max(ch - abs(dy), 0) * max(cw - abs(dx), 0)
            if inter and self.iou_bound[0] <= inter / (2 * ch * cw - inter) <= self.iou_bound[1]:
                return (y1, x1), (y1 + dy, x1 + dx)
        return (y1, x1), (y1, x1)

    def __getitem__(self, item: SampleIndex) -> OverlapBatch:
        idx, seed = _resolve(item)
        rng = np.random.default_rng(seed)
        image = self.videoset.read_image(self.frames[idx])
        base = self.base or (int(image.shape[0]), int(image.shape[1]))
        scale = float(rng.uniform(*self.scale_range))
        h, w = max(1, round(base[0] * scale)), max(1, round(base[1] * scale))
        image = EvalResize((h, w))(image)
        ch, cw = self.crop
        ph, pw = max(h, ch), max(w, cw)
        padded = np.zeros((ph, pw, 3), np.uint8)
        padded[:h, :w] = image
        valid = np.zeros((ph, pw), bool)
        valid[:h, :w] = True
        (y1, x1), (y2, x2) = self._offsets(rng, ph, pw)
        dy, dx = y2 - y1, x2 - x1
        boxes = [(max(0, dy), max(0, dx), min(ch, ch + dy), min(cw, cw + dx)),
                 (max(0, -dy), max(0, -dx), min(ch, ch - dy), min(cw, cw - dx))]
        crops, valids, flips = [], [], []
        for y, x in ((y1, x1), (y2, x2)):
            img, val = padded[y:y + ch, x:x + cw], valid[y:y + ch, x:x + cw]
            flip = bool(rng.random() < 0.5)
            if flip:
                img, val = img[:, ::-1], val[:, ::-1]
            img = np.ascontiguousarray(img)
            if self.photometric:
                img = self.strong(img, int(rng.integers(_U32)))
            crops.append(to_tensor(img))
            valids.append(torch.from_numpy(np.ascontiguousarray(val)))
            flips.append(flip)
        return OverlapBatch(torch.stack(crops), torch.stack(valids),
                            torch.tensor(boxes, dtype=torch.int64), torch.tensor(flips))


class EvalFrames(Dataset[dict[str, Any]]):
    """Frames for evaluation / inference, ordered by video (set order) then index.

    Returns `image (3,h,w)` resized to `size` (None = original), `label (H,W) int64` at the
    ORIGINAL resolution (-1 everywhere when the frame has no label), `has_label` (bool),
    `video` (str), `index` (int), `orig_size (2,) int64` = (H, W), `scored` (False for the
    `context` frames, which only a temporal predictor needs). `frames=None` = all annotated.
    """

    def __init__(
        self, videoset: VideoSet, frames: Sequence[FrameRef] | None = None,
        size: tuple[int, int] | None = None, context: Sequence[FrameRef] = (),
    ) -> None:
        refs = videoset.annotated() if frames is None else list(frames)
        if not refs:
            raise DataError(f"no frames to evaluate in video set {videoset.name!r}")
        _check_refs(videoset, refs, "evaluation", need_label=False)
        _check_refs(videoset, context, "context", need_label=False)
        order = {v.name: i for i, v in enumerate(videoset.videos)}
        self.videoset = videoset
        self.context = set(context) - set(refs)
        self.frames = sorted(set(refs) | self.context, key=lambda r: (order[r.video], r.index))
        self.resize = EvalResize(size)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, item: int) -> dict[str, Any]:
        ref = self.frames[int(item)]
        image = self.videoset.read_image(ref)
        h, w = image.shape[:2]
        if ref not in self.context and self.videoset.has_label(ref):
            label = label_to_tensor(self.videoset.read_label(ref))
            has = True
        else:
            label = torch.full((h, w), -1, dtype=torch.int64)
            has = False
        return {
            "image": to_tensor(self.resize(image)),
            "label": label,
            "has_label": has,
            "scored": ref not in self.context,
            "video": ref.video,
            "index": ref.index,
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of sample dicts: tensors of equal shape -> stacked (else a list), numbers and
    bools -> 1-D tensors, anything else (strings) -> lists."""
    if not samples:
        raise ValueError("collate of an empty batch")
    keys = list(samples[0])
    out: dict[str, Any] = {}
    for key in keys:
        try:
            vals = [s[key] for s in samples]
        except KeyError:
            raise ValueError(f"batch samples do not all have key {key!r}") from None
        v0 = vals[0]
        if isinstance(v0, torch.Tensor):
            out[key] = torch.stack(vals) if all(v.shape == v0.shape for v in vals) else vals
        elif isinstance(v0, (bool, int, float, np.integer, np.floating)) and not isinstance(v0, str):
            out[key] = torch.tensor(vals)
        else:
            out[key] = vals
    return out
