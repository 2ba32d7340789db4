"""Expert quantization on the default model: quality (bits per byte) and decode speed, side by side.

    python benchmarks/quantize_speed.py                       # both tables
    python benchmarks/quantize_speed.py --skip-speed --eval-bytes 131072
    python benchmarks/quantize_speed.py --skip-quality --decode-tokens 32

Quality: each pipeline is run by ``moejax.optimize`` on the bundled default
model and scored on the first ``--eval-bytes`` of the shipped held-out text
(``moejax.evaluation.bits_per_byte``, windows of 256 bytes, batch 8); the table
gives expert bytes, bits/byte and the change against float.

Speed: greedy-decode steps (one token per sequence per step, KV cache of
``256 + decode_tokens``) at batch 1 and 8 of the decode program after
``select-impl`` (the fastest CPU expert implementation) and, for the quantized
rows, ``quantize``; tokens/s are medians of ``--repeats`` timed runs, and ratios
are against float in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import moejax
from moejax import data, evaluation, lowering
from moejax.models import default_model
from moejax.passes import profile as _profile  # noqa: F401  (registers 'profile')
from moejax.passes import quantize as _quantize  # noqa: F401  (registers 'quantize')
from moejax.pipeline import PassContext, PassManager

QUALITY_ROWS = [
    ("float", []),
    ("int8", ["quantize(bits=8)"]),
    ("int4-g128", ["quantize(bits=4,group_size=128)"]),
    ("int4-g64", ["quantize(bits=4,group_size=64)"]),
    ("int4-g64-asym-clip", ["quantize(bits=4,group_size=64,symmetric=false,clip_search=true)"]),
    ("int3-g64 (uniform)", ["quantize(bits=3,group_size=64)"]),
    ("mixed 3.0-g64", ["profile", "quantize(bits=3,mixed=true,group_size=64)"]),
    ("int2-g64 (uniform)", ["quantize(bits=2,group_size=64)"]),
]
SPEED_ROWS = [("float", []), ("int8", ["quantize(bits=8)"]), ("int4-g128", ["quantize(bits=4,group_size=128)"])]


def quality(model, eval_bytes: int, rows, seq_len: int = 256, batch: int = 8) -> list[dict]:
    text = data.heldout_bytes(eval_bytes)
    example = (jnp.zeros((batch, seq_len), jnp.int32),)
    out = []
    for label, passes in rows:
        t0 = time.perf_counter()
        # select-impl last: the fast CPU expert implementation (exact; its check lives in its own tests)
        opt = moejax.optimize(model, example, list(passes) + ["select-impl"], check_exact=False)
        bpb = evaluation.bits_per_byte(opt, text, seq_len=seq_len, batch=batch)
        st = opt.stages[-1].stats
        out.append({"variant": label, "pipeline": ",".join(passes) or "(none)", "expert_bytes": st["expert_bytes"],
                    "total_bytes": st["total_bytes"], "bits_per_byte": bpb, "seconds": time.perf_counter() - t0})
        print(f"  {label:20s} {bpb:.4f} bpb  expert {st['expert_bytes'] / 1e6:.3f} MB  "
              f"({out[-1]['seconds']:.0f}s)", flush=True)
    base = out[0]["bits_per_byte"]
    for r in out:
        r["delta_pct"] = 100.0 * (r["bits_per_byte"] / base - 1.0)
    return out


def _decode_program(model, batch: int, passes, max_len: int):
    tok = jnp.zeros((batch, 1), jnp.int32)
    cache = model.init_cache(batch, max_len)
    idx = jnp.asarray(0, jnp.int32)
    program = moejax.trace(model, tok, cache=cache, cache_index=idx)
    ctx = PassContext(example_args=(tok,), example_kwargs={"cache": cache, "cache_index": idx})
    stages = PassManager(list(passes) + ["select-impl"], check_exact=False).run(program, ctx)
    return lowering.inline_dialect(stages[-1].program), stages[-1].stats, cache


def decode_speed(model, batch: int, passes, tokens: int, repeats: int, prompt_len: int = 256) -> dict:
    program, st, cache0 = _decode_program(model, batch, passes, prompt_len + tokens)
    run = jax.jit(program.as_function())
    weights = program.weight_leaves
    cache_leaves = jax.tree_util.tree_leaves(cache0)
    treedef = jax.tree_util.tree_structure(cache0)

    def steps():
        tok = jnp.zeros((batch, 1), jnp.int32)
        cache = cache_leaves
        for i in range(tokens):
            logits, *cache = run(weights, tok, *cache, jnp.asarray(prompt_len + i, jnp.int32))
            tok = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
        return tok

    jax.block_until_ready(steps())  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(steps())
        times.append(time.perf_counter() - t0)
    del treedef
    return {"tokens_per_s": batch * tokens / statistics.median(times), "expert_bytes": st["expert_bytes"],
            "ffn_impls": st["ffn_impls"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-bytes", type=int, default=65536, help="held-out bytes scored per variant")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--rows", default="", help="comma-separated variant labels to run (default: all)")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args(argv)
    model = default_model.load_default_model()
    pick = [r.strip() for r in args.rows.split(",") if r.strip()]
    result: dict = {"platform": jax.default_backend(), "devices": str(jax.devices())}
    if not args.skip_quality:
        rows = [r for r in QUALITY_ROWS if not pick or r[0] in pick]
        print(f"quality: first {args.eval_bytes} bytes of held-out text", flush=True)
        q = quality(model, args.eval_bytes, rows)
        result["quality"] = q
        print(f"\n{'variant':20s} {'expert MB':>9s} {'bits/byte':>9s} {'vs float':>9s}")
        for r in q:
            print(f"{r['variant']:20s} {r['expert_bytes'] / 1e6:9.3f} {r['bits_per_byte']:9.4f} {r['delta_pct']:+8.2f}%")
    if not args.skip_speed:
        speed = []
        for label, passes in SPEED_ROWS:
            row = {"variant": label}
            for b in (1, 8):
                r = decode_speed(model, b, passes, args.decode_tokens, args.repeats)
                row[f"b{b}_tokens_per_s"] = r["tokens_per_s"]
                row["expert_bytes"] = r["expert_bytes"]
                row["ffn_impls"] = r["ffn_impls"]
            speed.append(row)
            print(f"  {label}: {row['b1_tokens_per_s']:.1f} / {row['b8_tokens_per_s']:.1f} tok/s (b1/b8)", flush=True)
        base = speed[0]
        print(f"\n{'variant':12s} {'expert MB':>9s} {'b1 tok/s':>9s} {'ratio':>6s} {'b8 tok/s':>9s} {'ratio':>6s}")
        for r in speed:
            print(f"{r['variant']:12s} {r['expert_bytes'] / 1e6:9.3f} {r['b1_tokens_per_s']:9.1f} "
                  f"{r['b1_tokens_per_s'] / base['b1_tokens_per_s']:6.2f} {r['b8_tokens_per_s']:9.1f} "
                  f"{r['b8_tokens_per_s'] / base['b8_tokens_per_s']:6.2f}")
        result["speed"] = speed
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
