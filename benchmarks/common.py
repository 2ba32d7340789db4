"""Timing helpers shared by the benchmarks: warm-up, interleaved repeats, medians,
copy bandwidth, machine description, tables and JSON.

Timings block on the result (``jax.block_until_ready``; PyTorch CPU calls are
synchronous). Implementations compared in one table are timed *interleaved*
(round r runs every implementation once) so that load from other processes
drifts over all of them alike; each reports the median of its repeats.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Timing", "block", "time_fn", "time_interleaved", "copy_bandwidth", "machine_info",
           "format_table", "write_json"]


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls (warm-up excluded)."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.min, "times_s": list(self.times)}


def block(out: Any) -> Any:
    """Wait for asynchronous JAX results; anything else is returned as is."""
    try:
        import jax
    except ImportError:  # pragma: no cover - jax is a dependency
        return out
    return jax.block_until_ready(out)


def _once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    block(fn())
    return time.perf_counter() - start


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls (compilation)."""
    if repeats < 1:
        raise ValueError(f"time_fn: repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        block(fn())
    return Timing(tuple(_once(fn) for _ in range(repeats)))


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, warmup: int = 1, repeats: int = 5,
                     budget_s: float | None = None) -> dict[str, Timing]:
    """Time several zero-argument callables in interleaved rounds.

    Args:
      fns: name -> callable.
      warmup: untimed calls of each before timing (the first one compiles).
      repeats: timed rounds; fewer when ``budget_s`` is given and one round of
        all callables (measured in warm-up) would overrun it (at least 1 round).
      budget_s: optional wall-clock budget for the timed rounds.

    Returns:
      name -> :class:`Timing`.
    """
    if repeats < 1:
        raise ValueError(f"time_interleaved: repeats must be >= 1, got {repeats}")
    round_s = 0.0
    for fn in fns.values():
        t = 0.0
        for _ in range(warmup):
            t = _once(fn)
        round_s += t
    if budget_s is not None and round_s > 0:
        repeats = max(1, min(repeats, int(budget_s // round_s)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_once(fn))
    return {name: Timing(tuple(ts)) for name, ts in times.items()}


def copy_bandwidth(nbytes: int, repeats: int = 5) -> dict[str, float]:
    """Measured memory copy bandwidth in GB/s, STREAM convention (bytes read + written).

    Two measurements on an array of ``nbytes``: NumPy ``copyto`` (one thread)
    and an XLA elementwise pass ``x + 1`` (all threads). ``best`` is the higher,
    which makes a memory bound computed from it the stricter one.
    """
    import jax
    import jax.numpy as jnp

    n = max(1, nbytes // 4)
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t_np = min(_once(lambda: np.copyto(dst, src)) for _ in range(repeats))
    x = jnp.ones((n,), jnp.float32)
    add_one = jax.jit(lambda a: a + 1.0)
    block(add_one(x))
    t_xla = min(_once(lambda: add_one(x)) for _ in range(repeats))
    res = {"numpy_copy_gbs": 2 * src.nbytes / t_np / 1e9, "xla_copy_gbs": 2 * src.nbytes / t_xla / 1e9,
           "array_bytes": int(src.nbytes)}
    res["best_gbs"] = max(res["numpy_copy_gbs"], res["xla_copy_gbs"])
    return res


def machine_info() -> dict[str, Any]:
    """What the numbers came from: CPU, cores, load, library versions, time."""
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        info["load_avg_1_5_15"] = list(os.getloadavg())
    except OSError:
        pass
    for mod in ("jax", "jaxlib", "torch", "transformers", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table; floats get 3 significant digits, missing cells '-'."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
              for row in cells]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` (plus nothing else) as indented JSON, creating folders."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return out
