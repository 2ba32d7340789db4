"""Running a worker script in its own process (the device count must be set before JAX starts).

A worker prints one line ``RESULT {json}``; :func:`run_worker` runs it with a clean
``XLA_FLAGS`` (the worker sets its own) and returns the parsed JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def record_reads() -> tuple[dict[str, int], Any]:
    """``(reads, stop)``: from now on ``reads[tensor name]`` sums the bytes ``SafetensorsFile.read``
    returns (what a checkpoint load really read); ``stop()`` removes the recorder."""
    from moejax.models.safetensors_io import SafetensorsFile

    reads: dict[str, int] = {}
    original = SafetensorsFile.read

    def read(self, name, index=()):
        block = original(self, name, index)
        reads[name] = reads.get(name, 0) + block.nbytes
        return block

    SafetensorsFile.read = read
    return reads, lambda: setattr(SafetensorsFile, "read", original)


def run_worker(script: Path, args: tuple[str, ...], timeout: int) -> Any:
    """Run ``python script *args`` from the repository root; the JSON of its last ``RESULT`` line."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=script.parent.parent)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])
