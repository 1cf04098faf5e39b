"""``semivss report``: one self-contained HTML file of one run or several runs side by side.

No network: styles inline, figures inline SVG (:mod:`semivss.report.plots`), stills as base64
PNG, no scripts; a Content-Security-Policy forbids loading anything else. Every piece of text
from the runs is escaped. With several runs the first is the baseline: differences are coloured
green (better) or red (worse)."""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import os
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from semivss.engine.checkpoint import atomic_write
from semivss.errors import SemivssError
from semivss.inference.writers import check_new_output
from semivss.metrics.report import _pct, _vc_keys
from semivss.report import plots
from semivss.report.sources import Source, Still, load_source

__all__ = ["render_report", "write_report"]

Log = Callable[[str], None]

METRICS = (("mIoU", "mIoU"), ("fwIoU", "fwIoU"), ("pixel_acc", "pixel acc"), ("mAcc", "mAcc"))
STILL_WIDTH = 1600  # stills wider than this are shrunk for the report

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1240px;
 padding:16px 24px;color:#222;background:#fff;line-height:1.4}
h1{font-size:1.6em;margin:.2em 0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{margin-bottom:.3em}.meta{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td.name,th.name{text-align:left}tr.baseline td{background:#fafafa}
.better{color:#0a7a2f;background:#e6f6ea}.worse{color:#b3141b;background:#fdeaea}
.delta{font-size:.85em;margin-left:.3em}.note{color:#777;font-style:italic}
svg.plot{max-width:100%;height:auto;display:block;margin:.4em 0}
figure{margin:.8em 0}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figure img.small{image-rendering:pixelated}
figcaption{font-size:.88em;color:#555}
details{margin:.6em 0}summary{cursor:pointer;font-weight:600}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:8px;overflow:auto;font-size:.85em}
.swatch{display:inline-block;width:.9em;height:.9em;border-radius:2px;margin-right:.3em;vertical-align:-.1em}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: Any) -> float | None:
    """A finite float, or None for a missing / NaN value."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _cell(value: Any, ref: Any = None, baseline: bool = True, higher_better: bool = True,
          percent: bool = True, digits: int = 2) -> str:
    """A ``<td>`` with the value (``data-value`` holds it unrounded) and, on rows after the
    baseline, its difference to ``ref``: class ``better`` / ``worse`` / ``same``."""
    v = _num(value)
    if v is None:
        return '<td class="na">-</td>'
    shown = _pct(v) if percent else f"{v:.{digits}f}"
    r = _num(ref)
    if baseline or r is None:
        return f'<td data-value="{v!r}">{shown}</td>'
    scale = 100.0 if percent else 1.0
    d = round(scale * (v - r), digits)
    kind = "same" if d == 0 else ("better" if (d > 0) == higher_better else "worse")
    return (f'<td class="{kind}" data-value="{v!r}">{shown}'
            f'<span class="delta">({d:+.{digits}f})</span></td>')


def _name_cell(i: int, name: str) -> str:
    return (f'<td class="name"><span class="swatch" style="background:{plots.run_colour(i)}"></span>'
            f"{_esc(name)}</td>")


def _metrics_table(sources: Sequence[Source]) -> str:
    rows = [s for s in sources if s.summary is not None]
    if not rows:
        return '<p class="note">No evaluation yet (run <code>semivss evaluate</code>).</p>'
    summaries = [s.summary for s in rows if s.summary is not None]
    keys = [*METRICS, *((k, k) for k in _vc_keys(summaries))]
    keys = [(k, label) for k, label in keys if any(_num(m.metrics.get(k)) is not None for m in summaries)]
    timed = any(m.s_per_it is not None for m in summaries)
    head = ["run", *(label for _, label in keys), "frames"] + (["iterations", "s/it"] if timed else [])
    out = ['<table id="metrics-table" class="metrics"><thead><tr>']
    out += [f'<th class="{"name" if h == "run" else "metric"}">{_esc(h)}</th>' for h in head]
    out.append("</tr></thead><tbody>")
    ref = summaries[0]
    for j, src in enumerate(rows):
        m = summaries[j]
        first = j == 0
        out.append(f'<tr class="{"baseline" if first else "compared"}">{_name_cell(sources.index(src), src.name)}')
        out += [_cell(m.metrics.get(k), ref.metrics.get(k), first) for k, _ in keys]
        out.append(f"<td>{_esc(m.metrics.get('n_frames', '-'))}</td>")
        if timed:
            out.append(f"<td>{_esc(m.iters if m.iters is not None else '-')}</td>")
            out.append(_cell(m.s_per_it, ref.s_per_it, first, higher_better=False, percent=False))
        out.append("</tr>")
    out.append("</tbody></table>")
    if len(rows) > 1:
        out.append(f'<p class="meta">Differences to <b>{_esc(rows[0].name)}</b> in points (s/it: seconds); '
                   'green better, red worse.</p>')
    return "".join(out)


def _classes(sources: Sequence[Source]) -> list[str]:
    names: list[str] = []
    for s in sources:
        names += [c for c in (s.class_names or list(s.metrics.get("iou") or {})) if c not in names]
    return names


def _class_table(sources: Sequence[Source], classes: list[str]) -> str:
    rows = [s for s in sources if s.summary is not None]
    single = len(rows) == 1
    head = ["class"] + (["IoU %", "Acc %"] if single else [f"{s.name} IoU %" for s in rows])
    out = ['<table id="class-table" class="per-class"><thead><tr>']
    out += [f'<th class="{"name" if h == "class" else "metric"}">{_esc(h)}</th>' for h in head]
    out.append("</tr></thead><tbody>")
    for c in classes:
        out.append(f'<tr data-class="{_esc(c)}"><td class="name">{_esc(c)}</td>')
        if single:
            m = rows[0].metrics
            out.append(_cell((m.get("iou") or {}).get(c)))
            out.append(_cell((m.get("class_acc") or {}).get(c)))
        else:
            ref = (rows[0].metrics.get("iou") or {}).get(c)
            out += [_cell((s.metrics.get("iou") or {}).get(c), ref, j == 0) for j, s in enumerate(rows)]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _png_data(path: Path, max_width: int = STILL_WIDTH) -> tuple[str, int]:
    """``data:`` URI of the image at ``path`` as PNG, shrunk to ``max_width`` pixels, and its
    width."""
    from PIL import Image

    with Image.open(path) as im:
        img = im.convert("RGB")
    if img.width > max_width:
        img = img.resize((max_width, max(1, round(img.height * max_width / img.width))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), img.width


def _still(still: Still) -> str:
    acc = f", pixel accuracy {_pct(still.pixel_acc)} %" if still.pixel_acc is not None else ""
    alt = f"{still.video} frame {still.index}: image, ground truth, prediction, errors"
    data, width = _png_data(still.path)
    # small stills (synthetic data) are shown enlarged, pixels kept sharp
    cls = f' class="small" width="{min(3 * width, 1200)}"' if width < 600 else ""
    return (f'<figure class="still"><img src="{data}"{cls} alt="{_esc(alt)}">'
            f"<figcaption>{_esc(still.video)} frame {still.index}{_esc(acc)} &mdash; image | ground truth | "
            "prediction | errors (red: wrong, black: void)</figcaption></figure>")


def _href(target: Path, report_dir: Path) -> str:
    rel = os.path.relpath(target.resolve(), report_dir.resolve())
    return _esc(urllib.parse.quote(Path(rel).as_posix()))


def _run_section(i: int, src: Source, report_dir: Path, several: bool, log: Log) -> str:
    """What belongs to one run alone: where it is, confusion matrix, stills, videos, config."""
    out = [f'<section class="run" id="run-{i}">']
    if several:
        out.append(f'<h2><span class="swatch" style="background:{plots.run_colour(i)}"></span>{_esc(src.name)}</h2>')
    where = [f"run <code>{_esc(src.run)}</code>" if src.run else "",
             f"evaluation <code>{_esc(src.eval_dir)}</code>" if src.eval_dir else ""]
    out.append(f'<p class="meta">{" &middot; ".join(w for w in where if w)}</p>')
    if src.other_evals:
        others = ", ".join(f"<code>{_esc(p.name)}</code>" for p in src.other_evals)
        out.append(f'<p class="meta">Other evaluations of this run (not shown): {others}</p>')
    if src.eval_dir is not None:
        out.append('<h3>Confusion matrix</h3>')
        if src.confusion is not None:
            log(f"report: confusion matrix of {src.name}")
            out.append(f'<div class="confusion">{plots.confusion_matrix(src.class_names, src.confusion)}</div>')
            out.append('<p class="meta">Rows: ground-truth class, normalised to 1; columns: predicted class.</p>')
        else:
            out.append('<p class="note">metrics.json holds no confusion matrix (written by '
                       '<code>semivss evaluate</code> of a later version; evaluate again to see it).</p>')
        out.append("<h3>Stills</h3>")
        if src.stills:
            log(f"report: {len(src.stills)} stills of {src.name}")
            out.append('<div class="stills">' + "".join(_still(s) for s in src.stills) + "</div>")
        else:
            out.append('<p class="note">No stills saved (<code>semivss evaluate ... --save-stills 4</code> '
                       "writes some).</p>")
    if src.videos:
        out.append("<h3>Overlay video</h3><ul class=\"videos\">")
        out += [f'<li><a href="{_href(v, report_dir)}">{_esc(v.parent.name)}/{_esc(v.name)}</a></li>'
                for v in src.videos]
        out.append("</ul>")
    if src.config_text is not None:
        out.append(f'<details class="config"><summary>config.yaml of {_esc(src.name)}</summary>'
                   f"<pre>{_esc(src.config_text)}</pre></details>")
    out.append("</section>")
    return "".join(out)


def render_report(sources: Sequence[Source], report_dir: Path, log: Log | None = None) -> str:
    """The HTML text of the report of ``sources`` (links relative to ``report_dir``)."""
    say: Log = log or (lambda _msg: None)
    names = [s.name for s in sources]
    several = len(sources) > 1
    title = "semivss report: " + (" vs ".join(names) if several else names[0])
    from semivss import __version__

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = [f"<h1>{_esc(title)}</h1>",
            f'<p class="meta">Written {_esc(stamp)} by semivss {_esc(__version__)}'
            + (f"; baseline: <b>{_esc(names[0])}</b>" if several else "") + ".</p>"]
    body.append('<section id="metrics"><h2>Metrics</h2>' + _metrics_table(sources) + "</section>")
    classes = _classes(sources)
    evaluated = [s for s in sources if s.summary is not None]
    if classes and evaluated:
        say("report: per-class IoU")
        bars = plots.class_bars([(i, s.name, s.metrics.get("iou") or {}) for i, s in enumerate(sources)
                                 if s.summary is not None], classes)
        body.append(f'<section id="per-class"><h2>IoU per class</h2>{bars}{_class_table(sources, classes)}</section>')
    say("report: training curves")
    curves = plots.training_curves([(i, s.name, s.history) for i, s in enumerate(sources) if s.history])
    body.append('<section id="training"><h2>Training curves</h2>'
                + (curves or '<p class="note">No training log (metrics.csv).</p>') + "</section>")
    tables = [(i, s.name, s.offsets) for i, s in enumerate(sources) if s.offsets is not None]
    if tables:
        say("report: offset curves")
        svg = plots.offset_curves(tables)
        if svg:
            body.append('<section id="offsets"><h2>mIoU by offset from the labeled frame</h2>' + svg
                        + '<p class="meta">Offset 0 is the labeled frame; train videos vs held-out videos '
                          "shows inner-video overfitting.</p></section>")
    for i, src in enumerate(sources):
        body.append(_run_section(i, src, report_dir, several, say))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(paths: Sequence[str | Path], out: str | Path, names: Sequence[str] | None = None,
                 overwrite: bool = False, log: Log | None = None) -> Path:
    """Read the runs / evaluation folders ``paths`` and write their report to ``out``
    (atomically; an existing file only with ``overwrite``). SemivssError on bad inputs."""
    out = Path(out)
    say: Log = log or (lambda _msg: None)
    if not paths:
        raise SemivssError("nothing to report: give at least one run or evaluation folder")
    if names and len(names) != len(paths):
        raise SemivssError(f"--name given {len(names)} times for {len(paths)} runs")
    if out.is_dir():
        raise SemivssError(f"--out {out} is a folder; give the HTML file to write (e.g. {out / 'report.html'})")
    check_new_output(out, overwrite)
    sources = []
    for i, p in enumerate(paths):
        say(f"report: reading {p}")
        sources.append(load_source(p, names[i] if names else None))
    labels = [s.name for s in sources]
    if len(set(labels)) != len(labels):
        raise SemivssError(f"two runs have the same name in {labels}; pass --name for each")
    text = render_report(sources, out.parent, say)
    atomic_write(out, lambda f: f.write(text.encode("utf-8")))
    return out
