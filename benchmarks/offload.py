"""Expert offloading: decode speed, cache hit rate, prefetch quality and bytes moved per token.

Run::

    python benchmarks/offload.py                 # default model + a larger Mixtral-shaped model (committed rows)
    python benchmarks/offload.py --skip-large --tokens 16 --repeats 3
    python benchmarks/offload.py --smoke --tokens 2 --large-tokens 2 --repeats 1 --budgets 0.25   # tests

Each row is a pipeline run by ``moejax.optimize`` (``select-impl`` first, the
exact CPU expert implementation, then ``offload`` with the row's options):

* ``resident``: no offload pass, every expert in memory (the reference);
* ``parts, all resident``: ``offload(resident=1.0,prefetch=false)``: the
  program run as parts with every expert cached (the runtime's own cost);
* ``naive``: ``offload(resident=0,prefetch=false)``: every routed expert is
  read from the disk tier at every step (no cache);
* ``cache R lru``: a resident cache of R of the expert bytes, LRU, no prefetch;
* ``cache R lru + prefetch``: the same plus next-layer prefetch (router's top-k);
* ``cache R next-use + prefetch top-3``: ``policy=next-use,prefetch_k=3``.

Every row is exact (``exact=True``: ``offload`` is an exact pass). Every offload row
must decode the very logits of ``parts, all resident`` (bit for bit, or the script
stops); their deviation from ``resident`` (the cut) is recorded.

Decode is teacher-forced on the shipped held-out text (each step feeds the
next real byte after a 32-byte prefill, batch 1), so routing sees natural
text rather than a greedy loop. The disk tier reads with O_DIRECT (page cache
bypassed). Rows are timed interleaved (every row once per round; ``--repeats``,
at least 3 by default, every round kept in ``times_s``); tokens/s is the median over
rounds; the counters are summed over the timed rounds. PyTorch is not a contender
here, so ``--threads`` sets XLA:CPU's (and the native kernel's) threads only, recorded with the
machine and date.

The projection columns are a cost model, not measurements: ``moved_fraction``
(bytes moved per token over the naive row's) applied to Mixtral-8x7B in bf16
(22.5 GB of routed experts per token when none is resident), as the decode
rate its transfers alone allow over PCIe 4.0 x16 (25 GB/s), PCIe 5.0 x16 (50
GB/s) or an NVMe 4.0 SSD (7 GB/s): no compute, no overlap.
"""
from __future__ import annotations

import argparse
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
from moejax.pipeline import is_exact, parse_pipeline  # noqa: E402

BANDWIDTHS = {"pcie4_x16": 25e9, "pcie5_x16": 50e9, "nvme4": 7e9}  # bytes/s, typical achievable
# Mixtral-8x7B, bf16: 32 layers x top-2 experts x (3 x 4096 x 14336 x 2 bytes) read per token if none is resident
MIXTRAL_8X7B_ROUTED_BYTES_PER_TOKEN = 32 * 2 * 3 * 4096 * 14336 * 2
PREFILL = 32


def rows(budgets: list[float], variants: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(label, pipeline) for the reference rows and every budget x variant."""
    out = [("resident", "select-impl"), ("parts, all resident", "select-impl,offload(resident=1.0,prefetch=false)"),
           ("naive", "select-impl,offload(resident=0,prefetch=false)")]
    for r in budgets:
        out += [(f"cache {r:g} {label}", f"select-impl,offload(resident={r}{opts})") for label, opts in variants]
    return out


# (label, offload options after resident=R)
VARIANTS = [("lru", ",prefetch=false"), ("lru + prefetch", ""),
            ("next-use + prefetch top-3", ",policy=next-use,prefetch_k=3")]
LARGE_VARIANTS = [("lru", ",prefetch=false"), ("next-use + prefetch top-3", ",policy=next-use,prefetch_k=3")]
SMOKE_VARIANTS = LARGE_VARIANTS[1:]  # smoke: one cache row per budget (each row compiles its own parts)


def large_model(smoke: bool = False) -> MoEDecoder:
    """A Mixtral-shaped model with random bf16 weights (4 layers x 8 experts, top-2), 396 MB of experts.

    ``smoke``: 2 layers x 4 experts of d=64 (every offload configuration compiles its own parts).
    """
    from flax import nnx

    cfg = MoEConfig(vocab_size=256, d_model=768, n_layers=4, n_heads=12, n_kv_heads=4, d_ff_expert=2688,
                    n_experts=8, routing=dialect.Routing(k=2), family="mixtral")
    if smoke:
        cfg = cfg.replace(d_model=64, d_ff_expert=96, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4)
    return MoEDecoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)


def bench_model(name: str, model, text: bytes, tokens: int, repeats: int, budgets: list[float],
                variants: list[tuple[str, str]], threads: int) -> list[dict]:
    stream = np.frombuffer(text[: PREFILL + tokens + 1], np.uint8).astype(np.int32)
    prompt = jnp.asarray(stream[None, :PREFILL])
    cache = model.init_cache(1, PREFILL + tokens + 1)
    examples = dict(decode_example=((prompt[:, :1],), {"cache": cache, "cache_index": jnp.int32(PREFILL)}),
                    extra_examples=[((prompt,), {"cache": cache, "cache_index": jnp.int32(0)})])
    configs = []
    for label, spec in rows(budgets, variants):
        t0 = time.perf_counter()
        # exactness is checked below on the decode logits themselves (the pass manager's checks are slow here)
        opt = moejax.optimize(model, (prompt,), spec, check_exact=False, **examples)
        print(f"  {name}: {label}: optimized in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        configs.append((label, spec, opt))

    def decode(opt):
        _, c = opt(prompt, cache=cache, cache_index=jnp.int32(0))
        for i in range(tokens):
            logits, c = opt(jnp.asarray(stream[None, PREFILL + i:PREFILL + i + 1]), cache=c,
                            cache_index=jnp.int32(PREFILL + i))
        return jax.block_until_ready(logits)

    logits = {}
    for label, _, opt in configs:  # warm-up: compile, fill caches
        logits[label] = np.asarray(decode(opt), np.float32)
        offload.reset_counters(opt)
    parts = logits["parts, all resident"]
    for label, out in logits.items():  # offloading itself must not change a bit
        if label != "resident" and not np.array_equal(out, parts):
            raise SystemExit(f"{name}: {label} decodes other logits than the same parts with every expert resident")
    cut_deviation = float(np.max(np.abs(parts - logits["resident"])))
    times = {label: [] for label, _, _ in configs}
    for _ in range(repeats):
        for label, _, opt in configs:
            t0 = time.perf_counter()
            decode(opt)
            times[label].append(time.perf_counter() - t0)
    out = []
    for label, spec, opt in configs:
        fields = offload.report_fields(opt)
        per_token = float(np.median(times[label])) / tokens
        moved = fields.get("bytes_moved_per_token") or 0.0
        row = {"model": name, "row": label, "pipeline": spec, "exact": all(is_exact(p) for p in parse_pipeline(spec)),
               "threads": threads, "decode_tokens_per_s": 1.0 / per_token,
               "times_s": times[label], "expert_bytes": opt.stages[-1].stats["expert_bytes"],
               "resident_expert_bytes": fields.get("resident_expert_bytes"),
               "expert_cache_hit_rate": fields.get("expert_cache_hit_rate"),
               "hit_rate_per_layer": fields.get("hit_rate_per_layer"),
               "prefetch_recall": fields.get("prefetch_recall"),
               "prefetch_precision": fields.get("prefetch_precision"),
               "bytes_moved_per_token": moved if fields else 0.0,
               "max_logit_deviation_vs_resident": 0.0 if label == "resident" else cut_deviation}
        out.append(row)
    naive = next(r for r in out if r["row"] == "naive")
    for r in out:
        r["speedup_vs_naive"] = r["decode_tokens_per_s"] / naive["decode_tokens_per_s"]
        # cost model (projections): the share of the routed experts' bytes each row moves, applied to
        # Mixtral-8x7B in bf16, over a link of each bandwidth, transfers only (no compute, no overlap)
        r["moved_fraction"] = r["bytes_moved_per_token"] / naive["bytes_moved_per_token"]
        for bw_name, bw in BANDWIDTHS.items():
            moved = r["moved_fraction"] * MIXTRAL_8X7B_ROUTED_BYTES_PER_TOKEN
            r[f"mixtral_8x7b_transfer_bound_tok_s_{bw_name}"] = bw / moved if moved else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=48, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=common.DEFAULT_REPEATS, help="timed rounds")
    ap.add_argument("--budgets", default="1.0,0.5,0.25,0.125", help="resident fractions")
    ap.add_argument("--skip-large", action="store_true", help="only the bundled default model")
    ap.add_argument("--large-tokens", type=int, default=8, help="decode steps per timed run, larger model")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model only, for tests")
    common.add_threads_argument(ap)
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/offload.json; --smoke: a temp file)")
    args = ap.parse_args(argv)
    args.out = args.out or common.default_out("offload", args.smoke)
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        ap.error(f"--budgets must be comma-separated fractions, got {args.budgets!r}")
    if not budgets or not all(0.0 <= b <= 1.0 for b in budgets):
        ap.error(f"--budgets must be fractions in [0, 1], got {args.budgets!r}")
    if min(args.tokens, args.large_tokens, args.repeats) < 1:
        ap.error("--tokens, --large-tokens and --repeats must be >= 1")
    try:
        threads = common.set_threads(args.threads)  # before the first JAX computation: XLA sizes its pool then
    except ValueError as err:
        ap.error(str(err))
    start = time.perf_counter()
    text = data.heldout_bytes()
    results = []
    if not args.smoke:
        results += bench_model("default (f32, 4 layers x 8 experts)", default_model.load_default_model(), text,
                               args.tokens, args.repeats, budgets, VARIANTS, threads["threads"])
    if not args.skip_large or args.smoke:
        name = "tiny random (bf16, 2 x 4 experts)" if args.smoke else "mixtral-shaped random (bf16, 4 x 8 experts)"
        results += bench_model(name, large_model(args.smoke), text,
                               args.large_tokens, args.repeats, budgets,
                               SMOKE_VARIANTS if args.smoke else LARGE_VARIANTS, threads["threads"])
    cols = ["model", "row", "decode_tokens_per_s", "speedup_vs_naive", "expert_cache_hit_rate", "prefetch_recall",
            "prefetch_precision", "bytes_moved_per_token", "moved_fraction",
            *(f"mixtral_8x7b_transfer_bound_tok_s_{b}" for b in BANDWIDTHS)]
    print(common.format_table(results, cols))
    path = common.write_json(args.out, common.result_payload("offload", args, threads, results, smoke=args.smoke,
                                                             elapsed_s=time.perf_counter() - start))
    print(f"wrote {path} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
