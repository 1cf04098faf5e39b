"""The figures of ``semivss report`` as inline SVG (matplotlib, no display needed): training
curves, per-class IoU bars, offset curves and the normalised confusion matrix. One colour per run
throughout a report."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from semivss.metrics.offset import OffsetTable

__all__ = ["class_bars", "confusion_matrix", "history_panels", "offset_curves", "run_colour", "training_curves"]

_RC: Any = {"svg.fonttype": "none", "svg.hashsalt": "semivss-report", "font.size": 9}
_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#7f7f7f", "#bcbd22"]
_STYLES = ["-", "--", ":", "-."]


def run_colour(i: int) -> str:
    """The colour of the ``i``-th run of a report."""
    return _COLOURS[i % len(_COLOURS)]


def _text(s: str) -> str:
    """A label matplotlib shows literally (no mathtext)."""
    return s.replace("$", r"\$")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasSVG(fig)
    return fig


def _svg(fig: Any, label: str) -> str:
    """The figure as an ``<svg>`` element to put inline in HTML (no XML prolog, no metadata)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)
    label = label.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    return text.replace("<svg", f'<svg class="plot" role="img" aria-label="{label}"', 1)


def history_panels(columns: Sequence[str]) -> list[str]:
    """The order of the training-curve panels: total loss, loss terms, other logged scalars,
    learning rate, iterations/s, then the in-run evaluations (``val/...``)."""
    cols = list(dict.fromkeys(columns))

    def rank(c: str) -> tuple[int, str]:
        if c == "loss":
            return 0, ""
        if c.startswith("loss"):
            return 1, c
        if c.startswith("val/"):
            return 5, ""  # keep the logged order of the evaluation metrics
        return {"lr": 3, "it_s": 4}.get(c, 2), c

    return sorted(cols, key=rank)


_TITLES = {"lr": "learning rate", "it_s": "iterations / s"}


History = dict[str, list[tuple[float, float]]]


def training_curves(histories: Sequence[tuple[int, str, History]]) -> str | None:
    """One panel per logged column of ``metrics.csv`` (every loss term, lr, it/s, ``val/*``),
    one line per run (``(colour index, name, history)``); None when nothing was logged."""
    columns = history_panels([c for _, _, h in histories for c, pts in h.items()
                              if any(math.isfinite(v) for _, v in pts)])  # e.g. VC16 of short videos: all NaN
    if not columns:
        return None
    ncols = min(3, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    fig = _figure(4.0 * ncols, 2.6 * nrows + (0.4 if len(histories) > 1 else 0))
    for k, col in enumerate(columns):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        for i, name, hist in histories:
            points = hist.get(col)
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            marker = "o" if col.startswith("val/") or len(points) < 3 else None
            ax.plot(xs, ys, color=run_colour(i), marker=marker, markersize=3, linewidth=1.2, label=_text(name))
        title = _TITLES.get(col, col[4:] + " (in-run evaluation)" if col.startswith("val/") else col)
        ax.set_title(_text(title))
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if col == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if len(histories) > 1:
        handles = [fig.axes[0].plot([], [], color=run_colour(i))[0] for i, _, _ in histories]
        fig.legend(handles, [_text(n) for _, n, _ in histories], loc="upper center",
                   ncol=min(len(histories), 5), frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    else:
        fig.tight_layout()
    return _svg(fig, "training curves")


def class_bars(runs: Sequence[tuple[int, str, dict[str, Any]]], classes: Sequence[str]) -> str:
    """Horizontal IoU (%) bars per class, grouped by run (``(colour index, name, {class: IoU})``)."""
    n = max(len(runs), 1)
    height = max(2.0, 0.22 * len(classes) * (1 + 0.6 * (n - 1)) + 0.9)
    fig = _figure(7.5, height)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(classes), dtype=np.float64)
    bar = 0.8 / n
    for k, (i, name, iou) in enumerate(runs):
        vals = [100 * float(iou[c]) if iou.get(c) is not None else np.nan for c in classes]
        ax.barh(y - 0.4 + bar * (k + 0.5), vals, height=bar, color=run_colour(i), label=_text(name))
    ax.set_yticks(y)
    ax.set_yticklabels([_text(c) for c in classes])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.grid(True, axis="x", alpha=0.3)
    if n > 1:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _svg(fig, "IoU per class")


def offset_curves(tables: Sequence[tuple[int, str, OffsetTable]]) -> str | None:
    """mIoU (%) by signed offset from the labeled frame: one colour per run (``(colour index,
    name, table)``), one line style per subset (train / held-out videos); None without rows."""
    if not any(t.rows for _, _, t in tables):
        return None
    fig = _figure(7.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    subsets = list(dict.fromkeys(s for _, _, t in tables for _, s in t.groups()))
    for i, name, table in tables:
        for model, subset in table.groups():
            rows = [r for r in table.rows if r.model == model and r.subset == subset]
            label = f"{name} / {subset}" if len(tables) > 1 else subset
            ax.plot([r.offset for r in rows], [100 * r.mIoU for r in rows], color=run_colour(i),
                    linestyle=_STYLES[subsets.index(subset) % len(_STYLES)], marker="o", markersize=3,
                    label=_text(label))
    ax.axvline(0, color="0.7", linewidth=0.8, zorder=0)
    ax.set_xlabel("signed offset from the nearest labeled frame (frames)")
    ax.set_ylabel("mIoU (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _svg(fig, "mIoU by offset from the labeled frame")


def confusion_matrix(classes: Sequence[str], matrix: np.ndarray, title: str = "") -> str:
    """The confusion matrix normalised per ground-truth row (each row: where that class's pixels
    went), values written in the cells for up to 20 classes."""
    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    c = len(classes)
    side = min(max(4.5, 0.42 * c + 2.2), 30.0)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    ax.set_xticklabels([_text(x) for x in classes], rotation=60, ha="right", fontsize=8)
    ax.set_yticklabels([_text(x) for x in classes], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    if title:
        ax.set_title(_text(title))
    if c <= 20:
        for r in range(c):
            for k in range(c):
                if norm[r, k] >= 0.005:
                    ax.text(k, r, f"{norm[r, k]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if norm[r, k] > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the ground-truth pixels")
    fig.tight_layout()
    return _svg(fig, "normalised confusion matrix")
