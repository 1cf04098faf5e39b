"""Training logs: ``metrics.csv`` (columns may grow, appended on resume), TensorBoard (``tb/``)
and a rich progress bar (plain lines when stdout is not a terminal). Rank 0 only."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from semivss.progress import clock


class CSVLog:
    """Append-only CSV of ``{"step": ..., key: value}`` rows whose header grows with new keys."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        self.fields: list[str] = ["step"]
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.fields = list(reader.fieldnames or ["step"])
                # rows written after the checkpoint belong to the interrupted part of the run
                rows = [r for r in reader if _step_of(r) <= resume_step]
        self._rewrite(rows)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, restval="")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.fields]
        if new:
            with self.path.open(newline="") as f:
                old = list(csv.DictReader(f))
            self.fields.extend(new)
            self._rewrite(old)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields, restval="").writerow(
                {k: _fmt(v) for k, v in row.items()}
            )


def _step_of(row: dict[str, str]) -> float:
    try:
        return float(row.get("step", "nan"))
    except ValueError:
        return math.inf


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


class TrainLogger:
    """Logs training scalars and evaluation metrics; everything is a no-op when ``enabled`` is
    False (ranks other than 0)."""

    def __init__(
        self,
        out_dir: Path,
        total_steps: int,
        start_step: int = 0,
        resume: bool = False,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool | None = None,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self._progress: Progress | None = None
        self._tb: Any = None
        self._csv: CSVLog | None = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._csv = CSVLog(out_dir / "metrics.csv", start_step if resume else None)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step if resume else None)
        console = Console()
        use_bar = console.is_terminal if progress is None else progress
        if use_bar:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._progress.add_task(
                "train", total=total_steps, completed=start_step, info=""
            )
            self._progress.start()

    def advance(self, step: int) -> None:
        """Move the progress bar to ``step`` completed iterations."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log_train(self, step: int, scalars: dict[str, float]) -> None:
        """Scalars of the last ``log_interval`` iterations (``loss``, terms, ``lr``, ``it_s``)."""
        if not self.enabled:
            return
        assert self._csv is not None
        self._csv.write({"step": step, **scalars})
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"train/{key}", value, step)
        info = " ".join(
            f"{k} {v:.4g}" if k != "lr" else f"lr {v:.2e}"
            for k, v in scalars.items()
            if k in ("loss", "lr", "it_s")
        )
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        else:
            rate = scalars.get("it_s") or 0.0
            eta = f" eta {clock((self.total_steps - step) / rate)}" if rate > 0 and step < self.total_steps else ""
            print(f"[semivss] step {step}/{self.total_steps} {info}{eta}", file=sys.stdout, flush=True)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Evaluation metrics, logged as ``val/<key>``."""
        if not self.enabled:
            return
        assert self._csv is not None
        scalars = {f"val/{k}": float(v) for k, v in metrics.items()}
        self._csv.write({"step": step, **scalars})
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        # a metric that could not be computed (VC16 on videos shorter than 16 frames) shows as '-',
        # as in the evaluation table
        text = " ".join(f"{k} {v:.4g}" if math.isfinite(float(v)) else f"{k} -" for k, v in metrics.items())
        if self._progress is not None:
            self._progress.console.print(f"[semivss] eval @ {step}: {text}")
        else:
            print(f"[semivss] eval @ {step}: {text}", file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
