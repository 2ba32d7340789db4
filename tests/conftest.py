"""Shared test fixtures: tiny models in both layer forms, on CPU."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
