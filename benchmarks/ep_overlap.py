"""Expert parallelism on the default model, 8 simulated CPU devices: placement load balance, exactness,
exported all-to-all counts, and CPU wall time per overlap chunk count.

Run (the script asks XLA for 8 host devices itself, before JAX starts)::

    python benchmarks/ep_overlap.py                       # the committed rows
    python benchmarks/ep_overlap.py --calibration-bytes 65536 --repeats 7
    python benchmarks/ep_overlap.py --smoke               # a tiny random model, seconds (tests)

Three kinds of rows (``kind``):

* ``placement``: routed slots per device on the calibration data (the routing
  profile that ``profile`` measures), contiguous vs balanced (LPT) placement, for
  2/4/8 devices with and without replicas of the hottest experts. Analysis, not timed.
* ``timing``: the model optimised by ``moejax.optimize`` with the row's named
  pipeline: ``profile,select-impl`` on one device (``devices=1``, the reference) and
  ``profile,ep(num_devices=N,overlap_chunks=C,replicate_hot=H),select-impl`` (dropless
  expert parallelism: ``exact=True``). All rows are timed in interleaved rounds on the
  benchmark tokens (``--repeats``, at least 3 by default; the JSON keeps every round);
  ``max_abs_dev`` is the largest logit difference from the one-device row and
  ``x_single`` the one-device median over the row's. CPU "devices" share the host's
  cores (``threads``), so the times show the cost of chunking on this machine, not the
  overlap a GPU/TPU interconnect would give (async collectives); see
  ``moejax.sharding.cost_model``.
* ``export``: ``all_to_all`` ops in the StableHLO that ``jax.export`` writes for TPU and
  CUDA on an abstract 8-device mesh, per chunk count (structure, not timed; the
  program is built by ``moejax.sharding.expert_parallel_program``, since an abstract
  mesh cannot run through optimize's checks).
"""
from __future__ import annotations

import os

# Before JAX starts: 8 CPU devices to place experts on.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEFAULT_REPEATS, add_threads_argument, format_table, pipeline_is_exact,  # noqa: E402
                    default_out, result_payload, set_threads_or_exit, smoke_model, time_interleaved, write_json)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import moejax  # noqa: E402
from moejax import analysis, data  # noqa: E402
from moejax.sharding import (abstract_expert_mesh, balanced_placement, contiguous_placement,  # noqa: E402
                             count_collectives, expert_parallel_program, export_program, load_summary)

# (devices, overlap chunks, replicated hot experts) of the timed expert-parallel rows
EP_CONFIGS = ((2, 1, 0), (4, 2, 0), (8, 1, 0), (8, 2, 8))
SMOKE_EP_CONFIGS = ((2, 2, 0),)
SINGLE = "profile,select-impl"


def ep_pipeline(devices: int, chunks: int, hot: int) -> str:
    return f"profile,ep(num_devices={devices},overlap_chunks={chunks},replicate_hot={hot}),select-impl"


def placement_rows(profile: analysis.RoutingProfile, devices=(2, 4, 8), replicate=(0, 1)) -> list[dict[str, Any]]:
    """Routed slots per device, contiguous vs balanced placement, per layer, device count and replica count."""
    rows = []
    for name, layer in sorted(profile.layers.items()):
        loads = np.asarray(layer.counts, np.float64).sum(0)
        e = len(loads)
        for n in devices:
            for rep_per_dev in replicate:
                hot = rep_per_dev * n
                before = load_summary(contiguous_placement(e, n), loads)
                after = load_summary(balanced_placement(loads, n, hot), loads)
                rows.append({"kind": "placement", "layer": name, "devices": n, "replicate_hot": hot,
                             "before_max": before["max"], "after_max": after["max"], "mean": before["mean"],
                             "before_imbalance": before["imbalance"], "after_imbalance": after["imbalance"]})
    return rows


def timing_rows(model: Any, tokens: np.ndarray, calibration: list[np.ndarray], configs, repeats: int,
                threads: int) -> tuple[list[dict[str, Any]], analysis.RoutingProfile]:
    """One optimize call per pipeline, exactness against one device, then interleaved timing."""
    x = jax.numpy.asarray(tokens)
    specs = {SINGLE: (1, 1, 0), **{ep_pipeline(*c): c for c in configs}}
    opts = {}
    for pipeline in specs:
        t0 = time.perf_counter()
        # check_exact=False: the deviation from the one-device row is measured below on these tokens
        opts[pipeline] = moejax.optimize(model, (x,), pipeline, calibration=calibration, check_exact=False)
        print(f"  optimized {pipeline} in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    profile = analysis.read(opts[SINGLE].program.metadata, analysis.RoutingProfile)
    ref = np.asarray(opts[SINGLE](x))
    devs = {p: float(np.max(np.abs(np.asarray(opt(x)) - ref))) for p, opt in opts.items()}
    timings = time_interleaved({p: functools.partial(opt, x) for p, opt in opts.items()}, warmup=1,
                               repeats=repeats, min_repeats=min(repeats, DEFAULT_REPEATS))
    single = timings[SINGLE].median
    rows = []
    for pipeline, (n, chunks, hot) in specs.items():
        tm = timings[pipeline]
        rows.append({"kind": "timing", "pipeline": pipeline, "exact": pipeline_is_exact(pipeline), "devices": n,
                     "chunks": chunks, "replicate_hot": hot, "threads": threads,
                     "ffn_impls": opts[pipeline].stages[-1].stats["ffn_impls"], "max_abs_dev": devs[pipeline],
                     "median_ms": tm.median * 1e3, "x_single": single / tm.median, "times_s": list(tm.times)})
    return rows, profile


def export_rows(model: Any, tokens: np.ndarray, chunk_counts, platforms, moe_layers: int) -> list[dict[str, Any]]:
    """all_to_all ops in the export for an abstract 8-device mesh, per chunk count and platform."""
    program = moejax.trace(model, tokens)
    rows = []
    for chunks in chunk_counts:
        ep = expert_parallel_program(program, abstract_expert_mesh(8), overlap_chunks=chunks, layout="shard")
        for platform in platforms:
            counts = count_collectives(export_program(ep, [platform]))
            rows.append({"kind": "export", "devices": 8, "chunks": chunks, "platform": platform,
                         "all_to_all": counts["all_to_all"], "moe_layers": moe_layers})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/ep_overlap.json; --smoke: a temp file)")
    ap.add_argument("--calibration-bytes", type=int, default=16384, help="training-text bytes profiled")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help=f"timed rounds (>= {DEFAULT_REPEATS} for results)")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, one expert-parallel row (tests)")
    add_threads_argument(ap)
    args = ap.parse_args(argv)
    args.out = args.out or default_out("ep_overlap", args.smoke)
    for flag in ("calibration_bytes", "batch", "seq", "repeats"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    threads = set_threads_or_exit(ap, args.threads)  # before the first JAX computation: XLA sizes its pool then
    if len(jax.devices()) < 8:
        ap.error(f"needs 8 XLA devices, found {len(jax.devices())}: JAX started before this script set XLA_FLAGS")

    start = time.perf_counter()
    if args.smoke:
        model, configs, chunk_counts, platforms = smoke_model(n_experts=8), SMOKE_EP_CONFIGS, (1, 2), ("cuda",)
    else:
        from moejax.models.default_model import load_default_model

        model, configs, chunk_counts, platforms = load_default_model(), EP_CONFIGS, (1, 2, 4), ("tpu", "cuda")
    text = data.heldout_bytes(args.batch * args.seq)
    if len(text) < args.batch * args.seq:
        ap.error(f"--batch x --seq = {args.batch * args.seq} exceeds the held-out text ({len(text)} bytes)")
    tokens = np.frombuffer(text, np.uint8).astype(np.int32).reshape(args.batch, args.seq)
    if args.calibration_bytes < args.seq:
        ap.error(f"--calibration-bytes must hold one window of --seq ({args.seq}) tokens")
    calib = data.calibration_tokens(args.calibration_bytes, args.seq)  # the first bytes of the training text

    timing, profile = timing_rows(model, tokens, [calib], configs, args.repeats, threads["threads"])
    placement = placement_rows(profile)
    print("load per device (routed slots on calibration data), contiguous -> balanced LPT placement")
    print(format_table(placement, ["layer", "devices", "replicate_hot", "before_max", "after_max", "mean",
                                   "before_imbalance", "after_imbalance"]))
    print(f"\nexactness and CPU wall time (tokens {tokens.shape}, {threads['threads']} threads for all devices)")
    print(format_table(timing, ["pipeline", "devices", "chunks", "replicate_hot", "max_abs_dev", "median_ms",
                                "x_single"]))
    exports = export_rows(model, tokens, chunk_counts, platforms, len(profile.layers))
    print("\nexported for 8 devices (jax.export, abstract mesh): all_to_all ops")
    print(format_table(exports, ["platform", "chunks", "all_to_all", "moe_layers"]))
    path = write_json(args.out, result_payload("ep_overlap", args, threads, placement + timing + exports,
                                               smoke=args.smoke, tokens=list(tokens.shape),
                                               calibration_bytes=int(calib.size), devices=len(jax.devices()),
                                               elapsed_s=time.perf_counter() - start))
    print(f"\nwrote {path} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
