"""Dataset readers producing a `VideoSet`: `camvid` (SegNet layout), `folder` (users' own videos:
image frames or one video file per video, label PNGs for any subset of frames, `meta.yaml`),
`synthetic` (the folder format written by `semivss.data.synthetic`), `cityscapes` (sequence
snippets + gtFine labelIds -> 19 trainIds) and `vspw` (raw 0 and 255 -> 255, v -> v - 1).

Layouts, file-name conventions and label mappings: docs/protocols.md#6-dataset-formats.
"""

from __future__ import annotations

import os

import re
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from semivss.data.video import IGNORE_INDEX, MAX_CLASSES, Frame, Video, VideoSet, make_label_lut
from semivss.errors import DataError
from semivss.registry import FORMATS

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_PALETTE",
    "VSPW_CLASSES",
    "FolderMeta",
    "load_camvid",
    "load_folder",
    "load_cityscapes",
    "load_vspw",
    "load_dataset",
    "FORMATS",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")

# ---------------------------------------------------------------------------------------------
# CamVid

CAMVID_CLASSES = [
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
]  # fmt: skip
CAMVID_PALETTE = np.array(
    [
        [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222],
        [128, 128, 0], [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192],
    ],
    dtype=np.uint8,
)  # fmt: skip
_CAMVID_NAME = re.compile(r"^(?P<video>.+)_f?(?P<index>\d+)$")


def _parse_camvid_name(path: Path) -> tuple[str, int]:
    m = _CAMVID_NAME.match(path.stem)
    if m is None:
        raise DataError(f"CamVid file name {path} is not <sequence>_<frame>.png (e.g. 0006R0_f02400.png)")
    return m.group("video"), int(m.group("index"))


@FORMATS.register("camvid")
def load_camvid(root: str | Path, split: str | None = "train") -> VideoSet:
    """CamVid in the SegNet layout: `root/<split>/` frames + `root/<split>annot/` labels
    (`split` None = "train").

    Video = sequence name, index = 30 fps source frame number; labels 0..10 are classes, 11 (void)
    and 255 map to 255 (docs/protocols.md#61-camvid).
    """
    root, split = Path(root), split or "train"
    img_dir, ann_dir = root / split, root / f"{split}annot"
    if not img_dir.is_dir():
        raise DataError(f"CamVid split folder not found: {img_dir}")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"CamVid split folder {img_dir} contains no images")
    if not ann_dir.is_dir():
        raise DataError(f"CamVid annotation folder not found: {ann_dir} (needed for split {split!r})")
    by_video: dict[str, list[Frame]] = {}
    for img in images:
        video, index = _parse_camvid_name(img)
        label = ann_dir / (img.stem + ".png")
        if not label.is_file():
            raise DataError(f"CamVid image {img} has no annotation {label}")
        by_video.setdefault(video, []).append(Frame(video, index, image=img, label=label))
    lut = make_label_lut(len(CAMVID_CLASSES), ignore=(11, IGNORE_INDEX))
    videos = [Video(name, frames) for name, frames in sorted(by_video.items())]
    return VideoSet(f"camvid/{split}", videos, list(CAMVID_CLASSES), CAMVID_PALETTE.copy(), lut, root=img_dir)


# ---------------------------------------------------------------------------------------------
# folder format


class FolderMeta(BaseModel):
    """Schema of `meta.yaml` in the folder format."""

    model_config = ConfigDict(extra="forbid")

    classes: list[str] = Field(min_length=1, max_length=MAX_CLASSES)
    palette: list[tuple[int, int, int]] | None = None
    label_map: dict[int, int | str] | None = None
    ignore_index: int | list[int] = IGNORE_INDEX
    name: str | None = None
    description: str | None = None


def _read_meta(path: Path) -> FolderMeta:
    if not path.is_file():
        raise DataError(f"folder dataset needs {path} (with at least a `classes:` list)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"cannot parse {path}: {e}") from e
    if not isinstance(raw, dict):
        raise DataError(f"{path} must be a YAML mapping with a `classes:` list")
    try:
        meta = FolderMeta.model_validate(raw)
    except ValidationError as e:
        msgs = "; ".join(f"key '{'.'.join(str(x) for x in err['loc'])}': {err['msg']}" for err in e.errors())
        raise DataError(f"invalid {path}: {msgs}") from None
    c = len(meta.classes)
    if meta.palette is not None:
        if len(meta.palette) != c:
            raise DataError(f"invalid {path}: key 'palette' has {len(meta.palette)} colours for {c} classes")
        if any(not 0 <= v <= 255 for col in meta.palette for v in col):
            raise DataError(f"invalid {path}: key 'palette' values must be in 0..255")
    return meta


def _folder_lut(meta: FolderMeta, path: Path) -> np.ndarray:
    ignore = [meta.ignore_index] if isinstance(meta.ignore_index, int) else list(meta.ignore_index)
    mapping: dict[int, int] | None = None
    if meta.label_map is not None:
        mapping = {}
        for raw, cls in meta.label_map.items():
            if isinstance(cls, str):
                if cls not in meta.classes:
                    raise DataError(f"invalid {path}: key 'label_map.{raw}': unknown class name {cls!r}")
                cls = meta.classes.index(cls)
            mapping[raw] = cls
    try:
        return make_label_lut(len(meta.classes), mapping, ignore)
    except ValueError as e:
        raise DataError(f"invalid {path}: key 'label_map'/'ignore_index': {e}") from None


def _last_int(path: Path) -> int:
    nums = re.findall(r"\d+", path.stem)
    if not nums:
        raise DataError(f"frame file name {path} contains no frame number (the last integer is the index)")
    return int(nums[-1])


def _read_list(path: Path) -> list[str]:
    names: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and line not in names:
            names.append(line)
    return names


@FORMATS.register("folder")
@FORMATS.register("synthetic")  # `semivss.data.synthetic` writes the folder format
def load_folder(root: str | Path, split: str | None = None) -> VideoSet:
    """Generic folder format (layout in the module docstring); `split` names `root/<split>.txt`."""
    from semivss.data.video import probe_mp4

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    meta_path = root / "meta.yaml"
    meta = _read_meta(meta_path)
    lut = _folder_lut(meta, meta_path)
    vid_dir, lab_dir = root / "videos", root / "labels"
    if not vid_dir.is_dir():
        raise DataError(f"folder dataset {root} has no videos/ folder")
    sources: dict[str, Path] = {}
    for p in sorted(vid_dir.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() or p.suffix.lower() in VIDEO_SUFFIXES:
            name = p.name if p.is_dir() else p.stem
            if name in sources:
                raise DataError(f"video {name!r} is given twice: {sources[name]} and {p}")
            sources[name] = p
    if not sources:
        raise DataError(f"folder {vid_dir} contains no videos (sub-folders of frames or .mp4 files)")
    if lab_dir.is_dir():
        for p in sorted(lab_dir.iterdir()):
            if p.is_dir() and not p.name.startswith(".") and p.name not in sources:
                raise DataError(f"label folder {p} belongs to no video in {vid_dir}")
    names = list(sources)
    if split is not None:
        split_file = root / f"{split}.txt"
        if not split_file.is_file():
            raise DataError(f"split file not found: {split_file}")
        names = _read_list(split_file)
        for n in names:
            if n not in sources:
                raise DataError(f"split file {split_file} names video {n!r}, which is not in {vid_dir}")
        if not names:
            raise DataError(f"split file {split_file} lists no videos")
    videos = []
    for name in names:
        src = sources[name]
        entries: list[tuple[int, str, Path | None, Path | None, int | None]] = []  # index, stem, ...
        if src.is_dir():
            files = sorted(f for f in src.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"video folder {src} contains no .png/.jpg frames")
            entries = [(_last_int(f), f.stem, f, None, None) for f in files]
        else:
            n = len(probe_mp4(src).pts)
            entries = [(i, f"{i:06d}", None, src, i) for i in range(n)]
        labels = _match_labels(lab_dir / name, entries)
        frames = [
            Frame(name, idx, image=img, mp4=mp4, position=pos, label=labels.get(idx))
            for idx, _, img, mp4, pos in entries
        ]
        videos.append(Video(name, frames))
    palette = np.array(meta.palette, dtype=np.uint8) if meta.palette is not None else None
    set_name = meta.name or root.name
    if split is not None:
        set_name = f"{set_name}/{split}"
    return VideoSet(set_name, videos, meta.classes, palette, lut, root=root)


def _match_labels(
    lab_dir: Path, entries: list[tuple[int, str, Path | None, Path | None, int | None]]
) -> dict[int, Path]:
    """Map frame index -> label file; each label must match exactly one frame (stem or index)."""
    if not lab_dir.is_dir():
        return {}
    by_stem = {stem: idx for idx, stem, *_ in entries}
    indices = set(by_stem.values())
    out: dict[int, Path] = {}
    for f in sorted(lab_dir.iterdir()):
        if f.name.startswith(".") or f.suffix.lower() != ".png":
            continue
        if f.stem in by_stem:
            idx = by_stem[f.stem]
        elif f.stem.isdigit() and int(f.stem) in indices:
            idx = int(f.stem)
        else:
            raise DataError(
                f"label file {f} matches no frame of its video (name it <frame stem>.png or <index:06d>.png)"
            )
        if idx in out:
            raise DataError(f"frame {idx} has two label files: {out[idx]} and {f}")
        out[idx] = f
    return out


def _subdirs(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` (none when it does not exist), sorted, from one listing."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if e.is_dir() and not e.name.startswith("."))


def _files(folder: Path, suffix: str = "") -> list[str]:
    """Names of the files of ``folder`` that end with ``suffix``, sorted, from one listing."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.name.endswith(suffix) and not e.name.startswith(".") and e.is_file())


# ---------------------------------------------------------------------------------------------
# Cityscapes


def _cityscapes_table() -> tuple[list[str], np.ndarray, np.ndarray]:
    try:
        from cityscapesscripts.helpers.labels import labels as cs_labels
    except ImportError as e:  # pragma: no cover - dev dependency
        raise DataError("the cityscapes format needs the package `cityscapesscripts`") from e
    train = sorted((lb.trainId, lb.name, lb.color) for lb in cs_labels if 0 <= lb.trainId < 255)
    classes = [name for _, name, _ in train]
    palette = np.array([color for _, _, color in train], dtype=np.uint8)
    mapping = {
        lb.id: (lb.trainId if 0 <= lb.trainId < 255 else IGNORE_INDEX) for lb in cs_labels if 0 <= lb.id <= 255
    }
    lut = make_label_lut(len(classes), mapping, ignore=())
    return classes, palette, lut


_CS_NAME = re.compile(r"^(?P<city>[^_]+)_(?P<seq>\d+)_(?P<frame>\d+)_leftImg8bit$")


@FORMATS.register("cityscapes")
def load_cityscapes(root: str | Path, split: str | None = "train") -> VideoSet:
    """Cityscapes video snippets with gtFine labelIds -> 19 trainIds (docs/protocols.md#62-cityscapes);
    `split` None = "train"."""
    root, split = Path(root), split or "train"
    img_root = root / "leftImg8bit_sequence" / split
    if not img_root.is_dir():
        img_root = root / "leftImg8bit" / split
    if not img_root.is_dir():
        raise DataError(f"Cityscapes images not found: {root / 'leftImg8bit_sequence' / split} (nor leftImg8bit/)")
    gt_root = root / "gtFine" / split
    # one directory listing per city (no per-frame stat), so a 250k-frame set indexes in seconds;
    # images are neither opened nor decoded here
    labels = {lab: city / lab for city in _subdirs(gt_root) for lab in _files(city, "_gtFine_labelIds.png")}
    by_video: dict[str, list[Frame]] = {}
    seen: set[str] = set()
    for city_dir in _subdirs(img_root):
        for img_name in _files(city_dir, "_leftImg8bit.png"):
            img = city_dir / img_name
            m = _CS_NAME.match(img_name[: -len(".png")])
            if m is None:
                raise DataError(f"Cityscapes file name {img} is not <city>_<seq>_<frame>_leftImg8bit.png")
            city, seq, frame = m.group("city"), m.group("seq"), m.group("frame")
            name = f"{city}_{seq}_{frame}_gtFine_labelIds.png"
            label = labels.get(name)
            if label is not None:
                seen.add(name)
            video = f"{city}_{seq}"
            by_video.setdefault(video, []).append(Frame(video, int(frame), image=img, label=label))
    if not by_video:
        raise DataError(f"Cityscapes folder {img_root} contains no *_leftImg8bit.png frames")
    orphans = sorted(set(labels) - seen)
    if orphans:
        raise DataError(f"Cityscapes label {labels[orphans[0]]} has no image in {img_root}")
    for frames in by_video.values():
        frames.sort(key=lambda f: f.index)
    classes, palette, lut = _cityscapes_table()
    videos = [Video(n, fr) for n, fr in sorted(by_video.items())]
    return VideoSet(f"cityscapes/{split}", videos, classes, palette, lut, root=img_root)


# ---------------------------------------------------------------------------------------------
# VSPW

VSPW_CLASSES = [
    "wall", "ceiling", "door", "stair", "ladder", "escalator", "Playground_slide", "handrail_or_fence",
    "window", "rail", "goal", "pillar", "pole", "floor", "ground", "grass", "sand", "athletic_field",
    "road", "path", "crosswalk", "building", "house", "bridge", "tower", "windmill", "well_or_well_lid",
    "other_construction", "sky", "mountain", "stone", "wood", "ice", "snowfield", "grandstand", "sea",
    "river", "lake", "waterfall", "water", "billboard_or_Bulletin_Board", "sculpture", "pipeline",
    "flag", "parasol_or_umbrella", "cushion_or_carpet", "tent", "roadblock", "car", "bus", "truck",
    "bicycle", "motorcycle", "wheeled_machine", "ship_or_boat", "raft", "airplane", "tyre",
    "traffic_light", "lamp", "person", "cat", "dog", "horse", "cattle", "other_animal", "tree",
    "flower", "other_plant", "toy", "ball_net", "backboard", "skateboard", "bat", "ball",
    "cupboard_or_showcase_or_storage_rack", "box", "traveling_case_or_trolley_case", "basket",
    "bag_or_package", "trash_can", "cage", "plate", "tub_or_bowl_or_pot", "bottle_or_cup", "barrel",
    "fishbowl", "bed", "pillow", "table_or_desk", "chair_or_seat", "bench", "sofa", "shelf", "bathtub",
    "gun", "commode", "roaster", "other_machine", "refrigerator", "washing_machine", "Microwave_oven",
    "fan", "curtain", "textiles", "clothes", "painting_or_poster", "mirror", "flower_pot_or_vase",
    "clock", "book", "tool", "blackboard", "tissue", "screen_or_television", "computer", "printer",
    "Mobile_phone", "keyboard", "other_electronic_product", "fruit", "food", "instrument", "train",
]  # fmt: skip


@FORMATS.register("vspw")
def load_vspw(root: str | Path, split: str | None = "train") -> VideoSet:
    """VSPW: `<split>.txt` video names, `data/<video>/origin/*.jpg`, `data/<video>/mask/*.png`;
    raw 0 and 255 -> 255 (254 too, seen in some releases), v -> v - 1 (docs/protocols.md#63-vspw);
    `split` None = "train"."""
    root, split = Path(root), split or "train"
    split_file = root / f"{split}.txt"
    if not split_file.is_file():
        raise DataError(f"VSPW split file not found: {split_file}")
    names = _read_list(split_file)
    if not names:
        raise DataError(f"VSPW split file {split_file} lists no videos")
    videos = []
    for name in names:  # one listing of origin/ and mask/ per video: no per-frame stat, no decoding
        origin, mask = root / "data" / name / "origin", root / "data" / name / "mask"
        if not origin.is_dir():
            raise DataError(f"VSPW video {name!r} listed in {split_file} has no folder {origin}")
        files = [f for f in _files(origin) if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataError(f"VSPW video folder {origin} contains no frames")
        masks = set(_files(mask, ".png")) if mask.is_dir() else set()
        frames = []
        for f in files:
            stem = os.path.splitext(f)[0]
            frames.append(Frame(name, _last_int(origin / f), image=origin / f,
                                label=mask / f"{stem}.png" if f"{stem}.png" in masks else None))
        videos.append(Video(name, frames))
    lut = make_label_lut(len(VSPW_CLASSES), {v: v - 1 for v in range(1, 125)}, ignore=(0, 254, 255))
    return VideoSet(f"vspw/{split}", videos, list(VSPW_CLASSES), None, lut, root=root)


# ---------------------------------------------------------------------------------------------


def load_dataset(fmt: str, root: str | Path, split: str | None, key: str | None = None) -> VideoSet:
    """Load `split` of the dataset at `root` in format `fmt` (a name registered in
    :data:`semivss.registry.FORMATS`); an unknown `fmt` is a ConfigError naming `key`
    (default `data.format`) and the available formats."""
    return FORMATS.get(fmt, key=key)(Path(root), split)
