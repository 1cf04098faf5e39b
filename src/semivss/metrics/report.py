"""One comparison table of several evaluated models (``semivss compare``): val mIoU, VC_n and,
where the evaluation sits inside a training run, the run's training time per iteration relative
to a baseline row. Used for the methods table of issue 4 and the recipe stage table."""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semivss.errors import SemivssError


@dataclass(frozen=True)
class Summary:
    """The scores of one evaluation (a ``metrics.json`` of ``semivss evaluate``)."""

    name: str
    source: Path
    metrics: dict[str, Any]
    s_per_it: float | None = None  # training seconds per iteration of the run it belongs to
    iters: int | None = None  # last logged training step of that run


def training_speed(metrics_csv: Path) -> tuple[float | None, int | None]:
    """``(1 / median it_s, last step)`` over the logged windows of a run's ``metrics.csv``.

    ``it_s`` is measured by the trainer over the compute of each logging window (data waits
    included, evaluation and checkpointing excluded); the median ignores windows slowed by other
    work on the machine. ``(None, None)`` when the file has no ``it_s`` column or rows."""
    try:
        rows = list(csv.DictReader(metrics_csv.open(newline="")))
    except FileNotFoundError:
        return None, None
    rates = [float(r["it_s"]) for r in rows if r.get("it_s")]
    steps = [int(r["step"]) for r in rows if r.get("step")]
    if not rates or not all(v > 0 for v in rates):
        return None, max(steps, default=None)
    return 1.0 / statistics.median(rates), max(steps, default=None)


def load_summary(path: str | Path, name: str | None = None, speed: bool = True) -> Summary:
    """Read a ``metrics.json`` (or a folder holding one). The name defaults to the run folder
    (``<run>/eval-val/metrics.json`` -> ``<run>``); with ``speed`` the training time comes from
    ``<run>/metrics.csv`` (turn it off for evaluations that are not of that run's model)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise SemivssError(f"{path}: no metrics.json (write one with `semivss evaluate ... --out`)")
    try:
        data = json.loads(path.read_text())
        metrics = data["metrics"]
        float(metrics["mIoU"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SemivssError(f"{path}: not a metrics.json of `semivss evaluate` ({type(e).__name__}: {e})") from e
    run = path.resolve().parent.parent
    s_per_it, iters = training_speed(run / "metrics.csv") if speed else (None, None)
    return Summary(name or run.name, path, metrics, s_per_it, iters)


def _pct(v: Any) -> str:
    """Percent with 2 decimals; '-' for a missing or NaN score (e.g. no VC window)."""
    if v is None:
        return "-"
    v = float(v)
    return "-" if math.isnan(v) else f"{100 * v:.2f}"


def _vc_keys(rows: list[Summary]) -> list[str]:
    keys = {k for r in rows for k in r.metrics if k.startswith("VC") and k[2:].isdigit()}
    return sorted(keys, key=lambda k: int(k[2:]))


def comparison_markdown(rows: list[Summary], baseline: str | None = None, per_class: bool = False) -> str:
    """Markdown table: one row per model with mIoU, VC_n and, when any row has a training run,
    iterations, s/it and the time per iteration relative to ``baseline`` (a row name; default
    the first row with a speed). ``per_class`` adds a class x model IoU table."""
    if not rows:
        raise SemivssError("nothing to compare: give at least one metrics.json")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise SemivssError(f"two rows have the same name in {names}; pass --name for each")
    vcs = _vc_keys(rows)
    timed = any(r.s_per_it is not None for r in rows)
    ref: Summary | None = None
    if baseline is not None:
        match = [r for r in rows if r.name == baseline]
        if not match:
            raise SemivssError(f"--baseline {baseline!r} is not one of {names}")
        ref = match[0]
        if ref.s_per_it is None:
            raise SemivssError(f"--baseline {baseline!r} has no training log ({ref.source.parent.parent / 'metrics.csv'})")
    elif timed:
        ref = next(r for r in rows if r.s_per_it is not None)
    head = ["model", "mIoU", *vcs]
    if timed:
        head += ["iterations", "s/it (median)", f"time/it vs {ref.name}" if ref else "time/it"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, _pct(r.metrics.get("mIoU")), *(_pct(r.metrics.get(k)) for k in vcs)]
        if timed:
            if r.s_per_it is None:
                cells += ["-", "-", "-"]
            else:
                rel = f"{r.s_per_it / ref.s_per_it:.2f}x" if ref and ref.s_per_it else "-"
                cells += [str(r.iters) if r.iters is not None else "-", f"{r.s_per_it:.2f}", rel]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    if per_class:
        classes: list[str] = []
        for r in rows:
            classes += [c for c in r.metrics.get("iou", {}) if c not in classes]
        cls_lines = ["| class | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for c in classes:
            cls_lines.append(f"| {c} | " + " | ".join(_pct(r.metrics.get("iou", {}).get(c)) for r in rows) + " |")
        text += "\n\nIoU per class (%):\n\n" + "\n".join(cls_lines)
    return text
