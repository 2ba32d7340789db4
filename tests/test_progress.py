"""The progress display: timed lines off a terminal, a live display on one, silence when quiet."""
from __future__ import annotations

import io

from moejax.progress import Progress


def test_plain_lines_one_per_step_with_elapsed_time_and_counts():
    out = io.StringIO()
    with Progress(stream=out, live=False) as progress:
        progress.start("loading")
        progress.update("forward: pass 1/2 profile", 1, 4)
        progress.update("forward: pass 1/2 profile", 1, 4)  # the same step again: no new line
        progress.log("a lasting line")
        progress.update("forward: pass 2/2 quantize", 2, 4)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("[") and lines[0].endswith("] loading")
    assert lines[1].endswith("forward: pass 1/2 profile [1/4]") and lines[2] == "a lasting line"


def test_live_display_runs_and_closes(monkeypatch):
    out = io.StringIO()
    with Progress(stream=out, live=True) as progress:
        progress.start("compiling", total=3)
        progress.update("running", 2, 3)
        progress.log("kept")
    assert "kept" in out.getvalue() and progress._rich is None  # stopped on exit


def test_quiet_prints_nothing():
    out = io.StringIO()
    with Progress(enabled=False, stream=out) as progress:
        progress.start("x")
        progress.update("y", 1, 2)
        progress.log("z")
    assert out.getvalue() == ""
