"""Clip-consistent augmentation and tensor conversion (docs/ARCHITECTURE.md conventions).

`ClipAugment` applies ONE set of geometric parameters (rescale, crop, flip) to every frame and
label of a clip, so that frames stay aligned with each other and with the labeled frame
(docs/protocols.md#3-standard-cpu-budget: resize to base size x U[0.5, 2.0], crop padded with
ignore, horizontal flip). `StrongPhotometric` is the UniMatch "strong" colour distortion used for the
distorted source frames of IFR (docs/methods.md#3-ifr). Everything is driven by an explicit seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from semivss.data.video import IGNORE_INDEX
from semivss.errors import ConfigError, DataError

__all__ = [
    "MEAN",
    "STD",
    "ClipAugment",
    "StrongPhotometric",
    "EvalResize",
    "to_tensor",
    "label_to_tensor",
    "denormalize",
]

MEAN = (123.675, 116.28, 103.53)
"""ImageNet RGB mean on the 0..255 scale."""
STD = (58.395, 57.12, 57.375)
"""ImageNet RGB std on the 0..255 scale."""

_MAX_SEED = 2**32


def _check_size(name: str, size: Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ConfigError(f"{name} must be two positive ints (height, width), got {size}")
    return int(size[0]), int(size[1])


class ClipAugment:
    """Same random rescale / crop / flip for all frames (and labels) of a clip.

    Frames are first resized to `base_size` (h, w) when given, then scaled by one factor drawn
    uniformly from `scale_range`, padded (image: the mean colour, label: `ignore_index`) to at least
    `crop_size`, randomly cropped to `crop_size` and flipped horizontally with p = 0.5. Images use
    bilinear, labels nearest interpolation.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        base_size: tuple[int, int] | None = None,
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        crop = _check_size("crop_size", crop_size)
        assert crop is not None
        self.crop_size = crop
        self.base_size = _check_size("base_size", base_size)
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ConfigError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (lo, hi)
        self.hflip = hflip
        self.ignore_index = ignore_index
        ops: list[A.BasicTransform] = []
        if self.base_size is not None:
            ops.append(
                A.Resize(*self.base_size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)
            )
        if (lo, hi) != (1.0, 1.0):
            ops.append(
                A.RandomScale(
                    scale_limit=(lo - 1.0, hi - 1.0),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    p=1.0,
                )
            )
        fill = tuple(float(round(m)) for m in MEAN)
        ops += [
            A.PadIfNeeded(*crop, border_mode=cv2.BORDER_CONSTANT, fill=fill, fill_mask=ignore_index),
            A.RandomCrop(*crop),
        ]
        if hflip:
            ops.append(A.HorizontalFlip(p=0.5))
        self._pipeline = A.Compose(ops)

    def __repr__(self) -> str:
        return (
            f"ClipAugment(crop_size={self.crop_size}, base_size={self.base_size}, "
            f"scale_range={self.scale_range}, hflip={self.hflip})"
        )

    def __call__(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], seed: int
    ) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """Augment a clip: `images` uint8 HxWx3 (all the same size), `masks` uint8 HxW or None
        per frame (same length as `images`). Returns lists of the same lengths."""
        out_images, out_masks, _ = self._per_frame(images, masks, seed, with_valid=False)
        return out_images, out_masks

    def with_valid(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], seed: int
    ) -> tuple[list[np.ndarray], list[np.ndarray | None], np.ndarray]:
        """:meth:`__call__` plus the clip's validity mask, (H,W) bool: True where the output pixel
        comes from the frames, False in the crop padding. The mask rides in the same albumentations
        call as the frames (one more mask in the stack), so images and masks are exactly those of
        :meth:`__call__` with the same seed."""
        out_images, out_masks, valid = self._per_frame(images, masks, seed, with_valid=True)
        assert valid is not None
        return out_images, out_masks, valid

    def image_with_masks(
        self, image: np.ndarray, masks: Sequence[np.ndarray], seed: int
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Augment one HxWx3 image with any number of HxW uint8 masks of its size (e.g. a
        pseudo-label and its quantised entropy) under one set of geometric parameters: the
        image is resized and cropped once, and each mask gets the nearest-neighbour geometry,
        padded with the ignore value. Same parameters as :meth:`__call__` with the same seed."""
        out_images, out_masks = self._apply([image], list(masks), seed)
        return out_images[0], out_masks

    def _per_frame(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], seed: int, with_valid: bool
    ) -> tuple[list[np.ndarray], list[np.ndarray | None], np.ndarray | None]:
        """Frame-aligned masks (None = no mask for that frame), plus the optional validity marker."""
        if len(masks) != len(images):
            raise ValueError(f"got {len(images)} images but {len(masks)} masks")
        present = [i for i, m in enumerate(masks) if m is not None]
        stack = [m for m in masks if m is not None]
        # validity marker: frame pixels keep `mark`, padding gets the ignore value
        mark = 1 if self.ignore_index != 1 else 2
        if with_valid and images:
            stack.append(np.full(images[0].shape[:2], mark, dtype=np.uint8))
        out_images, out_stack = self._apply(images, stack, seed)
        out_masks: list[np.ndarray | None] = [None] * len(masks)
        for j, i in enumerate(present):
            out_masks[i] = out_stack[j]
        valid = out_stack[-1] == mark if with_valid else None
        return out_images, out_masks, valid

    def _apply(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], seed: int
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """One albumentations call: every image and every mask under the same parameters."""
        if not len(images):
            raise ValueError("ClipAugment needs at least one image")
        shape = images[0].shape
        for im in images:
            if im.shape != shape or im.ndim != 3 or im.shape[2] != 3:
                raise DataError(
                    f"frames of one clip must be HxWx3 of the same size, got {[i.shape for i in images]}"
                )
        for m in masks:
            if m.shape != shape[:2]:
                raise DataError(f"label of size {m.shape} does not match its image {shape[:2]}")
        self._pipeline.set_random_seed(int(seed) % _MAX_SEED)
        data: dict[str, np.ndarray] = {"images": np.stack(images)}
        if masks:
            data["masks"] = np.stack(masks)  # type: ignore[arg-type]
        out = self._pipeline(**data)
        out_images = [np.ascontiguousarray(x) for x in out["images"]]
        out_masks = [np.ascontiguousarray(x) for x in out["masks"]] if masks else []
        return out_images, out_masks


class StrongPhotometric:
    """UniMatch strong distortion: colour jitter (0.5, 0.5, 0.5, 0.25) p=0.8, random grayscale
    p=0.2, Gaussian blur sigma U[0.1, 2.0] p=0.5; per frame, seeded per call. ``jitter``,
    ``blur_kernel`` (0 = from sigma) and ``blur_sigma`` change the strengths (CAC: jitter
    (0.4, 0.4, 0.4, 0.1), a 5x5 kernel of sigma 1.1)."""

    def __init__(self, seed: int | None = None, jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25),
                 blur_kernel: int = 0, blur_sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.seed = seed
        b, c, s, h = jitter
        self._pipeline = A.Compose(
            [
                A.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h, p=0.8),
                A.ToGray(num_output_channels=3, p=0.2),
                A.GaussianBlur(blur_limit=(blur_kernel, blur_kernel) if blur_kernel else 0,
                               sigma_limit=blur_sigma, p=0.5),
            ],
            seed=seed,
        )

    def __call__(self, image: np.ndarray, seed: int | None = None) -> np.ndarray:
        """Distort one uint8 HxWx3 image; `seed` makes the call reproducible."""
        if seed is not None:
            self._pipeline.set_random_seed(int(seed) % _MAX_SEED)
        return np.ascontiguousarray(self._pipeline(image=image)["image"])


class EvalResize:
    """Resize an image to a fixed (h, w) with bilinear interpolation (None = keep the size)."""

    def __init__(self, size: tuple[int, int] | None) -> None:
        self.size = _check_size("size", size)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.size is None or image.shape[:2] == self.size:
            return image
        h, w = self.size
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


_MEAN_T = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
_STD_T = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 RGB -> float32 (3, H, W) normalised with ImageNet MEAN/STD."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return (t - _MEAN_T) / _STD_T


def label_to_tensor(label: np.ndarray) -> torch.Tensor:
    """uint8/int HxW class ids -> int64 (H, W)."""
    if label.ndim != 2:
        raise ValueError(f"expected an HxW label, got shape {label.shape}")
    return torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Inverse of `to_tensor` for one (3, H, W) tensor: uint8 HxWx3 (for visualisation)."""
    t = image.detach().float().cpu() * _STD_T + _MEAN_T
    return t.clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
