"""Expert offloading: exact outputs for every policy and layer form, the cache's known answers,
no recompilation while decoding, the slow tiers, and the pass's errors."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import models, offload
from moejax.expert_cache import ExpertCache
from moejax.expert_store import DiskExpertStore, HostExpertStore, split_site_experts
from moejax.passes.offload import resident_bytes
from moejax.pipeline import PassError

PROMPT, STEPS = 8, 6


def _model(scan_layers: bool = False, **overrides):
    cfg = models.tiny_mixtral(scan_layers=scan_layers, n_layers=3, n_experts=8, **overrides)
    return models.MoEDecoder(cfg, rngs=nnx.Rngs(0))


def _tokens(n: int, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (1, n), 0, 64, jnp.int32)


def _optimize(model, spec: str, **kw):
    """Optimize forward, prefill and decode signatures (``check_exact``: the pass manager checks each)."""
    tokens = _tokens(PROMPT)
    cache = model.init_cache(1, PROMPT + STEPS)
    return moejax.optimize(model, (tokens,), spec, decode_example=((tokens[:, :1],), {
        "cache": cache, "cache_index": jnp.int32(PROMPT)}), extra_examples=[((tokens,), {
            "cache": cache, "cache_index": jnp.int32(0)})], **kw)


def _decode(opt, model, steps: int = STEPS, seed: int = 1) -> np.ndarray:
    """Logits of a prefill then ``steps`` teacher-forced decode steps, stacked."""
    stream = _tokens(PROMPT + steps, seed)
    logits, cache = opt(stream[:, :PROMPT], cache=model.init_cache(1, PROMPT + STEPS), cache_index=jnp.int32(0))
    out = [np.asarray(logits)]
    for i in range(steps):
        logits, cache = opt(stream[:, PROMPT + i:PROMPT + i + 1], cache=cache, cache_index=jnp.int32(PROMPT + i))
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


@pytest.fixture(scope="module")
def unrolled():
    return _model()


@pytest.fixture(scope="module")
def reference(unrolled):
    """Decode logits of the program run as parts with every expert resident (no reads, no prefetch)."""
    opt = _optimize(unrolled, "select-impl,offload(resident=1.0,prefetch=false)", check_exact=False)
    plain = _decode(_optimize(unrolled, "select-impl", check_exact=False), unrolled)
    logits = _decode(opt, unrolled)
    # cutting the program into parts moves outputs by at most the pass's declared tolerance...
    tol = type(opt.passes[-1]).tolerance
    assert np.max(np.abs(logits - plain)) <= tol.atol + tol.rtol * np.max(np.abs(plain))
    return logits


# ...and offloading itself (budget, policy, tier, prefetch) changes no bit.
@pytest.mark.parametrize("options", [
    "resident=0.25", "resident=0.25,policy=lfu", "resident=0.25,policy=next-use,prefetch_k=3",
    "resident=0.125,prefetch=false", "resident=0,prefetch=false", "resident=1.0", "resident=0.5,tier=host"])
def test_offload_is_bit_exact(unrolled, reference, options):
    checked = options == "resident=0.25"  # the pass manager's own check (all signatures) once; it is slow
    opt = _optimize(unrolled, f"select-impl,offload({options})", check_exact=checked)
    assert (opt.stages[-1].max_deviation is not None) == checked
    offload.reset_counters(opt)
    assert np.array_equal(_decode(opt, unrolled), reference)
    fields = offload.report_fields(opt)
    assert fields["tokens"] == STEPS  # the decode program's calls
    assert fields["resident_expert_bytes"] == resident_bytes(float(options.split(",")[0].split("=")[1]),
                                                             opt.program.metadata["offload"]["expert_bytes"])


def test_offload_profile_policy_and_scanned_layers():
    model = _model(scan_layers=True)
    ref = _decode(_optimize(model, "select-impl,offload(resident=1.0,prefetch=false)", check_exact=False), model)
    opt = _optimize(model, "profile,select-impl,offload(resident=0.25,policy=profile,pin=2)",
                    calibration=[_tokens(32, 5)], check_exact=False)
    assert np.array_equal(_decode(opt, model), ref)
    runtime = offload.offloaded_programs(opt)[0].runtime
    assert len(runtime.cache.pinned) == 2 and runtime.cache.pinned <= set(runtime.resident)
    assert len(offload.report_fields(opt)["hit_rate_per_layer"]) == 3  # one per unrolled layer


def test_offload_quantized_stacked_experts_and_dropped_slots():
    """int4 experts in the stacked layout, and skip gating (dropped slots; a layer may route nowhere)."""
    model = _model()
    spec = "gating(skip_ratio=0.9),quantize(bits=4,group_size=16),select-impl(layout=stacked),offload"
    ref = _decode(_optimize(model, spec + "(resident=1.0,prefetch=false)", check_exact=False), model)
    opt = _optimize(model, spec + "(resident=0.25)", check_exact=False)
    assert np.array_equal(_decode(opt, model), ref)


def test_offload_counts_hits_and_prefetch(unrolled):
    opt = _optimize(unrolled, "select-impl,offload(resident=1.0,prefetch_k=8)", check_exact=False)
    _decode(opt, unrolled)  # warm-up: every expert becomes resident
    offload.reset_counters(opt)
    _decode(opt, unrolled)
    f = offload.report_fields(opt)
    assert f["expert_cache_hit_rate"] == 1.0 and f["bytes_moved"] == 0  # everything was resident after warm-up
    assert f["prefetch_recall"] == 1.0  # predicting all 8 experts cannot miss
    naive = _optimize(unrolled, "select-impl,offload(resident=0,prefetch=false)", check_exact=False)
    offload.reset_counters(naive)
    _decode(naive, unrolled)
    f = offload.report_fields(naive)
    assert f["expert_cache_hit_rate"] == 0.0 and f["prefetch_recall"] is None
    per_expert = naive.program.metadata["offload"]["expert_bytes"] // (3 * 8)
    assert f["bytes_moved_per_token"] == 3 * 2 * per_expert  # 3 layers x top-2, every step


# --------------------------------------------------------------------------
# The cache's bookkeeping on traces with known answers.
# --------------------------------------------------------------------------
def _replay(cache: ExpertCache, trace: str, site=None) -> int:
    hits = 0
    for key in trace:
        if cache.lookup(key, site):
            hits += 1
        else:
            assert cache.admit(key, 1) is not None
    return hits


def test_cache_known_answers():
    # Two slots: an alternating pair always hits after the first two misses...
    assert _replay(ExpertCache(2, "lru"), "ABABABAB") == 6
    # ...a cycle of three thrashes LRU completely (each key is evicted just before its reuse)...
    assert _replay(ExpertCache(2, "lru"), "ABCABCABC") == 0
    # ...while LFU keeps the frequent key (counts include lookups while evicted): B, C and D churn
    # the other slot and A hits on its return.
    assert _replay(ExpertCache(2, "lfu"), "AAAABCDBCDA") == 4
    assert _replay(ExpertCache(2, "lru"), "AAAABCDBCDA") == 3  # LRU evicts A for B and misses its return
    # The profile policy keeps the hot expert whatever the recency.
    profile = {"A": 0.9, "B": 0.05, "C": 0.05}
    assert _replay(ExpertCache(2, "profile", profile), "ABCACBA") == 3  # every return of A
    # next-use: sites 0, 1, 2 visited in a cycle, one expert each, two slots: it evicts the entry
    # whose site comes furthest ahead. Keys are (site, expert).
    cache = ExpertCache(2, "next-use")
    hits = 0
    for _ in range(4):
        for site in range(3):
            cache.cursor = (site, 3)
            if cache.lookup((site, 0), site):
                hits += 1
            else:
                cache.admit((site, 0), 1, protected=[(site, 0)])
    assert hits == 5  # Belady's optimum for this trace (every other lookup after warm-up); LRU: 0
    empty = ExpertCache(0, "lru")  # resident=0: nothing is ever kept
    assert not empty.lookup("A") and empty.admit("A", 1) is None and not empty.lookup("A")


def test_cache_protects_and_refuses():
    cache = ExpertCache(2, "lru")
    for key in "AB":
        cache.lookup(key)
        cache.admit(key, 1)
    assert cache.admit("C", 2, protected=["A"]) is None  # only B is evictable: no room for 2
    assert cache.admit("C", 1, protected=["A"]) == ["B"]
    cache.lookup("C")
    assert cache.admit("D", 1, cold=True) == ["A"]  # the least recently used
    assert cache.admit("E", 1) == ["D"]  # a cold (prefetched, unused) entry goes before C


# --------------------------------------------------------------------------
# No recompilation after warm-up.
# --------------------------------------------------------------------------
def test_offloaded_decode_does_not_recompile(unrolled):
    opt = _optimize(unrolled, "select-impl,offload(resident=0.25)", check_exact=False)
    _decode(opt, unrolled, seed=3)  # warm-up: compiles every part once
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        _decode(opt, unrolled, seed=4)  # other tokens: other experts, evictions, prefetches
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


# --------------------------------------------------------------------------
# Slow tiers.
# --------------------------------------------------------------------------
def _sites():
    w = [jnp.arange(4 * 8 * 6, dtype=jnp.float32).reshape(4, 8, 6) + i for i in range(2)]
    return [split_site_experts(w, 4)]


def test_disk_store_reads_back_and_cleans_up(tmp_path):
    store = DiskExpertStore(_sites(), str(tmp_path))
    got = store.read(0, 2)
    assert np.array_equal(got[1], np.arange(4 * 8 * 6, dtype=np.float32).reshape(4, 8, 6)[2] + 1)
    assert store.bytes_read == 2 * 8 * 6 * 4 and store.reads == 1
    path = store.path
    assert path.exists()
    del store, got
    import gc

    gc.collect()
    assert not path.exists()


def test_host_store_reads_back():
    store = HostExpertStore(_sites())
    assert np.array_equal(store.read(0, 3)[0], np.arange(4 * 8 * 6, dtype=np.float32).reshape(4, 8, 6)[3])
    assert store.describe()["memory_kind"] in ("pinned_host", "numpy")


# --------------------------------------------------------------------------
# Options and errors.
# --------------------------------------------------------------------------
def test_resident_budget_spellings():
    assert resident_bytes(0.25, 1000) == 250
    assert resident_bytes("64MB", 0) == 64 * 10**6
    assert resident_bytes("1.5GiB", 0) == int(1.5 * 2**30)
    assert resident_bytes(4096, 10) == 4096
    with pytest.raises(PassError, match="fraction"):
        resident_bytes("lots", 10)


@pytest.mark.parametrize("spec, match", [
    ("offload(policy=fifo)", "policy='fifo' is not one of"),
    ("offload(tier=ssd)", "tier='ssd' is not one of"),
    ("offload(resident=-1)", "resident must be >= 0"),
    ("offload(policy=profile)", "policy=profile needs a routing profile; add profile before offload"),
    ("offload(pin=2)", "pin needs a routing profile"),
    ("profile,offload(resident=1KB,pin=2)", "pinned experts do not fit the resident budget"),
    ("offload,offload", "already offloaded"),
    ("offload,select-impl", "offload as the last pass"),
    ("profile,quantize(bits=4,mixed=true,group_size=16),offload", "mixed-precision"),
])
def test_offload_errors(unrolled, spec, match):
    with pytest.raises(PassError, match=match):
        moejax.optimize(unrolled, (_tokens(PROMPT),), spec, calibration=[_tokens(32, 5)], check_exact=False)


def test_cli_table_shows_the_offload_fields():
    from moejax import cli

    rows = [{"pass": "select-impl", "expert_bytes": 8e6, "total_bytes": 9e6, "active_expert_flops_per_token": 1e6,
             "bits_per_byte": 1.6, "prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 50.0},
            {"pass": "offload", "expert_bytes": 8e6, "total_bytes": 9e6, "active_expert_flops_per_token": 1e6,
             "bits_per_byte": 1.6, "prefill_tokens_per_s": 90.0, "decode_tokens_per_s": 40.0,
             "resident_expert_bytes": 2e6, "expert_cache_hit_rate": 0.625, "prefetch_recall": 0.8,
             "bytes_moved_per_token": 1.5e6}]
    table = cli._fmt_table(rows)
    assert "hit rate" in table and "prefetch recall" in table and "MB moved/tok" in table
    assert "0.625" in table and "1.500" in table and "2.000" in table
