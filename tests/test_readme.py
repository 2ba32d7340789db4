"""README.md's API tour runs as written, twice in a row, and prints a screenful."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SCREENFUL = 40


def tour_code() -> str:
    match = re.search(r"<!-- tour -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md has no <!-- tour --> python block"
    return match.group(1)


def test_tour_runs_twice_and_prints_a_screenful(tmp_path):
    script = tmp_path / "tour.py"
    script.write_text(tour_code())
    for run in (1, 2):  # a second run must not trip over what the first left behind
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path)
        assert out.returncode == 0, f"run {run}:\n{out.stderr[-3000:]}"
        printed = (out.stdout + out.stderr).strip().splitlines()
        assert 5 <= len(printed) <= SCREENFUL, f"run {run} printed {len(printed)} lines:\n" + "\n".join(printed)
    assert "quantize(bits=4,group_size=16)" in out.stdout and "weight format" in out.stdout
    assert "(2, 16, 64)" in out.stdout
