"""Shared test fixtures: tiny models in both layer forms, on CPU."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests trace the same tiny models, and every Program jits afresh: a persistent
# compilation cache (keyed by the compiled HLO, so never stale) lets identical programs
# compile once. One directory per xdist worker; subprocess workers inherit it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"moejax-test-jax-cache-{os.getuid()}-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# The suite is compile-bound (hundreds of tiny programs): LLVM's backend optimisations cost more
# than they save here. HLO passes (fusion, buffer assignment) still run, so the programs are the
# ones users get; only their machine code is less tuned. Measured on 2 cores, fresh cache:
# test_export_round_trip.py + test_blocked_ffn.py 414 s -> 271 s; runtime-bound quality tests +7%.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from moejax import models  # noqa: E402


@pytest.fixture(params=[False, True], ids=["unrolled", "scanned"])
def tiny_model(request):
    return models.MoEDecoder(models.tiny_mixtral(scan_layers=request.param), rngs=nnx.Rngs(0))


@pytest.fixture
def tokens():
    return (jnp.arange(2 * 7, dtype=jnp.int32).reshape(2, 7) * 5) % 64
