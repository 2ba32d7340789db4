"""Expert parallelism on the default model, 8 simulated CPU devices: placement load balance, exactness,
exported all-to-all counts, and CPU wall time per overlap chunk count.

    python benchmarks/ep_overlap.py [--out ep_overlap.json] [--calibration-bytes 16384]

Prints tables and writes JSON. CPU "devices" share the host's cores, so the
timings show the cost of chunking on this machine, not the overlap a GPU/TPU
interconnect would give (async collectives); see moejax.sharding.cost_model.
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import moejax  # noqa: E402
from moejax import analysis, data  # noqa: E402
from moejax.models.default_model import load_default_model  # noqa: E402
from moejax.passes.profile import measure_routing  # noqa: E402
from moejax.sharding import (abstract_expert_mesh, balanced_placement, contiguous_placement,  # noqa: E402
                             count_collectives, expert_mesh, expert_parallel_program, export_program, load_summary)


def placement_table(profile, devices=(2, 4, 8), replicate=(0, 1)):
    rows = []
    for name, prof in sorted(profile.items()):
        loads = np.asarray(prof["counts"], np.float64).sum(0)
        e = len(loads)
        for n in devices:
            for rep_per_dev in replicate:
                hot = rep_per_dev * n
                before = load_summary(contiguous_placement(e, n), loads)
                after = load_summary(balanced_placement(loads, n, hot), loads)
                rows.append({"layer": name, "devices": n, "replicate_hot": hot, "before_max": before["max"],
                             "after_max": after["max"], "mean": before["mean"],
                             "before_imbalance": before["imbalance"], "after_imbalance": after["imbalance"]})
    return rows


def timed(fn, *args, repeats=5):
    fn(*args).block_until_ready()  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="ep_overlap.json")
    ap.add_argument("--calibration-bytes", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()

    model = load_default_model()
    tokens = np.frombuffer(data.heldout_bytes()[: args.batch * args.seq], np.uint8).astype(np.int32)
    tokens = tokens.reshape(args.batch, args.seq)
    program = moejax.trace(model, tokens)
    calib = np.frombuffer(data.train_bytes(args.calibration_bytes), np.uint8).astype(np.int32)
    t0 = time.perf_counter()
    profile = measure_routing(program, [calib[None, :]])
    print(f"profile: {calib.size} calibration bytes in {time.perf_counter() - t0:.1f}s")
    rows = placement_table(profile)
    print("\nload per device (routed slots on calibration data), contiguous -> balanced LPT placement")
    print(f"{'layer':14} {'n':>2} {'rep':>3} {'max before':>10} {'max after':>9} {'mean':>8} {'imb before':>10} "
          f"{'imb after':>9}")
    for r in rows:
        print(f"{r['layer']:14} {r['devices']:>2} {r['replicate_hot']:>3} {r['before_max']:>10.0f} "
              f"{r['after_max']:>9.0f} {r['mean']:>8.0f} {r['before_imbalance']:>10.3f} {r['after_imbalance']:>9.3f}")

    ref = program(tokens)
    prof_prog = program.replace(metadata=analysis.write(program.metadata, profile))
    exact = []
    for n, chunks, hot in ((2, 1, 0), (4, 2, 0), (8, 1, 0), (8, 2, 8)):
        ep = expert_parallel_program(prof_prog, expert_mesh(n), overlap_chunks=chunks, replicate_hot=hot)
        dev = float(np.max(np.abs(np.asarray(ep(tokens)) - np.asarray(ref))))
        t = timed(ep, tokens)
        exact.append({"devices": n, "chunks": chunks, "replicate_hot": hot, "max_abs_dev": dev, "seconds": t})
    t_single = timed(program, tokens)
    print(f"\nexactness and CPU wall time (tokens {tokens.shape}, single device {t_single * 1e3:.1f} ms)")
    for r in exact:
        print(f"  n={r['devices']} chunks={r['chunks']} replicate_hot={r['replicate_hot']}: "
              f"max |dev| {r['max_abs_dev']:.2e}, {r['seconds'] * 1e3:.1f} ms")

    exports = []
    for chunks in (1, 2, 4):
        ep = expert_parallel_program(program, abstract_expert_mesh(8), overlap_chunks=chunks, layout="shard")
        for platform in ("tpu", "cuda"):
            counts = count_collectives(export_program(ep, [platform]))
            exports.append({"chunks": chunks, "platform": platform, "all_to_all": counts["all_to_all"],
                            "moe_layers": len(profile)})
    print("\nexported for 8 devices (jax.export, abstract mesh): all_to_all ops")
    for r in exports:
        print(f"  {r['platform']:4} chunks={r['chunks']}: {r['all_to_all']} all_to_all for {r['moe_layers']} MoE layers")
    with open(args.out, "w") as f:
        json.dump({"placement": rows, "exactness": exact, "single_device_s": t_single, "exports": exports,
                   "tokens": list(tokens.shape), "calibration_bytes": int(calib.size),
                   "jax": jax.__version__}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
