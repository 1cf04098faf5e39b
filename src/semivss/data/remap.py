"""Label remapping by a lookup table (PVUW 2024 report, section 3.1: labels of other datasets are
mapped to the target classes, classes without a target become 255).

A :class:`LabelMap` maps source class ids ``0..253`` to target class ids ``0..C-1`` or ``255``
(ignore); every source id it does not list maps to 255, and 255 stays 255. It is read from YAML /
JSON (``target_classes``, optional ``palette``, ``map``) or CSV (``src,tgt[,name]``); file
formats: docs/protocols.md#66-label-maps. Validation errors (:class:`~semivss.errors.DataError`)
name the file and the offending entry.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from semivss.data.video import IGNORE_INDEX, MAX_CLASSES, UNKNOWN_LABEL, VideoSet, default_palette
from semivss.errors import DataError

__all__ = ["LabelMap", "compose_lut"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hashable = key in seen
        except TypeError:
            hashable = False
        if hashable:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        try:
            seen.add(key)
        except TypeError:
            pass
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _as_int(value: Any) -> int | None:
    """``value`` as an int when it is one (int, integral float, or a string of digits), else None.
    Booleans are not integers here."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("+-").isdigit():
            return int(text)
    return None


def _source_id(key: Any, where: str) -> int:
    src = _as_int(key)
    if src is None:
        raise DataError(f"{where}: source id {key!r} is not an integer")
    if not 0 <= src < MAX_CLASSES:
        raise DataError(
            f"{where}: source id {src} is outside 0..{MAX_CLASSES - 1} "
            f"({IGNORE_INDEX} is the ignore id and always maps to {IGNORE_INDEX})"
        )
    return src


def _target_id(value: Any, classes: Sequence[str], where: str) -> int:
    if value is None:
        return IGNORE_INDEX
    tgt = _as_int(value)
    if tgt is None:
        if isinstance(value, str):
            if value in classes:
                return list(classes).index(value)
            raise DataError(f"{where}: unknown target class name {value!r} (target classes: {list(classes)})")
        raise DataError(f"{where}: target {value!r} is neither an integer id nor a class name")
    if not (0 <= tgt < len(classes) or tgt == IGNORE_INDEX):
        raise DataError(
            f"{where}: target id {tgt} out of range (target classes 0..{len(classes) - 1}, "
            f"or {IGNORE_INDEX} = ignore)"
        )
    return tgt


def _check_classes(classes: Sequence[Any], where: str) -> list[str]:
    names = [str(c) for c in classes]
    if not 1 <= len(names) <= MAX_CLASSES:
        raise DataError(f"{where}: need 1..{MAX_CLASSES} target classes, got {len(names)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{where}: duplicate target class names {dup}")
    return names


def compose_lut(base: np.ndarray, label_map: LabelMap, num_source_classes: int) -> np.ndarray:
    """Raw-value LUT of a video set followed by ``label_map``: raw -> source id -> target id.

    Raw values the base LUT marks unknown (:data:`UNKNOWN_LABEL`) stay unknown (an error when they
    occur), ignored ones stay 255, source ids go through ``label_map.lut``.
    """
    base = np.asarray(base, dtype=np.uint8)
    if base.shape != (256,):
        raise ValueError(f"base LUT must have shape (256,), got {base.shape}")
    too_big = [s for s in label_map.mapping if s >= num_source_classes]
    if too_big:
        raise DataError(
            f"{label_map.source}: source ids {too_big} do not exist in a dataset of "
            f"{num_source_classes} classes (ids 0..{num_source_classes - 1})"
        )
    out = label_map.lut[base]
    out[base == UNKNOWN_LABEL] = UNKNOWN_LABEL
    out[base == IGNORE_INDEX] = IGNORE_INDEX
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class LabelMap:
    """Source id -> target id lookup (module docstring). ``mapping`` holds the listed source ids
    only (values: target ids or 255); ``source`` names where it came from (for errors)."""

    classes: tuple[str, ...]
    mapping: Mapping[int, int]
    palette: np.ndarray | None = None
    source: str = "<label map>"

    def __post_init__(self) -> None:
        names = _check_classes(self.classes, self.source)
        object.__setattr__(self, "classes", tuple(names))
        clean: dict[int, int] = {}
        for src, tgt in self.mapping.items():
            where = f"{self.source}: entry {src!r}"
            clean[_source_id(src, self.source)] = _target_id(tgt, names, where)
        object.__setattr__(self, "mapping", dict(sorted(clean.items())))
        if self.palette is not None:
            pal = np.asarray(self.palette)
            if pal.shape != (len(names), 3) or pal.min() < 0 or pal.max() > 255:
                raise DataError(
                    f"{self.source}: palette must hold {len(names)} RGB colours in 0..255, got shape {pal.shape}"
                )
            object.__setattr__(self, "palette", pal.astype(np.uint8))

    @property
    def num_classes(self) -> int:
        """Number of target classes."""
        return len(self.classes)

    @property
    def lut(self) -> np.ndarray:
        """(256,) uint8: ``lut[src]`` = target id; unlisted ids (and 255) -> 255."""
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        for src, tgt in self.mapping.items():
            lut[src] = tgt
        return lut

    def apply(self, label: np.ndarray) -> np.ndarray:
        """Remap a label map of source ids (any integer dtype, values 0..255) to target ids (uint8)."""
        arr = np.asarray(label)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
        if arr.dtype != np.uint8:
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                raise ValueError(f"label values must lie in 0..255, got {arr.min()}..{arr.max()}")
            arr = arr.astype(np.uint8)
        return self.lut[arr]

    def remap_videoset(self, videoset: VideoSet) -> VideoSet:
        """A copy of ``videoset`` whose labels are read through this map (its label LUT composed
        with :attr:`lut`) and whose classes / palette are the target's."""
        lut = compose_lut(videoset.label_lut, self, videoset.num_classes)  # type: ignore[arg-type]
        palette = self.palette if self.palette is not None else default_palette(self.num_classes)
        return dataclasses.replace(videoset, classes=list(self.classes), palette=palette.copy(), label_lut=lut)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_mapping(
        cls,
        mapping: Mapping[Any, Any],
        num_target_classes: int | None = None,
        target_classes: Sequence[str] | None = None,
        source: str = "<label map>",
    ) -> LabelMap:
        """From ``{src_id: tgt_id | tgt_name | 255 | None}``. Give ``target_classes`` (names) or
        ``num_target_classes`` (names ``class<id>``); both must agree when both are given."""
        if target_classes is None:
            if num_target_classes is None:
                raise ValueError("give num_target_classes or target_classes")
            target_classes = [f"class{i}" for i in range(int(num_target_classes))]
        elif num_target_classes is not None and num_target_classes != len(target_classes):
            raise DataError(
                f"{source}: {len(target_classes)} target class names for {num_target_classes} classes"
            )
        return cls(tuple(str(c) for c in target_classes), dict(mapping), None, source)

    @classmethod
    def from_file(cls, path: str | Path, target_classes: Sequence[str] | None = None) -> LabelMap:
        """Read a YAML (``.yaml``/``.yml``), JSON (``.json``) or CSV (``.csv``) map (module
        docstring). ``target_classes`` overrides / supplies the target class names."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"label map file not found: {path}")
        suffix = path.suffix.lower()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read label map {path}: {exc}") from None
        if suffix == ".csv":
            return cls._from_csv(path, text, target_classes)
        if suffix == ".json":
            try:
                raw = json.loads(text, object_pairs_hook=lambda pairs: _unique_pairs(pairs, path))
            except json.JSONDecodeError as exc:
                raise DataError(f"cannot parse label map {path}: {exc}") from None
        elif suffix in (".yaml", ".yml"):
            try:
                raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
            except yaml.YAMLError as exc:
                raise DataError(f"cannot parse label map {path}: {exc}") from None
        else:
            raise DataError(f"label map {path}: unknown file type {path.suffix!r} (use .yaml, .yml, .json or .csv)")
        return cls._from_dict(path, raw, target_classes)

    @classmethod
    def _from_dict(cls, path: Path, raw: Any, target_classes: Sequence[str] | None) -> LabelMap:
        if not isinstance(raw, dict):
            raise DataError(f"label map {path} must be a mapping with keys 'target_classes' and 'map'")
        unknown = sorted(set(map(str, raw)) - {"target_classes", "map", "palette"})
        if unknown:
            raise DataError(f"label map {path}: unknown key(s) {unknown} (allowed: target_classes, map, palette)")
        classes = target_classes if target_classes is not None else raw.get("target_classes")
        if not isinstance(classes, (list, tuple)) or not classes:
            raise DataError(f"label map {path}: key 'target_classes' must be a non-empty list of class names")
        mapping = raw.get("map")
        if not isinstance(mapping, dict):
            raise DataError(f"label map {path}: key 'map' must be a mapping source id -> target id or name")
        seen: dict[int, Any] = {}
        for key in mapping:
            src = _source_id(key, f"label map {path}: key 'map'")
            if src in seen:
                raise DataError(f"label map {path}: duplicate source id {src} in 'map' (keys {seen[src]!r} and {key!r})")
            seen[src] = key
        palette = raw.get("palette")
        return cls(
            tuple(str(c) for c in classes),
            {k: v for k, v in mapping.items()},
            None if palette is None else _palette(palette, path),
            f"label map {path}",
        )

    @classmethod
    def _from_csv(cls, path: Path, text: str, target_classes: Sequence[str] | None) -> LabelMap:
        rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
        if rows and _as_int(rows[0][0]) is None and rows[0][0].strip().lower() in ("src", "source"):
            header, rows = 1, rows[1:]
        else:
            header = 0
        if not rows:
            raise DataError(f"label map {path} has no entries (expected lines 'src,tgt[,name]')")
        mapping: dict[int, int | str | None] = {}
        names: dict[int, str] = {}
        for n, row in enumerate(rows, start=1 + header):
            where = f"label map {path}: line {n}"
            cells = [c.strip() for c in row]
            if len(cells) not in (2, 3):
                raise DataError(f"{where}: expected 'src,tgt' or 'src,tgt,name', got {row}")
            src = _source_id(cells[0], where)
            if src in mapping:
                raise DataError(f"{where}: duplicate source id {src}")
            tgt: int | str | None
            if cells[1] == "" or cells[1].lower() in ("ignore", "none", "null"):
                tgt = None
            else:
                tgt_int = _as_int(cells[1])
                if tgt_int is None and target_classes is None:
                    raise DataError(f"{where}: target {cells[1]!r} is not an integer id")
                tgt = tgt_int if tgt_int is not None else cells[1]
                if isinstance(tgt, int) and tgt < 0:
                    raise DataError(f"{where}: target id {tgt} out of range (negative)")
            if len(cells) == 3 and cells[2] and isinstance(tgt, int) and tgt != IGNORE_INDEX:
                if names.get(tgt, cells[2]) != cells[2]:
                    raise DataError(f"{where}: target {tgt} named {cells[2]!r}, earlier {names[tgt]!r}")
                names[tgt] = cells[2]
            mapping[src] = tgt
        if target_classes is None:
            ids = [t for t in mapping.values() if isinstance(t, int) and t != IGNORE_INDEX]
            if not ids:
                raise DataError(f"label map {path}: every entry maps to ignore; no target class")
            top = max(ids)
            if top >= MAX_CLASSES:
                raise DataError(f"label map {path}: target id {top} out of range (at most {MAX_CLASSES} classes)")
            target_classes = [names.get(i, f"class{i}") for i in range(top + 1)]
        return cls(tuple(str(c) for c in target_classes), mapping, None, f"label map {path}")


def _unique_pairs(pairs: list[tuple[str, Any]], path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DataError(f"label map {path}: duplicate key {key!r}")
        out[key] = value
    return out


def _palette(value: Any, path: Path) -> np.ndarray:
    try:
        pal = np.asarray(value, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"label map {path}: key 'palette' must be a list of [r, g, b] colours") from None
    if pal.ndim != 2 or pal.shape[1] != 3:
        raise DataError(f"label map {path}: key 'palette' must be a list of [r, g, b] colours")
    return pal
