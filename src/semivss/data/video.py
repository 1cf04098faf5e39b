"""Videos with sparse labels: `FrameRef`, `Frame`, `Video`, `VideoSet` (docs/ARCHITECTURE.md).

A `VideoSet` is an ordered collection of videos. Every frame is either an image file (PNG/JPEG)
or a position in an mp4 file; any subset of frames carries a label PNG. Raw label values are
mapped to class ids ``0..C-1`` or ``255`` (ignore) through a 256-entry lookup table; raw values
the table does not know map to the sentinel :data:`UNKNOWN_LABEL` and make :meth:`read_label`
raise a `DataError` naming the file and the values (docs/protocols.md#6-dataset-formats).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from semivss.errors import DataError

IGNORE_INDEX = 255
"""Class id of pixels ignored by losses and metrics."""

UNKNOWN_LABEL = 254
"""Sentinel in a label LUT for raw values that are not valid in the dataset."""

MAX_CLASSES = 254
"""Class ids must stay below :data:`UNKNOWN_LABEL`."""


@dataclass(frozen=True, order=True)
class FrameRef:
    """Hashable reference to one frame: video name and source frame index."""

    video: str
    index: int

    def __str__(self) -> str:
        return f"{self.video}#{self.index}"


@dataclass(frozen=True)
class Frame:
    """One frame on disk: an image file, or a decode position in an mp4; optional label PNG."""

    video: str
    index: int
    image: Path | None = None
    mp4: Path | None = None
    position: int | None = None
    label: Path | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.mp4 is None):
            raise ValueError(f"frame {self.video}#{self.index}: give exactly one of image / mp4")
        if self.mp4 is not None and (self.position is None or self.position < 0):
            raise ValueError(f"frame {self.video}#{self.index}: mp4 frames need a position >= 0")

    @property
    def ref(self) -> FrameRef:
        return FrameRef(self.video, self.index)

    @property
    def source(self) -> str:
        """Human-readable location of the image (for error messages)."""
        if self.image is not None:
            return str(self.image)
        return f"{self.mp4} (frame at decode position {self.position})"


class Video:
    """A named video: frames ordered by source frame index (duplicates are an error)."""

    def __init__(self, name: str, frames: Iterable[Frame]) -> None:
        self.name = name
        self.frames: list[Frame] = sorted(frames, key=lambda f: f.index)
        self._pos: dict[int, int] = {}
        for pos, fr in enumerate(self.frames):
            if fr.video != name:
                raise ValueError(f"frame {fr.ref} does not belong to video {name!r}")
            if fr.index in self._pos:
                other = self.frames[self._pos[fr.index]]
                raise DataError(
                    f"video {name!r} has two frames with index {fr.index}: {other.source} and {fr.source}"
                )
            self._pos[fr.index] = pos

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames)

    def __repr__(self) -> str:
        return f"Video({self.name!r}, {len(self)} frames, {len(self.annotated())} annotated)"

    def position(self, index: int) -> int:
        """Position of the frame with source index `index` in the ordered frame list."""
        try:
            return self._pos[index]
        except KeyError:
            raise DataError(f"video {self.name!r} has no frame with index {index}") from None

    def refs(self) -> list[FrameRef]:
        return [f.ref for f in self.frames]

    def annotated(self) -> list[FrameRef]:
        return [f.ref for f in self.frames if f.label is not None]


# ---------------------------------------------------------------------------------------------
# label lookup tables and palettes


def make_label_lut(
    num_classes: int,
    mapping: Mapping[int, int] | None = None,
    ignore: Iterable[int] = (IGNORE_INDEX,),
) -> np.ndarray:
    """Build a (256,) uint8 LUT raw value -> class id / 255 (ignore) / UNKNOWN_LABEL.

    Without `mapping` raw values ``0..C-1`` are the class ids themselves. Values in `ignore` map
    to 255; every other raw value is unknown (an error when it occurs in a label file).
    """
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    lut = np.full(256, UNKNOWN_LABEL, dtype=np.uint8)
    if mapping is None:
        lut[:num_classes] = np.arange(num_classes, dtype=np.uint8)
    else:
        for raw, cls in mapping.items():
            if not 0 <= int(raw) <= 255:
                raise ValueError(f"raw label value {raw} outside 0..255")
            if not (0 <= int(cls) < num_classes or int(cls) == IGNORE_INDEX):
                raise ValueError(f"raw label value {raw} maps to {cls}, not a class id or 255")
            lut[int(raw)] = int(cls)
    for raw in ignore:
        if not 0 <= int(raw) <= 255:
            raise ValueError(f"ignore value {raw} outside 0..255")
        lut[int(raw)] = IGNORE_INDEX
    return lut


def default_palette(num_classes: int) -> np.ndarray:
    """PASCAL-VOC style bit-interleaved palette, (C, 3) uint8; deterministic and distinct."""
    pal = np.zeros((num_classes, 3), dtype=np.uint8)
    for c in range(num_classes):
        v, r, g, b = c, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (v & 1) << shift
            g |= ((v >> 1) & 1) << shift
            b |= ((v >> 2) & 1) << shift
            v >>= 3
            if v == 0:
                break
        pal[c] = (r, g, b)
    return pal


# ---------------------------------------------------------------------------------------------
# low-level readers


def read_image_file(path: Path) -> np.ndarray:
    """Decode a PNG/JPEG (any bit depth / channel count) to uint8 HxWx3 RGB; DataError if bad."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read image file {path}: {e}") from e
    img = None
    if data.size:
        img = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise DataError(f"cannot decode image file {path} (empty, corrupt or not an image)")
    return np.ascontiguousarray(img[:, :, ::-1])


def read_raw_label_file(path: Path) -> np.ndarray:
    """Read a single-channel label PNG (grayscale or palette-indexed) as raw uint8 HxW values."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.array(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode label file {path} (corrupt or not an image): {e}") from e
    if arr.ndim == 3:
        if mode in ("LA", "PA"):
            arr = arr[:, :, 0]
        elif np.all(arr[:, :, :3] == arr[:, :, :1]):
            arr = arr[:, :, 0]
        else:
            raise DataError(
                f"label file {path} is a colour ({mode}) image; labels must be single-channel "
                "PNGs holding raw class values (grayscale or palette-indexed)"
            )
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            bad = np.unique(arr[(arr < 0) | (arr > 255)])[:10].tolist()
            raise DataError(f"label file {path} has values outside 0..255: {bad}")
        arr = arr.astype(np.uint8)
    return arr


@dataclass(frozen=True)
class _Mp4Info:
    pts: np.ndarray  # presentation timestamps in decode-position order (sorted); -1 if unknown
    keys: np.ndarray  # (K, 2) key-frame packets: (pts, min(pts, dts)), sorted by pts
    height: int
    width: int


_MP4_INFO: dict[tuple[str, int, int], _Mp4Info] = {}
_MP4_INFO_LOCK = threading.Lock()


def probe_mp4(path: Path) -> _Mp4Info:
    """Index the video stream of an mp4 without decoding: frame timestamps, key frames, size."""
    import av

    path = Path(path)
    if not path.is_file():
        raise DataError(f"video file not found: {path}")
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    with _MP4_INFO_LOCK:
        if key in _MP4_INFO:
            return _MP4_INFO[key]
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"video file {path} has no video stream")
            stream = container.streams.video[0]
            packets = [(p.pts, p.dts, p.is_keyframe) for p in container.demux(stream) if p.size > 0]
            h, w = stream.codec_context.height, stream.codec_context.width
    except DataError:
        raise
    except Exception as e:  # av raises many error types (InvalidDataError, OSError, ...)
        raise DataError(f"cannot read video file {path}: {e}") from e
    if not packets:
        raise DataError(f"video file {path} contains no frames")
    if any(p is None for p, _, _ in packets):  # no timestamps: sequential decoding only
        info = _Mp4Info(np.full(len(packets), -1, np.int64), np.zeros((0, 2), np.int64), int(h), int(w))
    else:
        keys = sorted((p, min(p, d) if d is not None else p) for p, d, k in packets if k)
        info = _Mp4Info(
            np.sort(np.asarray([p for p, _, _ in packets], dtype=np.int64)),
            np.asarray(keys, dtype=np.int64).reshape(-1, 2),
            int(h),
            int(w),
        )
    with _MP4_INFO_LOCK:
        _MP4_INFO[key] = info
    return info


class _FrameCache:
    """Byte-bounded LRU cache of decoded mp4 frames, keyed by (path, position)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        with self._lock:
            arr = self._items.get(key)
            if arr is not None:
                self._items.move_to_end(key)
            return arr

    def put(self, key: tuple[str, int], arr: np.ndarray) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = arr
            self._bytes += arr.nbytes
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes


def _decode_mp4_frame(path: Path, position: int, cache: _FrameCache) -> np.ndarray:
    """Decode the frame at decode `position` (presentation order) of an mp4.

    Seeks to the key frame before it and decodes forward, caching every frame decoded on the way
    (clips read nearby frames); falls back to decoding from the start when timestamps are unusable.
    """
    info = probe_mp4(path)
    if not 0 <= position < len(info.pts):
        raise DataError(f"video file {path} has {len(info.pts)} frames, no frame at position {position}")
    hit = cache.get((str(path), position))
    if hit is not None:
        return hit
    try:
        result = None
        if info.pts[0] >= 0 and position > 0 and len(info.keys):
            result = _decode_seek(path, position, info, cache)
        if result is None:
            result = _decode_sequential(path, position, cache)
    except DataError:
        raise
    except Exception as e:  # av raises many error types
        raise DataError(f"cannot decode {path} at frame position {position}: {e}") from e
    if result is None:
        raise DataError(f"cannot decode {path} at frame position {position}: the video ended before it")
    return result


def _decode_seek(path: Path, position: int, info: _Mp4Info, cache: _FrameCache) -> np.ndarray | None:
    """Seek to a key frame at or before the target and decode forward. Frames are trusted only
    from the first decoded key frame on (leading B-frames may be broken). Containers seek by pts or
    by dts, so the key frame's pts is tried first and, if the seek lands after the target, its
    dts and an earlier key frame. None = give up (caller decodes sequentially)."""
    import av

    target = int(info.pts[position])
    pos_of = {int(p): i for i, p in enumerate(info.pts)}
    earlier = info.keys[info.keys[:, 0] <= target][::-1][:2]
    offsets = list(dict.fromkeys(int(o) for row in earlier for o in row))  # pts first, then min(pts, dts)
    for offset in offsets:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            container.seek(int(offset), stream=stream, backward=True, any_frame=False)
            anchor: int | None = None
            for frame in container.decode(stream):
                if frame.pts is None or int(frame.pts) not in pos_of:
                    return None
                pts = int(frame.pts)
                if anchor is None:
                    if not frame.key_frame:
                        continue
                    anchor = pts
                    if anchor > target:
                        break  # landed after the target: try an earlier key frame
                if pts < anchor:
                    continue
                pos = pos_of[pts]
                arr = frame.to_ndarray(format="rgb24")
                cache.put((str(path), pos), arr)
                if pos == position:
                    return arr
                if pos > position:
                    return None
    return None


def _decode_sequential(path: Path, position: int, cache: _FrameCache) -> np.ndarray | None:
    import av

    with av.open(str(path)) as container:
        for pos, frame in enumerate(container.decode(video=0)):
            arr = frame.to_ndarray(format="rgb24")
            cache.put((str(path), pos), arr)
            if pos == position:
                return arr
    return None


# ---------------------------------------------------------------------------------------------


FrameLike = Frame | FrameRef


@dataclass(eq=False)
class VideoSet:
    """Named set of videos with a class table, a palette and a raw-label lookup table.

    `label_lut` maps raw label values (0..255) to class ids ``0..C-1``, 255 (ignore) or
    :data:`UNKNOWN_LABEL` (invalid). `root` is only used in error messages.
    """

    name: str
    videos: Sequence[Video]
    classes: list[str]
    palette: np.ndarray | None = None
    label_lut: np.ndarray | None = None
    root: Path | None = None
    mp4_cache_bytes: int = 512 * 2**20
    _by_name: dict[str, Video] = field(init=False, repr=False)
    _sizes: dict[FrameRef, tuple[int, int]] = field(init=False, repr=False)
    _cache: _FrameCache = field(init=False, repr=False)

    def __post_init__(self) -> None:
        where = self.root if self.root is not None else self.name
        self.videos = list(self.videos)
        if not self.videos or all(len(v) == 0 for v in self.videos):
            raise DataError(f"video set {self.name!r} is empty: no frames found in {where}")
        self.classes = [str(c) for c in self.classes]
        c = len(self.classes)
        if not 1 <= c <= MAX_CLASSES:
            raise DataError(f"video set {self.name!r}: need 1..{MAX_CLASSES} classes, got {c}")
        if self.palette is None:
            self.palette = default_palette(c)
        self.palette = np.asarray(self.palette)
        if self.palette.shape != (c, 3) or self.palette.min() < 0 or self.palette.max() > 255:
            raise DataError(
                f"video set {self.name!r}: palette must be ({c}, 3) values in 0..255, "
                f"got shape {self.palette.shape}"
            )
        self.palette = self.palette.astype(np.uint8)
        if self.label_lut is None:
            self.label_lut = make_label_lut(c)
        lut = np.asarray(self.label_lut)
        valid = (lut < c) | (lut == IGNORE_INDEX) | (lut == UNKNOWN_LABEL)
        if lut.shape != (256,) or not valid.all():
            raise DataError(f"video set {self.name!r}: label_lut must be (256,) values in 0..{c - 1}, 254, 255")
        self.label_lut = lut.astype(np.uint8)
        self._by_name = {}
        for v in self.videos:
            if v.name in self._by_name:
                raise DataError(f"video set {self.name!r} has two videos named {v.name!r} in {where}")
            self._by_name[v.name] = v
        self._sizes = {}
        self._cache = _FrameCache(self.mp4_cache_bytes)

    # pickling (DataLoader workers): drop caches, keep the description
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None
        state["_sizes"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache = _FrameCache(self.mp4_cache_bytes)

    def __len__(self) -> int:
        """Number of frames over all videos."""
        return sum(len(v) for v in self.videos)

    def __repr__(self) -> str:
        return (
            f"VideoSet({self.name!r}, {len(self.videos)} videos, {len(self)} frames, "
            f"{len(self.annotated())} annotated, {self.num_classes} classes)"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def video(self, name: str) -> Video:
        try:
            return self._by_name[name]
        except KeyError:
            raise DataError(f"video set {self.name!r} has no video named {name!r}") from None

    def frame(self, ref: FrameLike) -> Frame:
        """The `Frame` of a reference (DataError if it is not in the set)."""
        if isinstance(ref, Frame):
            return ref
        video = self.video(ref.video)
        return video.frames[video.position(ref.index)]

    def position(self, ref: FrameLike) -> int:
        """Position of a frame in the ordered frame list of its video."""
        return self.video(ref.video).position(ref.index)

    def frames(self) -> list[FrameRef]:
        """All frames, ordered by video then index."""
        return [r for v in self.videos for r in v.refs()]

    def annotated(self) -> list[FrameRef]:
        """Frames that carry a label file, ordered by video then index."""
        return [r for v in self.videos for r in v.annotated()]

    def has_label(self, ref: FrameLike) -> bool:
        return self.frame(ref).label is not None

    def image_size(self, ref: FrameLike) -> tuple[int, int]:
        """(H, W) of a frame's image, read from the file header (cached)."""
        fr = self.frame(ref)
        size = self._sizes.get(fr.ref)
        if size is not None:
            return size
        if fr.mp4 is not None:
            info = probe_mp4(fr.mp4)
            size = (info.height, info.width)
        else:
            assert fr.image is not None
            if not fr.image.is_file():
                raise DataError(f"image file not found: {fr.image}")
            try:
                with Image.open(fr.image) as im:
                    w, h = im.size
                size = (h, w)
            except (OSError, SyntaxError, ValueError) as e:
                raise DataError(f"cannot decode image file {fr.image} (corrupt or not an image): {e}") from e
        self._sizes[fr.ref] = size
        return size

    def read_image(self, ref: FrameLike) -> np.ndarray:
        """The frame as uint8 HxWx3 RGB (DataError naming the file if missing/corrupt)."""
        fr = self.frame(ref)
        if fr.mp4 is not None:
            assert fr.position is not None
            img = _decode_mp4_frame(fr.mp4, fr.position, self._cache).copy()  # cache stays intact
        else:
            assert fr.image is not None
            img = read_image_file(fr.image)
        self._sizes[fr.ref] = (img.shape[0], img.shape[1])
        return img

    def read_label(self, ref: FrameLike) -> np.ndarray:
        """The frame's label as uint8 HxW class ids / 255, mapped by `label_lut` and validated:
        unknown raw values and a size different from the image are DataErrors naming the files."""
        fr = self.frame(ref)
        if fr.label is None:
            raise DataError(f"frame {fr.ref} of video set {self.name!r} ({fr.source}) has no label")
        raw = read_raw_label_file(fr.label)
        assert self.label_lut is not None
        lab = self.label_lut[raw]
        bad = lab == UNKNOWN_LABEL
        if bad.any():
            values = np.unique(raw[bad]).tolist()
            known = np.flatnonzero(self.label_lut != UNKNOWN_LABEL).tolist()
            raise DataError(
                f"label file {fr.label} has raw values {values} that are not valid for "
                f"{self.name!r} (valid raw values: {_ranges(known)})"
            )
        h, w = self.image_size(fr)
        if lab.shape != (h, w):
            raise DataError(
                f"label file {fr.label} is {lab.shape[1]}x{lab.shape[0]} (WxH) but its image "
                f"{fr.source} is {w}x{h}"
            )
        return lab


def _ranges(values: list[int]) -> str:
    """Compact text of sorted ints: [0,1,2,5] -> '0-2, 5'."""
    out: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(out) if out else "none"
