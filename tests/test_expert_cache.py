"""The expert cache's known answers, the slow tiers, and budget spellings (no model needed)."""
import gc

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.expert_cache import ExpertCache
from moejax.expert_store import DiskExpertStore, HostExpertStore, split_site_experts
from moejax.passes.offload import resident_bytes
from moejax.pipeline import PassError


# --------------------------------------------------------------------------
# The cache's bookkeeping on traces with known answers.
# --------------------------------------------------------------------------
def _replay(cache: ExpertCache, trace: str) -> int:
    hits = 0
    for key in trace:
        if cache.lookup(key):
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
            if cache.lookup((site, 0)):
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
    gc.collect()
    assert not path.exists()


def test_host_store_reads_back():
    store = HostExpertStore(_sites())
    assert np.array_equal(store.read(0, 3)[0], np.arange(4 * 8 * 6, dtype=np.float32).reshape(4, 8, 6)[3])
    assert store.describe()["memory_kind"] in ("pinned_host", "numpy")


# --------------------------------------------------------------------------
# Options.
# --------------------------------------------------------------------------
def test_resident_budget_spellings():
    assert resident_bytes(0.25, 1000) == 250
    assert resident_bytes("64MB", 0) == 64 * 10**6
    assert resident_bytes("1.5GiB", 0) == int(1.5 * 2**30)
    assert resident_bytes(4096, 10) == 4096
    with pytest.raises(PassError, match="fraction"):
        resident_bytes("lots", 10)
