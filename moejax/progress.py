"""Progress display for the command line: what runs now, how far along, how long it took.

On a terminal it is a live ``rich`` display (spinner, step, ``done/total``, elapsed
time) that keeps ticking through long compilations. Elsewhere (a log file, CI, a
pipe) it prints one plain line per step with the elapsed time, so a log shows where
the time went. Everything goes to stderr; stdout stays for results.
"""
from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO

__all__ = ["Progress"]


class Progress:
    """One task at a time: ``start(description, total)``, then ``update``; ``log`` for lasting lines.

    Use as a context manager so a live display is always closed (also on Ctrl-C).
    ``enabled=False`` prints nothing at all (``--quiet``).
    """

    def __init__(self, enabled: bool = True, stream: IO[str] | None = None, live: bool | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._t0 = time.perf_counter()
        self._rich = None
        self._task = None
        self._last_line = ""

    # ---- context ---------------------------------------------------------------
    def __enter__(self) -> "Progress":
        if self.enabled and self.live:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, SpinnerColumn,
                                       TextColumn, TimeElapsedColumn)

            self._rich = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
                                      MofNCompleteColumn(), TimeElapsedColumn(),
                                      console=Console(file=self.stream), transient=True)
            self._rich.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    # ---- reporting -------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds since the display was created."""
        return time.perf_counter() - self._t0

    def start(self, description: str, total: int | None = None) -> None:
        """Begin a task (the previous one is finished)."""
        if not self.enabled:
            return
        if self._rich is not None:
            if self._task is not None:
                self._rich.remove_task(self._task)
            self._task = self._rich.add_task(description, total=total)
        else:
            self._task = None
        self._plain(description, 0, total)

    def update(self, description: str, done: int, total: int | None = None) -> None:
        """The current step of the task: what runs and how many steps are done."""
        if not self.enabled:
            return
        if self._rich is not None:
            if self._task is None:
                self._task = self._rich.add_task(description, total=total)
            self._rich.update(self._task, description=description, completed=done,
                              **({"total": total} if total is not None else {}))
        self._plain(description, done, total)

    def log(self, line: str) -> None:
        """A line that stays (above the live display on a terminal)."""
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.console.print(line, highlight=False, markup=False)
        else:
            print(line, file=self.stream, flush=True)

    def _plain(self, description: str, done: int, total: int | None) -> None:
        if self._rich is not None:
            return
        count = f" [{done}/{total}]" if total else ""
        line = f"[{self.elapsed():6.1f}s] {description}{count}"
        if description != self._last_line:  # one line per step, not per tick
            print(line, file=self.stream, flush=True)
            self._last_line = description
