"""Expert quantization on the default model: quality (bits per byte) and decode speed, side by side.

Run::

    python benchmarks/quantize_speed.py                                   # both tables, the committed rows
    python benchmarks/quantize_speed.py --skip-speed --eval-bytes 131072  # quality only, more text
    python benchmarks/quantize_speed.py --skip-quality --decode-tokens 32
    python benchmarks/quantize_speed.py --smoke                           # a tiny random model, seconds

Every row is one pipeline run by ``moejax.optimize`` and labelled with it; the
``float`` row (``select-impl`` alone) is the only exact one, every ``quantize`` row is
lossy (``exact=False``).

Quality: each pipeline (``QUALITY_ROWS``, then ``select-impl``) on the bundled default
model, scored on the first ``--eval-bytes`` of the shipped held-out text
(``moejax.evaluation.bits_per_byte``, windows of 256 bytes, batch 8): expert bytes,
bits/byte and the change against float. Not timed.

Speed: greedy decode steps (one token per sequence per step, KV cache of
``256 + decode_tokens``) at batch 1 and 8 through the optimised model's decode
signature (``SPEED_ROWS``: ``select-impl``, ``quantize(bits=8),select-impl``,
``quantize(bits=4,group_size=128),select-impl``). The rows of one batch size are
timed in interleaved rounds (``--repeats``, at least 3 by default; the JSON keeps every
round); ``x_float`` is float's median over the row's, from the same run. PyTorch is
not a contender here, so ``--threads`` sets XLA:CPU's (and the native kernel's) threads only (recorded).
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEFAULT_REPEATS, add_threads_argument, default_out, format_table,  # noqa: E402
                    pipeline_is_exact, result_payload, set_threads_or_exit, smoke_model, time_interleaved, write_json)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import moejax  # noqa: E402
from moejax import data, evaluation  # noqa: E402

# (variant label, pipeline); select-impl last: the fastest exact expert implementation here
QUALITY_ROWS = [
    ("float", "select-impl"),
    ("int8", "quantize(bits=8),select-impl"),
    ("int4-g128", "quantize(bits=4,group_size=128),select-impl"),
    ("int4-g64", "quantize(bits=4,group_size=64),select-impl"),
    ("int4-g64-asym-clip", "quantize(bits=4,group_size=64,symmetric=false,clip_search=true),select-impl"),
    ("int3-g64 (uniform)", "quantize(bits=3,group_size=64),select-impl"),
    ("mixed 3.0-g64", "profile,quantize(bits=3,mixed=true,group_size=64),select-impl"),
    ("int2-g64 (uniform)", "quantize(bits=2,group_size=64),select-impl"),
]
SPEED_ROWS = [("float", "select-impl"), ("int8", "quantize(bits=8),select-impl"),
              ("int4-g128", "quantize(bits=4,group_size=128),select-impl")]
# smoke: the tiny model's d=64 takes groups of 64 at most
SMOKE_QUALITY_ROWS = [("float", "select-impl"), ("int4-g64", "quantize(bits=4,group_size=64),select-impl")]
SMOKE_SPEED_ROWS = SMOKE_QUALITY_ROWS
PROMPT_LEN = 256


def quality(model: Any, eval_bytes: int, rows: Sequence[tuple[str, str]], seq_len: int, batch: int,
            calibration_bytes: int) -> list[dict[str, Any]]:
    """Bits per byte of each pipeline on the held-out text (one optimize call each)."""
    text = data.heldout_bytes(eval_bytes)
    example = (jnp.zeros((batch, seq_len), jnp.int32),)
    calibration = [data.calibration_tokens(calibration_bytes, seq_len)]  # for the mixed row's profile
    out = []
    for label, pipeline in rows:
        t0 = time.perf_counter()
        # check_exact=False: the score itself measures what each (mostly lossy) pipeline changed
        opt = moejax.optimize(model, example, pipeline, calibration=calibration, check_exact=False)
        bpb = evaluation.bits_per_byte(opt, text, seq_len=seq_len, batch=batch)
        st = opt.stages[-1].stats
        out.append({"variant": label, "pipeline": pipeline, "exact": pipeline_is_exact(pipeline),
                    "expert_bytes": st["expert_bytes"], "total_bytes": st["total_bytes"], "bits_per_byte": bpb,
                    "seconds": time.perf_counter() - t0})
        print(f"  {label:20s} {bpb:.4f} bpb  expert {st['expert_bytes'] / 1e6:.3f} MB  "
              f"({out[-1]['seconds']:.0f}s)", file=sys.stderr, flush=True)
    base = out[0]["bits_per_byte"]
    for r in out:
        r["delta_pct"] = 100.0 * (r["bits_per_byte"] / base - 1.0)
    return out


def _decode_steps(opt: moejax.OptimizedModel, batch: int, tokens: int, cache: Any) -> jax.Array:
    """``tokens`` greedy decode steps through the optimised model's decode signature."""
    tok = jnp.zeros((batch, 1), jnp.int32)
    for i in range(tokens):
        logits, cache = opt(tok, cache=cache, cache_index=jnp.asarray(PROMPT_LEN + i, jnp.int32))
        tok = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
    return tok


def decode_speed(model: Any, rows: Sequence[tuple[str, str]], batch: int, tokens: int, repeats: int,
                 threads: int) -> list[dict[str, Any]]:
    """Decode tokens/s of every pipeline at one batch size, timed interleaved."""
    tok = jnp.zeros((batch, 1), jnp.int32)
    cache = model.init_cache(batch, PROMPT_LEN + tokens)
    fns, stats = {}, {}
    for label, pipeline in rows:
        # the decode step is the program timed; optimize's main signature is that step too
        opt = moejax.optimize(model, (tok,), pipeline, example_kwargs={"cache": cache,
                                                                       "cache_index": jnp.int32(PROMPT_LEN)},
                              check_exact=False)
        fns[label] = functools.partial(_decode_steps, opt, batch, tokens, cache)
        stats[label] = (pipeline, opt.stages[-1].stats)
    timings = time_interleaved(fns, warmup=1, repeats=repeats, min_repeats=min(repeats, DEFAULT_REPEATS))
    base = timings[rows[0][0]].median
    out = []
    for label, tm in timings.items():
        pipeline, st = stats[label]
        out.append({"variant": label, "pipeline": pipeline, "exact": pipeline_is_exact(pipeline), "batch": batch,
                    "threads": threads, "decode_tokens": tokens, "tokens_per_s": batch * tokens / tm.median,
                    "x_float": base / tm.median, "median_s": tm.median, "times_s": list(tm.times),
                    "expert_bytes": st["expert_bytes"], "ffn_impls": st["ffn_impls"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-bytes", type=int, default=65536, help="held-out bytes scored per variant")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--batches", default="1,8", help="comma-separated decode batch sizes")
    ap.add_argument("--repeats", type=int, default=5, help=f"timed rounds (>= {DEFAULT_REPEATS} for results)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--rows", default="", help="comma-separated variant labels to run (default: all)")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, 2 rows, little text (tests)")
    add_threads_argument(ap)
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/quantize_speed.json; --smoke: a temp file)")
    args = ap.parse_args(argv)
    args.out = args.out or default_out("quantize_speed", args.smoke)
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not batches or min(batches) < 1 or args.repeats < 1 or args.decode_tokens < 1 or args.eval_bytes < 2:
        ap.error("--batches, --repeats and --decode-tokens must be >= 1, --eval-bytes >= 2")
    quality_rows, speed_rows = (SMOKE_QUALITY_ROWS, SMOKE_SPEED_ROWS) if args.smoke else (QUALITY_ROWS, SPEED_ROWS)
    pick = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [p for p in pick if p not in {label for label, _ in quality_rows + speed_rows}]
    if unknown:
        ap.error(f"--rows: unknown variant(s) {unknown}; choose from {', '.join(label for label, _ in quality_rows)}")
    quality_rows = [r for r in quality_rows if not pick or r[0] in pick]
    speed_rows = [r for r in speed_rows if not pick or r[0] in pick]
    threads = set_threads_or_exit(ap, args.threads)  # before the first JAX computation: XLA sizes its pool then

    start = time.perf_counter()
    if args.smoke:
        model, seq_len, batch, calib = smoke_model(), 32, 2, 1024
    else:
        from moejax.models import default_model

        model, seq_len, batch, calib = default_model.load_default_model(), 256, 8, 16384
    result: dict[str, Any] = {"quality": [], "speed": []}
    if not args.skip_quality and quality_rows:
        print(f"quality: first {args.eval_bytes} bytes of held-out text", file=sys.stderr, flush=True)
        result["quality"] = quality(model, args.eval_bytes, quality_rows, seq_len, batch, calib)
        print(format_table(result["quality"], ["variant", "pipeline", "exact", "expert_bytes", "bits_per_byte",
                                               "delta_pct"]), "\n")
    if not args.skip_speed and speed_rows:
        for b in batches:
            result["speed"] += decode_speed(model, speed_rows, b, args.decode_tokens, args.repeats,
                                            threads["threads"])
        print(format_table(result["speed"], ["variant", "pipeline", "exact", "batch", "expert_bytes", "tokens_per_s",
                                             "x_float"]))
    path = write_json(args.out, result_payload("quantize_speed", args, threads, result["speed"], smoke=args.smoke,
                                               quality=result["quality"], platform=jax.default_backend(),
                                               elapsed_s=time.perf_counter() - start))
    print(f"wrote {path} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
