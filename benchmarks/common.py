"""Helpers shared by the benchmarks: thread counts, warm-up, interleaved repeats,
medians, copy bandwidth, machine description, tables and JSON.

Timings block on the result (``jax.block_until_ready``; PyTorch CPU calls are
synchronous). Implementations compared in one table are timed *interleaved*
(round r runs every implementation once) so that load from other processes
drifts over all of them alike; each reports the median of its repeats, and the
JSON keeps every repeat (``times_s``).

Threads: :func:`set_threads` gives PyTorch, XLA:CPU and moejax's native expert
kernel the same intra-op thread count. XLA:CPU sizes its intra-op pool once, when
the backend starts, from the ``NPROC`` environment variable if set, else from the
CPUs this process may run on (``os.sched_getaffinity``); the native kernel sizes
its own pool on first use from ``MOEJAX_NUM_THREADS``; so a benchmark must call
:func:`set_threads` before its first JAX computation to change them.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Timing", "block", "time_fn", "time_interleaved", "copy_bandwidth", "machine_info",
           "format_table", "write_json", "available_cpus", "xla_cpu_threads", "add_threads_argument",
           "set_threads", "set_threads_or_exit", "set_torch_threads", "result_payload", "pipeline_is_exact", "smoke_model", "default_out",
           "DEFAULT_REPEATS"]

# Repeats every benchmark keeps by default (the JSON holds each one); smoke runs may ask for 1.
DEFAULT_REPEATS = 3


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
                     budget_s: float | None = None, min_repeats: int = DEFAULT_REPEATS) -> dict[str, Timing]:
    """Time several zero-argument callables in interleaved rounds.

    Args:
      fns: name -> callable.
      warmup: untimed calls of each before timing (the first one compiles).
      repeats: timed rounds; fewer when ``budget_s`` is given and one round of
        all callables (measured in warm-up) would overrun it, but never fewer
        than ``min(repeats, min_repeats)``.
      budget_s: optional wall-clock budget for the timed rounds.
      min_repeats: the floor the budget cannot cut below (a median needs a few samples).

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
        repeats = max(min(repeats, min_repeats), min(repeats, int(budget_s // round_s)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    # A new order every round (seeded): a contender pays for what ran just before it (caches
    # evicted, PyTorch's OpenMP threads still spinning after its last op), so no contender may
    # always follow the same one.
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            times[name].append(_once(fns[name]))
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
    from importlib import metadata

    for dist in ("jax", "jaxlib", "torch", "transformers", "numpy"):
        try:  # installed versions without importing (torch alone takes seconds to import)
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    info["available_cpus"] = available_cpus()
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


# --------------------------------------------------------------------------
# Thread counts: the same for every contender, and recorded.
# --------------------------------------------------------------------------
def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - jax is a dependency
        return False
    return bool(xla_bridge.backends_are_initialized())


def xla_cpu_threads() -> int:
    """The size of XLA:CPU's intra-op pool: ``NPROC`` if set (read when the backend starts), else the CPUs."""
    nproc = os.environ.get("NPROC", "")
    return int(nproc) if nproc.isdigit() and int(nproc) > 0 else available_cpus()


def add_threads_argument(ap: argparse.ArgumentParser) -> None:
    """``--threads N``: intra-op threads for every contender (PyTorch, XLA:CPU and the native kernel alike)."""
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads for PyTorch, XLA:CPU and the native kernel alike (default: the CPUs "
                         f"this process may use, {available_cpus()} here)")


def set_threads_or_exit(ap: argparse.ArgumentParser, threads: int | None) -> dict[str, Any]:
    """:func:`set_threads` for a script's ``--threads``: a bad count ends the script with one line."""
    try:
        return set_threads(threads)
    except ValueError as err:
        ap.error(str(err))


def set_threads(threads: int | None) -> dict[str, Any]:
    """Give XLA:CPU and moejax's native kernel ``threads`` intra-op threads (None: XLA's default) and
    return what is set.

    XLA reads ``NPROC`` when its backend starts, and the ``native`` expert kernel
    (``moejax/csrc``) sizes its own pool from ``MOEJAX_NUM_THREADS`` on its first call
    (else from the CPUs this process may use); so this sets
    both if no JAX computation ran yet, the kernel's to XLA's count. Afterwards the
    pools are fixed and asking for another count raises ``ValueError`` (a one-line
    message for ``ap.error``). PyTorch gets the same count from :func:`set_torch_threads`,
    which a benchmark calls where it builds its PyTorch contenders (so runs without
    torch never import it).
    """
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    started = _backend_started()
    if threads is not None and threads != xla_cpu_threads():
        if started:
            raise ValueError(f"--threads {threads}: XLA:CPU already started with {xla_cpu_threads()} threads "
                             "(set NPROC before the first JAX computation)")
        os.environ["NPROC"] = str(threads)
    n = xla_cpu_threads()
    if not started and (threads is not None or "MOEJAX_NUM_THREADS" not in os.environ):
        os.environ["MOEJAX_NUM_THREADS"] = str(n)
    native = os.environ.get("MOEJAX_NUM_THREADS", "")
    return {"threads": n, "xla_cpu_threads": n,
            "xla_threads_set_by": ("NPROC" if os.environ.get("NPROC", "").isdigit()
                                   else "default (CPUs of this process)"),
            "native_kernel_threads": int(native) if native.isdigit() else os.cpu_count(),
            "torch_threads": None, "available_cpus": available_cpus()}


def set_torch_threads(threads_info: dict[str, Any]) -> bool:
    """Pin PyTorch's intra-op pool to ``threads_info["threads"]``; False without torch. Records the count."""
    try:
        import torch
    except ImportError:
        return False
    torch.set_num_threads(int(threads_info["threads"]))
    threads_info["torch_threads"] = torch.get_num_threads()
    return True


def result_payload(benchmark: str, args: argparse.Namespace | Mapping[str, Any], threads: Mapping[str, Any],
                   rows: Sequence[Mapping[str, Any]], *, complete: bool = True, **extra: Any) -> dict[str, Any]:
    """The JSON every benchmark writes: name, date, machine, threads, arguments, rows (+ ``extra``)."""
    info = machine_info()
    return {"benchmark": benchmark, "date_utc": info["date_utc"], "complete": complete, "machine": info,
            "threads": dict(threads), "args": dict(vars(args) if isinstance(args, argparse.Namespace) else args),
            **extra, "rows": list(rows)}


def pipeline_is_exact(pipeline: str) -> bool:
    """Whether every pass of a pipeline string is exact (``moejax passes`` shows each pass's label).

    Raises ``moejax.PassError`` (one line) for an unknown pass or option.
    """
    import moejax
    import moejax.passes  # noqa: F401  (registers the passes)
    from moejax.pipeline import is_exact

    return all(is_exact(p) for p in moejax.parse_pipeline(pipeline))


def smoke_model(n_experts: int = 4) -> Any:
    """A tiny random Mixtral-family model for smoke runs: byte vocabulary, d=64, f=128 (int4-g64 divides both)."""
    from flax import nnx

    from moejax.models import MoEDecoder, tiny_mixtral

    return MoEDecoder(tiny_mixtral(vocab_size=256, d_model=64, d_ff_expert=128, n_experts=n_experts),
                      rngs=nnx.Rngs(0))


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_out(benchmark: str, smoke: bool = False) -> str:
    """Where a benchmark writes without ``--out``: ``benchmarks/results/<name>.json``, or for a smoke
    run a file in the temp folder (smoke rows must never replace the committed results)."""
    if smoke:
        import tempfile

        return str(Path(tempfile.gettempdir()) / "moejax-benchmark-smoke" / f"{benchmark}.json")
    return str(RESULTS_DIR / f"{benchmark}.json")
