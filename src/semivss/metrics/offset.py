"""Inner-video offset analysis (IFR paper, Table 2; docs/methods.md#10-inner-video-overfitting).

Every annotated frame is scored and grouped by its signed offset (in frame positions) from the
nearest labeled frame of its video; per offset the confusion matrices of its frames are pooled and
the mIoU (mean over classes present in the ground truth, Eq. (MET-2)) is reported, separately
per subset ("train videos", "held-out videos") and per model. The offsets themselves come from
``semivss.data.splits.nearest_labeled_offset``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from rich.table import Table

from semivss.errors import DataError
from semivss.metrics.confusion import ConfusionMatrix, metrics_from_matrix

K = TypeVar("K", bound=Hashable)

__all__ = [
    "OffsetRow",
    "OffsetTable",
    "offset_table",
    "merge_tables",
    "offset_table_text",
    "plot_offsets",
    "save_offset_tables",
]


@dataclass(frozen=True)
class OffsetRow:
    """mIoU of the frames of one (model, subset) at one signed offset."""

    model: str | None
    subset: str
    offset: int
    mIoU: float
    n_frames: int
    n_pixels: int


def _sort_key(r: OffsetRow) -> tuple[str, str, int]:
    return (r.model or "", r.subset, r.offset)


class OffsetTable:
    """Rows of (model, subset, offset) -> mIoU and frame count, with text/JSON/CSV export."""

    def __init__(self, rows: Iterable[OffsetRow] = ()) -> None:
        self.rows: list[OffsetRow] = sorted(rows, key=_sort_key)

    def __add__(self, other: OffsetTable) -> OffsetTable:
        return OffsetTable([*self.rows, *other.rows])

    def __len__(self) -> int:
        return len(self.rows)

    def groups(self) -> list[tuple[str | None, str]]:
        """The (model, subset) pairs in order of first appearance in the sorted rows."""
        seen: dict[tuple[str | None, str], None] = {}
        for r in self.rows:
            seen.setdefault((r.model, r.subset), None)
        return list(seen)

    def offsets(self) -> list[int]:
        return sorted({r.offset for r in self.rows})

    def get(self, offset: int, subset: str, model: str | None = None) -> OffsetRow | None:
        for r in self.rows:
            if r.offset == offset and r.subset == subset and r.model == model:
                return r
        return None

    # ------------------------------------------------------------------ export
    def to_dicts(self) -> list[dict[str, Any]]:
        return [
            {**asdict(r), "mIoU": None if math.isnan(r.mIoU) else r.mIoU} for r in self.rows
        ]

    def to_json(self, path: str | Path) -> Path:
        """Write the rows as a JSON list of objects."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dicts(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> OffsetTable:
        """Read a table written by :meth:`to_json`."""
        path = Path(path)
        try:
            items = json.loads(path.read_text())
            if not isinstance(items, list):
                raise ValueError("expected a JSON list of rows")
            rows = [
                OffsetRow(
                    model=d["model"],
                    subset=str(d["subset"]),
                    offset=int(d["offset"]),
                    mIoU=math.nan if d["mIoU"] is None else float(d["mIoU"]),
                    n_frames=int(d["n_frames"]),
                    n_pixels=int(d["n_pixels"]),
                )
                for d in items
            ]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not an offset table JSON ({e})") from e
        return cls(rows)

    def to_csv(self, path: str | Path) -> Path:
        """Write ``model,subset,offset,mIoU,n_frames,n_pixels`` rows."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "subset", "offset", "mIoU", "n_frames", "n_pixels"])
            for r in self.rows:
                miou = "" if math.isnan(r.mIoU) else f"{r.mIoU:.6f}"
                w.writerow([r.model or "", r.subset, r.offset, miou, r.n_frames, r.n_pixels])
        return path

    def _pivot(self) -> tuple[list[str], list[list[str]]]:
        groups = self.groups()
        header = ["offset"] + [f"{m} / {s}" if m else s for m, s in groups]
        index = {(r.model, r.subset, r.offset): r for r in self.rows}
        body = []
        for off in self.offsets():
            line = [f"{off:+d}" if off else "0"]
            for m, s in groups:
                r = index.get((m, s, off))
                if r is None:
                    line.append("-")
                elif math.isnan(r.mIoU):
                    line.append(f"nan ({r.n_frames})")
                else:
                    line.append(f"{100 * r.mIoU:.2f} ({r.n_frames})")
            body.append(line)
        return header, body

    def text(self) -> str:
        """Plain-text pivot: one row per offset, one column per (model, subset): mIoU% (frames)."""
        header, body = self._pivot()
        widths = [max(len(x) for x in col) for col in zip(header, *body)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in body]
        return "\n".join(lines)

    def rich_table(self, title: str = "mIoU (%) by offset from the nearest labeled frame") -> Table:
        """The same pivot as :meth:`text` as a ``rich.table.Table``."""
        header, body = self._pivot()
        t = Table(title=title)
        for h in header:
            t.add_column(h, justify="right")
        for line in body:
            t.add_row(*line)
        return t

    def __repr__(self) -> str:
        return f"OffsetTable({len(self.rows)} rows, groups={self.groups()})"


def _frame_matrix(
    value: Any, num_classes: int | None, ignore_index: int, key: object
) -> np.ndarray:
    if isinstance(value, ConfusionMatrix):
        return value.raw
    if isinstance(value, tuple) and len(value) == 2:
        if num_classes is None:
            raise ValueError("num_classes is required when frames are given as (pred, gt) pairs")
        cm = ConfusionMatrix(num_classes, ignore_index)
        cm.update(value[0], value[1])
        return cm.raw
    m = value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if m.ndim != 2 or m.shape[1] not in (m.shape[0], m.shape[0] + 1):
        raise DataError(f"frame {key}: confusion matrix of shape {m.shape} is not (C, C)")
    if m.shape[1] == m.shape[0]:
        m = np.concatenate([m, np.zeros((m.shape[0], 1), dtype=m.dtype)], axis=1)
    return m.astype(np.int64)


def offset_table(
    frames: Mapping[K, Any],
    offsets: Mapping[K, int],
    subset: str | Mapping[K, str] = "all",
    model: str | None = None,
    num_classes: int | None = None,
    ignore_index: int = 255,
    absolute: bool = False,
) -> OffsetTable:
    """Pool per-frame confusion matrices by signed offset and score each pool (Eq. (OFF-2)).

    ``frames`` maps a frame key (e.g. ``FrameRef``) to a ``ConfusionMatrix``, a (C, C) / (C, C+1)
    count matrix, or a ``(pred, gt)`` pair (then ``num_classes`` is required). Frames without an
    entry in ``offsets`` are left out. ``subset`` names the group of every frame, or maps each
    frame to its group. ``absolute`` folds offsets to their absolute value.
    """
    pools: dict[tuple[str, int], list[Any]] = {}
    for key, value in frames.items():
        if key not in offsets:
            continue
        off = int(offsets[key])
        if absolute:
            off = abs(off)
        if isinstance(subset, str):
            name = subset
        else:
            if key not in subset:
                raise DataError(f"frame {key} has an offset but no subset name")
            name = subset[key]
        m = _frame_matrix(value, num_classes, ignore_index, key)
        pool = pools.setdefault((name, off), [None, 0])
        if pool[0] is not None and pool[0].shape != m.shape:
            raise DataError(
                f"frame {key}: confusion matrix {m.shape} differs from {pool[0].shape} of the "
                "other frames"
            )
        pool[0] = m if pool[0] is None else pool[0] + m
        pool[1] += 1
    rows = []
    for (name, off), (mat, count) in pools.items():
        res = metrics_from_matrix(mat)
        rows.append(OffsetRow(model, name, off, res["mIoU"], count, res["n_pixels"]))
    return OffsetTable(rows)


Tables = OffsetTable | Sequence[OffsetTable] | Mapping[str, OffsetTable]


def merge_tables(tables: Tables) -> OffsetTable:
    """One table from a table, a list of tables, or ``{subset label: table}``.

    With a mapping, the key replaces the subset name of every row of its table (so a table computed
    with the default subset can be labelled "train videos" / "held-out videos" afterwards).
    """
    if isinstance(tables, OffsetTable):
        return tables
    if isinstance(tables, Mapping):
        rows = [
            OffsetRow(r.model, str(label), r.offset, r.mIoU, r.n_frames, r.n_pixels)
            for label, t in tables.items()
            for r in t.rows
        ]
        return OffsetTable(rows)
    out = OffsetTable()
    for t in tables:
        out = out + t
    return out


def offset_table_text(tables: Tables) -> str:
    """Plain-text pivot of one or several tables (see :meth:`OffsetTable.text`)."""
    return merge_tables(tables).text()


def save_offset_tables(tables: Tables, path: str | Path) -> tuple[Path, Path]:
    """Write the merged rows as JSON at ``path`` and as CSV beside it (same stem, ``.csv``)."""
    table = merge_tables(tables)
    path = Path(path)
    return table.to_json(path), table.to_csv(path.with_suffix(".csv"))


def plot_offsets(
    tables: Tables,
    path: str | Path,
    title: str = "mIoU by offset from the nearest labeled frame",
) -> Path:
    """Line plot of mIoU (%) vs signed offset, one line per (model, subset); writes a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = merge_tables(tables)
    if not table.rows:
        raise DataError(f"{path}: nothing to plot, the offset table is empty")
    fig = Figure(figsize=(7.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for m, s in table.groups():
        rows = [r for r in table.rows if r.model == m and r.subset == s]
        xs = [r.offset for r in rows]
        ys = [100 * r.mIoU for r in rows]
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{m} / {s}" if m else s)
    ax.set_xlabel("signed offset from the nearest labeled frame (frames)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    ax.axvline(0, color="0.7", linewidth=0.8, zorder=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
