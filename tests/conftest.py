"""Shared test fixtures: tiny models in both layer forms, on CPU."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests trace the same tiny models, and every Program jits afresh: a persistent
# compilation cache (keyed by the compiled HLO, so never stale) lets identical programs
# compile once. One directory for both xdist workers and their subprocesses: JAX's key
# includes the directory's path, so a directory per worker could never share an entry.
# (JAX writes entries unlocked: a read that races a write warns and compiles again.)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"moejax-test-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# The suite is compile-bound (hundreds of tiny programs): LLVM's backend optimisations cost more
# than they save here. HLO passes (fusion, buffer assignment) still run, so the programs are the
# ones users get; only their machine code is less tuned. Measured on 2 cores, fresh cache:
# test_export_round_trip.py + test_blocked_ffn.py 414 s -> 271 s; runtime-bound quality tests +7%.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from moejax import models  # noqa: E402


@pytest.fixture(params=[False, True], ids=["unrolled", "scanned"])
def tiny_model(request):
    return models.MoEDecoder(models.tiny_mixtral(scan_layers=request.param), rngs=nnx.Rngs(0))


@pytest.fixture(autouse=True)
def _full_optimization(request):
    """Undo ``JAX_DISABLE_MOST_OPTIMIZATIONS`` for tests marked ``full_optimization``. Measured one core
    each, 2026-12-03: the fine-grained distill quality row 213 s -> 169 s, the fine-grained model's
    quality test 30 s -> 20 s; compile-bound files as a whole are slower without the flag."""
    if request.node.get_closest_marker("full_optimization") is None:
        yield
        return
    was = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", was)


@pytest.fixture
def tokens():
    return (jnp.arange(2 * 7, dtype=jnp.int32).reshape(2, 7) * 5) % 64


# The slowest test files (cold-cache seconds on 2 cores, slowest first). Under
# ``-n 2 --dist loadfile`` xdist hands out files in collection order; starting with the
# longest ones lets the two workers finish together instead of one waiting on a late,
# long file. A file missing from the list (or renamed) only loses its place in the queue.
SLOWEST_FILES = (
    "test_benchmarks.py", "test_compression_quality.py", "test_cli.py", "test_offload_runtime.py",
    "test_export_hf.py", "test_export_round_trip.py", "test_sharding_ep.py", "test_fp8_checkpoint.py",
    "test_plan.py", "test_models_parity.py", "test_device_check.py", "test_offload.py", "test_expert_layout.py",
    "test_serialization.py", "test_sharding_multihost.py", "test_sharded_load.py", "test_pipeline.py",
    "test_quantize.py", "test_readme.py", "test_tokenizer.py", "test_evaluation.py",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "full_optimization: compile with LLVM's optimisations on (a test that "
                            "trains or scores a bundled model is runtime-bound, not compile-bound)")
    if hasattr(config.option, "loadscopereorder"):  # xdist: keep our order, not "most tests first"
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file
