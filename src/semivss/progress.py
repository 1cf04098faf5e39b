"""Progress of long commands: a rich bar with ETA on a terminal, and clean periodic lines
otherwise (logs, CI, ``nohup``): ``[semivss] eval val: 40/101 (40%), 0:00:12 elapsed, ETA 0:00:18``,
at most one line per ``SEMIVSS_PROGRESS_INTERVAL`` seconds (default 10) and one at the end."""

from __future__ import annotations

import os
import sys
import time
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

__all__ = ["LineProgress", "clock", "make_progress"]


def clock(seconds: float) -> str:
    """``H:MM:SS`` of a duration."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class LineProgress:
    """The subset of rich's ``Progress`` the loops use (``add_task``, ``advance``, ``update``),
    printed as plain lines to ``stream``."""

    def __init__(self, stream: Any = None, interval: float | None = None) -> None:
        self.stream = stream or sys.stderr
        self.interval = float(os.environ.get("SEMIVSS_PROGRESS_INTERVAL", 10)) if interval is None else interval
        self._tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            for tid, task in self._tasks.items():
                if task["printed_at"] != task["completed"]:
                    self._print(tid)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_: Any) -> int:
        tid = len(self._tasks)
        now = time.monotonic()
        self._tasks[tid] = {"description": description, "total": total, "completed": completed,
                            "start": now, "last": now, "printed_at": completed}
        return tid

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, completed=self._tasks[task_id]["completed"] + advance)

    def update(self, task_id: int, completed: float | None = None, total: float | None = None, **_: Any) -> None:
        task = self._tasks[task_id]
        if total is not None:
            task["total"] = total
        if completed is not None:
            task["completed"] = completed
        now = time.monotonic()
        if now - task["last"] >= self.interval:
            self._print(task_id)

    def _print(self, task_id: int) -> None:
        task = self._tasks[task_id]
        now = time.monotonic()
        task["last"], task["printed_at"] = now, task["completed"]
        done, total, elapsed = task["completed"], task["total"], now - task["start"]
        text = f"[semivss] {task['description']}: {int(done)}"
        if total:
            text += f"/{int(total)} ({100 * done / total:.0f}%)"
        text += f", {clock(elapsed)} elapsed"
        if total and 0 < done < total:
            text += f", ETA {clock(elapsed * (total - done) / done)}"
        print(text, file=self.stream, flush=True)


def make_progress(enabled: bool = True) -> Any:
    """The progress display of the inference loops: disabled -> prints nothing; on a terminal ->
    rich bar (count, elapsed, ETA); otherwise -> :class:`LineProgress`."""
    console = Console(stderr=True)
    if enabled and not console.is_terminal:
        return LineProgress()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
