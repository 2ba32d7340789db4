"""Expert offloading: decode speed, cache hit rate, prefetch quality and bytes moved per token.

    python benchmarks/offload.py                 # default model + a larger Mixtral-shaped model
    python benchmarks/offload.py --skip-large --tokens 16 --repeats 2

Each row is a pipeline run by ``moejax.optimize`` (``select-impl`` first, the
exact CPU expert implementation, then ``offload`` with the row's options):

* ``resident``: no offload pass, every expert in memory (the reference);
* ``naive``: ``offload(resident=0,prefetch=false)``: every routed expert is
  read from the disk tier at every step (no cache);
* ``cache R``: a resident cache of R of the expert bytes (LRU), no prefetch;
* ``cache R + prefetch``: the same plus next-layer prefetch.

Decode is teacher-forced on the shipped held-out text (each step feeds the
next real byte after a 32-byte prefill, batch 1), so routing sees natural
text rather than a greedy loop. The disk tier reads with O_DIRECT (page cache
bypassed). Rows are timed interleaved (every row once per round); tokens/s
is the median over rounds; the counters are summed over the timed rounds.

The projection columns are a cost model, not measurements: the decode time
per token if the measured bytes moved per token crossed PCIe 4.0 x16 (25
GB/s), PCIe 5.0 x16 (50 GB/s) or an NVMe 4.0 SSD (7 GB/s) with no overlap,
added to the measured time of the ``resident`` row.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import moejax  # noqa: E402
from moejax import data, offload  # noqa: E402
from moejax.models import MoEDecoder, default_model  # noqa: E402
from moejax.models.decoder import MoEConfig  # noqa: E402
from moejax import dialect  # noqa: E402

BANDWIDTHS = {"pcie4_x16": 25e9, "pcie5_x16": 50e9, "nvme4": 7e9}  # bytes/s, typical achievable
PREFILL = 32


def rows(budgets: list[float], prefetch_k: int) -> list[tuple[str, str]]:
    out = [("resident", "select-impl"), ("naive", "select-impl,offload(resident=0,prefetch=false)")]
    for r in budgets:
        out.append((f"cache {r:g}", f"select-impl,offload(resident={r},prefetch=false)"))
        k = f",prefetch_k={prefetch_k}" if prefetch_k else ""
        out.append((f"cache {r:g} + prefetch", f"select-impl,offload(resident={r}{k})"))
    return out


def large_model(smoke: bool = False) -> MoEDecoder:
    """A Mixtral-shaped model with random bf16 weights (8 experts, top-2), ~0.8 GB of experts."""
    from flax import nnx

    cfg = MoEConfig(vocab_size=256, d_model=768, n_layers=8, n_heads=12, n_kv_heads=4, d_ff_expert=2688,
                    n_experts=8, routing=dialect.Routing(k=2), family="mixtral")
    if smoke:
        cfg = cfg.replace(d_model=64, d_ff_expert=96, n_layers=2, n_heads=4, n_kv_heads=2)
    return MoEDecoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)


def bench_model(name: str, model, text: bytes, tokens: int, repeats: int, budgets: list[float],
                prefetch_k: int) -> list[dict]:
    stream = np.frombuffer(text[: PREFILL + tokens + 1], np.uint8).astype(np.int32)
    prompt = jnp.asarray(stream[None, :PREFILL])
    cache = model.init_cache(1, PREFILL + tokens + 1)
    examples = dict(decode_example=((prompt[:, :1],), {"cache": cache, "cache_index": jnp.int32(PREFILL)}),
                    extra_examples=[((prompt,), {"cache": cache, "cache_index": jnp.int32(0)})])
    configs = []
    for label, spec in rows(budgets, prefetch_k):
        t0 = time.perf_counter()
        opt = moejax.optimize(model, (prompt,), spec, **examples)
        print(f"  {name}: {label}: optimized in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        configs.append((label, spec, opt))

    def decode(opt):
        _, c = opt(prompt, cache=cache, cache_index=jnp.int32(0))
        for i in range(tokens):
            logits, c = opt(jnp.asarray(stream[None, PREFILL + i:PREFILL + i + 1]), cache=c,
                            cache_index=jnp.int32(PREFILL + i))
        return jax.block_until_ready(logits)

    reference = {}
    for label, _, opt in configs:  # warm-up: compile, fill caches; outputs must equal the resident row
        reference[label] = np.asarray(decode(opt))
        offload.reset_counters(opt)
    for label in reference:
        if not np.array_equal(reference[label], reference["resident"]):
            raise SystemExit(f"{name}: {label} decodes different logits than the resident model")
    times = {label: [] for label, _, _ in configs}
    for _ in range(repeats):
        for label, _, opt in configs:
            t0 = time.perf_counter()
            decode(opt)
            times[label].append(time.perf_counter() - t0)
    out = []
    base = None
    for label, spec, opt in configs:
        fields = offload.report_fields(opt)
        per_token = float(np.median(times[label])) / tokens
        if label == "resident":
            base = per_token
        moved = fields.get("bytes_moved_per_token") or 0.0
        row = {"model": name, "row": label, "pipeline": spec, "decode_tokens_per_s": 1.0 / per_token,
               "times_s": times[label], "expert_bytes": opt.stages[-1].stats["expert_bytes"],
               "resident_expert_bytes": fields.get("resident_expert_bytes"),
               "expert_cache_hit_rate": fields.get("expert_cache_hit_rate"),
               "hit_rate_per_layer": fields.get("hit_rate_per_layer"),
               "prefetch_recall": fields.get("prefetch_recall"),
               "prefetch_precision": fields.get("prefetch_precision"),
               "bytes_moved_per_token": moved if fields else 0.0}
        for bw_name, bw in BANDWIDTHS.items():
            row[f"projected_tok_s_{bw_name}"] = 1.0 / (base + moved / bw)
        out.append(row)
    naive = next(r for r in out if r["row"] == "naive")["decode_tokens_per_s"]
    for r in out:
        r["speedup_vs_naive"] = r["decode_tokens_per_s"] / naive
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=48, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budgets", default="1.0,0.5,0.25,0.125", help="resident fractions")
    ap.add_argument("--prefetch-k", type=int, default=0, help="experts predicted per token (0: the router's k)")
    ap.add_argument("--skip-large", action="store_true", help="only the bundled default model")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, for tests")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "offload.json"))
    args = ap.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    text = data.heldout_bytes()
    results = []
    models = [("default (float32, 4x8 experts)", lambda: default_model.load_default_model())]
    if not args.skip_large:
        models.append(("mixtral-shaped random (bf16, 8x8 experts)", lambda: large_model(args.smoke)))
    for name, make in models:
        results += bench_model(name, make(), text, args.tokens, args.repeats, budgets, args.prefetch_k)
    cols = ["model", "row", "decode_tokens_per_s", "speedup_vs_naive", "expert_cache_hit_rate", "prefetch_recall",
            "prefetch_precision", "bytes_moved_per_token", *(f"projected_tok_s_{b}" for b in BANDWIDTHS)]
    print(common.format_table(results, cols))
    if not args.smoke:
        common.write_json(args.out, {"benchmark": "offload", "date": datetime.date.today().isoformat(),
                                     "machine": common.machine_info(), "args": vars(args), "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
