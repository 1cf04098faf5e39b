"""What a report shows of one training run or evaluation folder, read from its files:
``config.yaml`` and ``metrics.csv`` of the run (:mod:`semivss.engine`), ``metrics.json``,
``offsets.json`` and ``stills/`` of the evaluation (``semivss evaluate``), ``overlay.mp4`` of
``semivss predict``."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semivss.errors import DataError, SemivssError
from semivss.metrics.offset import OffsetTable
from semivss.metrics.report import Summary, load_summary

__all__ = ["Source", "Still", "find_evals", "load_source", "read_history"]

RUN_FILES = ("config.yaml", "metrics.csv")


@dataclass(frozen=True)
class Still:
    """One still written by ``semivss evaluate --save-stills`` (image | GT | prediction | errors)."""

    path: Path
    video: str
    index: int
    pixel_acc: float | None


@dataclass
class Source:
    """One column of a report: a training run and / or one of its evaluations."""

    name: str
    given: Path
    run: Path | None = None
    eval_dir: Path | None = None
    other_evals: list[Path] = field(default_factory=list)
    config_text: str | None = None
    history: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    summary: Summary | None = None
    class_names: list[str] = field(default_factory=list)
    confusion: np.ndarray | None = None
    offsets: OffsetTable | None = None
    stills: list[Still] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        """The ``metrics`` of ``metrics.json`` (empty without an evaluation)."""
        return self.summary.metrics if self.summary is not None else {}


def _is_run(path: Path) -> bool:
    return any((path / f).is_file() for f in RUN_FILES)


def find_evals(run: Path) -> list[Path]:
    """The evaluation folders ``<run>/eval-*`` holding a ``metrics.json``; ``eval-val`` first."""
    found = sorted(p.parent for p in run.glob("eval-*/metrics.json"))
    return sorted(found, key=lambda p: p.name != "eval-val")


def read_history(metrics_csv: Path) -> dict[str, list[tuple[float, float]]]:
    """Every logged column of a run's ``metrics.csv`` as ``(step, value)`` points (empty and
    non-numeric cells are left out; ``val/<metric>`` columns are the in-run evaluations)."""
    try:
        with metrics_csv.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return {}
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{metrics_csv}: cannot read the training log ({exc})") from exc
    history: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        try:
            step = float(row.get("step") or "nan")
        except ValueError:
            continue
        if math.isnan(step):
            continue
        for key, text in row.items():
            if key in (None, "step") or not text:
                continue
            try:
                value = float(text)
            except (TypeError, ValueError):
                continue
            history.setdefault(str(key), []).append((step, value))
    return history


def _confusion(data: dict[str, Any], n: int, where: Path) -> np.ndarray | None:
    raw = data.get("confusion_matrix")
    if raw is None:
        return None
    try:
        mat = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: confusion_matrix is not a matrix of numbers ({exc})") from exc
    if mat.shape != (n, n):
        raise DataError(f"{where}: confusion_matrix has shape {mat.shape}, expected ({n}, {n})")
    return mat


def _stills(eval_dir: Path) -> list[Still]:
    index = eval_dir / "stills" / "stills.json"
    if not index.is_file():
        return []
    try:
        entries = json.loads(index.read_text())["stills"]
        stills = [Still(eval_dir / "stills" / str(e["file"]), str(e["video"]), int(e["index"]),
                        None if e.get("pixel_acc") is None else float(e["pixel_acc"])) for e in entries]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{index}: not a stills index of `semivss evaluate --save-stills` ({exc})") from exc
    return [s for s in stills if s.path.is_file()]


def _videos(*folders: Path | None) -> list[Path]:
    """``overlay.mp4`` files in the folders and their direct subfolders (``predict-*``)."""
    found: list[Path] = []
    for folder in folders:
        if folder is None:
            continue
        for mp4 in [folder / "overlay.mp4", *sorted(folder.glob("*/overlay.mp4"))]:
            if mp4.is_file() and mp4.resolve() not in {p.resolve() for p in found}:
                found.append(mp4)
    return found


def load_source(path: str | Path, name: str | None = None) -> Source:
    """Read a training run folder (``config.yaml``, ``metrics.csv``, ``eval-*/metrics.json``;
    the report shows ``eval-val`` or else the first evaluation) or an evaluation folder
    (``metrics.json``, maybe ``offsets.json``, inside a run or not). A ``metrics.json`` file
    stands for its folder. SemivssError when there is nothing to report."""
    given = Path(path)
    if not given.exists():
        raise SemivssError(f"{given}: no such folder (give a training run or an evaluation folder)")
    folder = given.parent if given.is_file() and given.name == "metrics.json" else given
    if not folder.is_dir():
        raise SemivssError(f"{given}: not a folder (give a training run or an evaluation folder)")
    run: Path | None
    evals: list[Path]
    if (folder / "metrics.json").is_file():
        evals = [folder]
        run = folder.parent if _is_run(folder.parent) else None
    elif _is_run(folder):
        run, evals = folder, find_evals(folder)
    else:
        raise SemivssError(f"{folder}: nothing to report (no metrics.json, config.yaml or metrics.csv; give a "
                           "training run or an evaluation folder)")
    eval_dir = evals[0] if evals else None
    label = name or (run.name if run is not None else folder.name)
    src = Source(label, given, run=run, eval_dir=eval_dir, other_evals=evals[1:])
    if run is not None:
        cfg = run / "config.yaml"
        src.config_text = cfg.read_text() if cfg.is_file() else None
        src.history = read_history(run / "metrics.csv")
    if eval_dir is not None:
        src.summary = load_summary(eval_dir, label, speed=run is not None)
        data = json.loads((eval_dir / "metrics.json").read_text())
        names = data.get("class_names") or list(src.summary.metrics.get("iou") or {})
        src.class_names = [str(c) for c in names]
        src.confusion = _confusion(data, len(src.class_names), eval_dir / "metrics.json")
        if (eval_dir / "offsets.json").is_file():
            src.offsets = OffsetTable.from_json(eval_dir / "offsets.json")
        src.stills = _stills(eval_dir)
    src.videos = _videos(eval_dir, run)
    return src
