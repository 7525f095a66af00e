"""Progress for long commands: bars on a terminal, plain timestamped lines in logs.

Rich's live bars draw nothing until the end when stderr is not a terminal (CI, ``nohup``,
``| tee``): calibrating a 0.5B model printed nothing for an hour. So in that case every stage
start, its end, and a line at least every ``LOG_EVERY_S`` seconds (or every 10 %) is written.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["StageProgress"]

LOG_EVERY_S = 10.0


class StageProgress:
    """``with StageProgress({"stage": "label"}) as progress: work(progress=progress)`` where
    the library calls ``progress(stage, done, total)``."""

    def __init__(self, labels: Mapping[str, str], *, console: Console | None = None):
        self.labels = dict(labels)
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.start = time.monotonic()
        self._bar: Progress | None = None
        self._tasks: dict[str, int] = {}
        self._last: dict[str, tuple[float, int]] = {}

    def __enter__(self) -> Callable[[str, int, int], None]:
        if self.live:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._bar.__enter__()
        return self.update

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def label(self, stage: str) -> str:
        return self.labels.get(stage, stage)

    def update(self, stage: str, done: int, total: int) -> None:
        if self._bar is not None:
            if stage not in self._tasks:
                self._tasks[stage] = self._bar.add_task(self.label(stage), total=total)
            self._bar.update(self._tasks[stage], completed=done, total=total)
            return
        now = time.monotonic()
        if total <= 1:  # a single step: announce it, nothing to count
            if done == 0:
                print(
                    f"[{now - self.start:7.1f}s] {self.label(stage)}...",
                    file=sys.stderr,
                    flush=True,
                )
            return
        last_t, last_done = self._last.get(stage, (None, -1))
        step = max(1, total // 10)
        due = (
            last_t is None
            or done >= total
            or now - last_t >= LOG_EVERY_S
            or done - last_done >= step
        )
        if due and done != last_done:
            self._last[stage] = (now, done)
            print(
                f"[{now - self.start:7.1f}s] {self.label(stage)}: {done}/{total}",
                file=sys.stderr,
                flush=True,
            )
