"""Published results as data: one JSON record per benchmark row under ``results/``.

A record holds what a figure needs to be trusted and compared: the row name, the run's resolved
config (and its hash), the git commit, the machine, dataset / split / resolution / iterations,
the metrics, the per-class IoU and the training time per iteration. ``semivss results add``
writes records from an evaluated run; ``semivss results table`` prints the markdown tables the
README and docs/results.md show.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from semivss.errors import SemivssError
from semivss.metrics.report import training_speed

__all__ = ["git_commit", "load_records", "machine_info", "update_tables", "make_record", "results_markdown", "write_record"]

RECORD_VERSION = 1


def git_commit(cwd: Path) -> str | None:
    """``<sha>`` of HEAD (``<sha>-dirty`` with uncommitted changes), None outside a repository."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def machine_info() -> dict[str, Any]:
    """CPU model, native bf16 support, core count, torch version and the accelerator if any."""
    import os

    import torch

    cpu, flags = platform.processor() or platform.machine(), []
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
        flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def file_sha256(path: Path) -> str | None:
    """Hash of a weights file (None when it is not there), to tell which model a row started from."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors_sha256(path: Path) -> str | None:
    """Hash of a safetensors file's tensors (names, dtypes, shapes and values in name order),
    blind to its header metadata: two exports of the same weights with different configs in
    their headers hash alike. None when the file is not there or not a safetensors file."""
    if not path.is_file():
        return None
    import torch
    from safetensors import SafetensorError, safe_open

    digest = hashlib.sha256()
    try:
        with safe_open(str(path), "pt") as f:
            for key in sorted(f.keys()):
                t = f.get_tensor(key)
                digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
                digest.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    except (SafetensorError, OSError, TypeError, ValueError):
        return None
    return digest.hexdigest()


def start_identity(record: dict[str, Any]) -> str | None:
    """Which weights a row started from: the tensors' hash when the record has it, else the file's."""
    return record.get("init_from_tensors_sha256") or record.get("init_from_sha256")


def _trained_at(run: Path) -> list[dict[str, Any]] | None:
    """The commits and machines the run was started / resumed on (``provenance.jsonl``)."""
    path = run / "provenance.jsonl"
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_record(run: str | Path, eval_dir: str | Path | None = None, name: str | None = None,
                protocol: str | None = None, notes: str | None = None) -> dict[str, Any]:
    """The record of one evaluated training run: ``run`` holds ``config.yaml`` and
    ``metrics.csv``; ``eval_dir`` (default ``<run>/eval-val``) the ``metrics.json`` of
    ``semivss evaluate``."""
    run = Path(run)
    eval_dir = Path(eval_dir) if eval_dir is not None else run / "eval-val"
    metrics_path = eval_dir / "metrics.json"
    cfg_path = run / "config.yaml"
    for p in (metrics_path, cfg_path):
        if not p.is_file():
            raise SemivssError(f"{p}: missing (a record needs a finished, evaluated run)")
    try:
        data = json.loads(metrics_path.read_text())
        metrics = data["metrics"]
        cfg = yaml.safe_load(cfg_path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise SemivssError(f"{eval_dir}: cannot read the evaluation or config ({exc})") from exc
    s_per_it, last_step = training_speed(run / "metrics.csv")
    eval_cfg = (cfg.get("eval") or {})
    scalars = {k: metrics.get(k) for k in ("mIoU", "fwIoU", "pixel_acc", "mAcc")}
    scalars.update({k: v for k, v in metrics.items() if k.startswith("VC") and k[2:].isdigit()})
    canonical = json.dumps(cfg, sort_keys=True, default=str)
    init_from = (cfg.get("model") or {}).get("init_from")
    return {
        "version": RECORD_VERSION,
        "name": name or run.name,
        "protocol": protocol,
        "run": str(run),
        "method": (cfg.get("method") or {}).get("name"),
        "config": cfg,
        "config_hash": hashlib.sha256(canonical.encode()).hexdigest()[:16],
        "commit": git_commit(Path.cwd()),
        "trained_at": _trained_at(run),
        "machine": machine_info(),
        "dataset": {"format": (cfg.get("data") or {}).get("format"),
                    "root": str((cfg.get("data") or {}).get("root")),
                    "split": (cfg.get("data") or {}).get("split")},
        "eval_split": data.get("split", "val"),
        "resolution": eval_cfg.get("size"),
        "iterations": (cfg.get("schedule") or {}).get("iters"),
        "logged_steps": last_step,
        "metrics": scalars,
        "iou": dict(metrics.get("iou") or {}),
        "n_frames": metrics.get("n_frames"),
        "s_per_it": s_per_it,
        "weights_sha256": file_sha256(run / "model.safetensors"),
        "init_from_sha256": file_sha256(Path(init_from)) if init_from else None,
        "init_from_tensors_sha256": tensors_sha256(Path(init_from)) if init_from else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "notes": notes,
    }


def write_record(record: dict[str, Any], path: str | Path, overwrite: bool = False) -> Path:
    """Write ``record`` as JSON atomically; an existing file is kept unless ``overwrite``."""
    from semivss.engine.checkpoint import atomic_write
    from semivss.inference.writers import check_new_output

    path = check_new_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, sort_keys=False, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def load_records(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Records from JSON files or folders of them (sorted by file name within a folder)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not files:
        raise SemivssError(f"no result records in {[str(p) for p in paths]}")
    out = []
    for f in files:
        try:
            rec = json.loads(f.read_text())
            float(rec["metrics"]["mIoU"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise SemivssError(f"{f}: not a result record ({type(exc).__name__}: {exc})") from exc
        out.append(rec)
    return out


def _pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * float(v):.2f}"


def results_markdown(records: list[dict[str, Any]], baseline: str | None = None,
                     per_class: bool = True) -> str:
    """Markdown: one row per record (mIoU, its difference to ``baseline``, fwIoU, VC_n,
    iterations, s/it and time/it relative to the baseline), then per-class IoU."""
    names = [r["name"] for r in records]
    if len(set(names)) != len(names):
        raise SemivssError(f"two records have the same name in {names}")
    ref = None
    if baseline is not None:
        ref = next((r for r in records if r["name"] == baseline), None)
        if ref is None:
            raise SemivssError(f"--baseline {baseline!r} is not one of {names}")
        starts = {r["name"]: start_identity(r) for r in records if start_identity(r)}
        if len(set(starts.values())) > 1:
            raise SemivssError(f"rows start from different weights (init_from_[tensors_]sha256): {starts}; "
                               "compare rows of one base model only")
    vcs = sorted({k for r in records for k in r["metrics"] if k.startswith("VC")}, key=lambda k: int(k[2:]))
    head = ["row", "mIoU"] + ([f"vs {ref['name']}"] if ref else []) + ["fwIoU", *vcs, "iterations",
                                                                      "s/it"]
    head += [f"time/it vs {ref['name']}"] if ref else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        m = r["metrics"]
        cells = [r["name"], _pct(m.get("mIoU"))]
        if ref:
            cells.append(f"{100 * (float(m['mIoU']) - float(ref['metrics']['mIoU'])):+.2f}")
        cells += [_pct(m.get("fwIoU")), *(_pct(m.get(k)) for k in vcs), str(r.get("iterations") or "-"),
                  f"{r['s_per_it']:.2f}" if r.get("s_per_it") else "-"]
        if ref:
            rel = (r.get("s_per_it") or 0) / ref["s_per_it"] if ref.get("s_per_it") else 0
            cells.append(f"{rel:.2f}x" if rel else "-")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    if per_class:
        classes: list[str] = []
        for r in records:
            classes += [c for c in r.get("iou", {}) if c not in classes]
        rows = ["| class | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        rows += [f"| {c} | " + " | ".join(_pct(r.get("iou", {}).get(c)) for r in records) + " |"
                 for c in classes]
        text += "\n\nIoU per class (%):\n\n" + "\n".join(rows)
    return text


_BLOCK = re.compile(r"(<!-- results: (?P<args>[^>]*?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def _provenance(record: dict[str, Any]) -> str:
    """``CPU, commit abcdef12`` of a benchmark record."""
    return f"{(record.get('machine') or {}).get('cpu', '?')}, commit {str(record.get('commit') or '?')[:8]}"


def _grid(record: dict[str, Any]) -> str:
    """Where a key-frame record warped: the input grid or the score map's."""
    return "input" if record.get("warp_at") == "input" else "score map"


def video_inference_markdown(record: dict[str, Any]) -> str:
    """Markdown of a ``benchmarks/video_inference.py`` record: one row per predictor (frames/s,
    speed-up vs the per-frame reference, mIoU, fwIoU, VC8, VC16, key frames, seconds per stage)."""
    head = ["predictor", "frames/s", "vs reference", "mIoU", "fwIoU", "VC8", "VC16", "key frames",
            "seconds: reference / update / flow / warp / fusion"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in record["rows"]:
        st = r.get("stage_seconds") or {}
        stages = " / ".join(f"{st.get(k, 0.0):.2f}" for k in ("reference", "update", "flow", "warp", "fusion"))
        ratio = f"{r['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in r else "-"  # no reference row run
        lines.append("| " + " | ".join([
            r["row"], f"{r['fps']:.2f}", ratio, _pct(r.get("mIoU")),
            _pct(r.get("fwIoU")), _pct(r.get("VC8")), _pct(r.get("VC16")),
            str(r.get("keyframes", r["frames"])), stages if st else "-"]) + " |")
    lines.append("")
    lines.append(f"{record['frames']} frames of {record['format']} {record['split']} at "
                 f"{record['input_size'][0]}x{record['input_size'][1]}, {record['precision']}, flow "
                 f"{record['flow']} ({record.get('propagation', 'chained')} propagation"
                 f"{', both sides of each key frame' if record.get('bidirectional') else ''}, warped on the "
                 f"{_grid(record)} grid), update branch at x{record['update_scale']:g} input; {_provenance(record)}.")
    return "\n".join(lines)


def propagation_by_age_markdown(record: dict[str, Any]) -> str:
    """Markdown of a ``benchmarks/propagation_by_age.py`` record: mIoU and VC8 by the reference's
    age (reference + flow, and Accel when the record has it, with the thin classes of reference +
    flow), then per key-frame interval K the causal propagation against both sides of each key frame."""
    rows = record["rows"]
    aged = [r for r in rows if "age" in r]
    kinds = list(dict.fromkeys(r["row"] for r in aged))
    thin = list(next((r["iou"] for r in aged if r["row"] == kinds[0]), {}))
    head = ["age (frames)"] + [f"{k}: {m}" for k in kinds for m in ("mIoU", "VC8")] + [f"{kinds[0]}: {c}" for c in thin]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for age in sorted({int(r["age"]) for r in aged}):
        by = {r["row"]: r for r in aged if int(r["age"]) == age}
        cells = [str(age)] + [_pct(by[k].get(m)) if k in by else "-" for k in kinds for m in ("mIoU", "VC8")]
        first = by.get(kinds[0], {}).get("iou", {})
        lines.append("| " + " | ".join(cells + [_pct(first.get(c)) for c in thin]) + " |")
    keyed = [r for r in rows if "K" in r]
    if keyed:
        modes = list(dict.fromkeys(r["row"] for r in keyed))
        head = ["K"] + [f"{m}: {v}" for m in modes for v in ("mIoU", "VC8")]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k in sorted({int(r["K"]) for r in keyed}):
            by = {r["row"]: r for r in keyed if int(r["K"]) == k}
            lines.append("| " + " | ".join([str(k)] + [_pct(by[m].get(v)) if m in by else "-"
                                                      for m in modes for v in ("mIoU", "VC8")]) + " |")
    lines.append("")
    lines.append(f"{record.get('frames_by_age', '?')} frames scored by age, {record.get('frames_by_k', '?')} by K, "
                 f"of {record['format']} {record['split']} at {record['input_size'][0]}x{record['input_size'][1]}, "
                 f"{record['precision']}, flow {record['flow']} ({record['propagation']} propagation, warped on the "
                 f"{_grid(record)} grid); {_provenance(record)}.")
    return "\n".join(lines)


def step_cost_markdown(record: dict[str, Any]) -> str:
    """Markdown of a ``benchmarks/method_step_cost.py --record`` record: per config the images in
    the batch, median seconds per step and its ratio to the first row, and with ``--flops`` the
    GFLOP per step and their ratio (the cost floor of the algorithm as configured)."""
    flops = all("gflop_per_step" in r for r in record["rows"])
    head = ["config", "method", "images", "s/step", "time vs first"]
    head += ["GFLOP/step", "FLOPs vs first", "time / FLOPs ratio"] if flops else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in record["rows"]:
        cells = [r["config"], r["method"], str(r["images"]), f"{r['median_s_per_step']:.2f}",
                 f"{r['vs_first']:.2f}x"]
        if flops:
            cells += [f"{r['gflop_per_step']:.0f}", f"{r['flops_vs_first']:.2f}x",
                      f"{r['vs_first'] / r['flops_vs_first']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"`{record['benchmark']}`: {record['precision']}, {record.get('threads', '?')} threads, "
                 f"{_provenance(record)}; {record.get('notes', '')}.")
    return "\n".join(lines)


def reliable_rule_text(record: dict[str, Any]) -> str:
    """The reliability rule of a pseudo-label-quality record in words."""
    rule = record.get("reliable_rule") or {"mode": "threshold", "gamma": record.get("gamma")}
    if rule.get("mode") == "threshold":
        return f"entropy < {float(rule['gamma']):.3g} nats"
    return f"lowest-entropy {100 * float(rule['keep']):g} % of each {'class' if rule.get('classwise') else 'frame'}"


def pseudo_quality_markdown(records: list[dict[str, Any]]) -> str:
    """Markdown of ``semivss pseudo-label-quality --out`` records of one pseudo-label set under
    several reliability rules: the reliable share, mIoU and per-class IoU of the reliable pixels
    per rule, beside those of all pixels (from the first record)."""
    if not records:
        raise SemivssError("no pseudo-label-quality records given")
    names = next((r["class_names"] for r in records if r.get("class_names")),
                 [f"class {i}" for i in range(len(records[0]["all"]["iou"]))])
    cols = [("all pixels", records[0]["all"], 1.0)]
    cols += [(reliable_rule_text(r), r["reliable"], r["reliable_share"]) for r in records]
    lines = ["| | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols),
             "| share of annotated pixels | " + " | ".join(f"{100 * c[2]:.1f} %" for c in cols) + " |",
             "| mIoU | " + " | ".join(f"{100 * c[1]['mIoU']:.2f}" for c in cols) + " |"]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(f"{100 * c[1]['iou'][i]:.2f}" for c in cols) + " |")
    lines.append("")
    lines.append(f"{records[0]['frames']} frames with ground truth; IoU in %.")
    return "\n".join(lines)


def pseudo_sets_markdown(named: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown of pseudo-label-quality records of different sets (marker words ``NAME=FILE``),
    one row each: mIoU of all pixels, the reliable share and mIoU under the record's rule, and
    the reliable IoU of the thin classes."""
    if not named:
        raise SemivssError("no pseudo-label-quality records given")
    thin = ("Pole", "SignSymbol", "Pedestrian", "Bicyclist")
    head = ["pseudo-labels", "reliable rule", "all pixels: mIoU", "reliable share", "reliable: mIoU"]
    head += [f"reliable: {c}" for c in thin]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in named:
        names = r.get("class_names") or []
        cells = [name, reliable_rule_text(r), _pct(r["all"]["mIoU"]), f"{100 * r['reliable_share']:.1f} %",
                 _pct(r["reliable"]["mIoU"])]
        cells += [_pct(r["reliable"]["iou"][names.index(c)]) if c in names else "-" for c in thin]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{named[0][1]['frames']} frames with ground truth; IoU in %.")
    return "\n".join(lines)


def offsets_markdown(named: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """Markdown of offset analyses (``offsets.json`` of ``evaluate --offsets``; marker words
    ``NAME=FILE``, split at the last ``=``) side by side: mIoU
    by signed offset from the labeled frame on the train videos and the held-out videos of each
    model, then the train videos' overfitting gap (offset 0 minus the frame-weighted mean of the
    other offsets; docs/methods.md#10-inner-video-overfitting)."""
    def subset(rows: list[dict[str, Any]], train: bool) -> dict[int, dict[str, Any]]:
        return {int(r["offset"]): r for r in rows if str(r["subset"]).startswith("train") == train}

    offsets = sorted({int(r["offset"]) for _, rows in named for r in rows})
    head = ["offset"] + [f"{n} ({'train' if t else 'held-out'})" for n, _ in named for t in (True, False)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for o in offsets:
        cells = [f"{o:+d}" if o else "0 (labeled)"]
        for _, rows in named:
            for t in (True, False):
                r = subset(rows, t).get(o)
                cells.append(_pct(r["mIoU"]) if r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    gaps = ["train gap: 0 - others"]
    for _, rows in named:
        tr = subset(rows, True)
        others = [r for o, r in tr.items() if o != 0]
        n = sum(int(r["n_frames"]) for r in others)
        if 0 in tr and n:
            mean = sum(float(r["mIoU"]) * int(r["n_frames"]) for r in others) / n
            gaps.append(f"{100 * (float(tr[0]['mIoU']) - mean):+.2f}")
        else:
            gaps.append("-")
        gaps.append("")
    lines.append("| " + " | ".join(gaps) + " |")
    return "\n".join(lines)


def _named_records(words: list[str]) -> list[tuple[str, Any]]:
    """Marker words ``NAME=FILE`` (split at the last ``=``) as (name, the file's JSON)."""
    return [(w.rsplit("=", 1)[0], json.loads(Path(w.rsplit("=", 1)[1]).read_text())) for w in words]


def _table_from_args(args: str) -> str:
    """The table a marker asks for: ``DIR [DIR ...] [--baseline ROW] [--no-per-class]``,
    ``--video-inference FILE`` (a video-inference benchmark record), ``--step-cost FILE`` (a
    method step-cost record), ``--pseudo-quality FILE ...`` (pseudo-label-quality records of one
    set), ``--pseudo-sets NAME=FILE ...`` (pseudo-label-quality records of different sets),
    ``--propagation-by-age FILE`` (a propagation-by-age record) or ``--offsets NAME=FILE ...``
    (offset analyses side by side)."""
    words = shlex.split(args)
    if words and words[0] == "--step-cost":
        return "\n\n".join(step_cost_markdown(json.loads(Path(w).read_text())) for w in words[1:])
    if words and words[0] == "--pseudo-quality":
        return pseudo_quality_markdown([json.loads(Path(w).read_text()) for w in words[1:]])
    if words and words[0] == "--pseudo-sets":  # --pseudo-sets NAME=FILE ...
        return pseudo_sets_markdown(_named_records(words[1:]))
    if words and words[0] == "--propagation-by-age":
        return "\n\n".join(propagation_by_age_markdown(json.loads(Path(w).read_text())) for w in words[1:])
    if words and words[0] == "--video-inference":
        return "\n\n".join(video_inference_markdown(json.loads(Path(w).read_text())) for w in words[1:])
    if words and words[0] == "--offsets":  # --offsets NAME=FILE ...
        return offsets_markdown(_named_records(words[1:]))
    baseline, per_class, paths = None, True, []
    i = 0
    while i < len(words):
        if words[i] == "--baseline" and i + 1 < len(words):
            baseline, i = words[i + 1], i + 2
        elif words[i] == "--no-per-class":
            per_class, i = False, i + 1
        else:
            paths.append(words[i])
            i += 1
    return results_markdown(load_records(paths), baseline=baseline, per_class=per_class)


def update_tables(text: str) -> str:
    """``text`` with every ``<!-- results: ARGS -->`` ... ``<!-- /results -->`` block replaced by
    the table of ``semivss results table ARGS`` (paths relative to the working directory)."""
    return _BLOCK.sub(lambda m: m.group(1) + _table_from_args(m.group("args")) + "\n" + m.group(4), text)

