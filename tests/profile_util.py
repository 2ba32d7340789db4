"""A routing-profile entry computed by hand from ``route_reference`` (shared by the expert-surgery tests)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from moejax import dialect


def hand_profile(x, router, routing: dialect.Routing) -> dict:
    """The profile keys prune and merge read, for tokens ``x [n, d]`` routed by ``router [d, E]``."""
    w, ids = (np.asarray(a) for a in dialect.route_reference(x, jnp.asarray(router, jnp.float32), routing=routing))
    n = routing.num_selected_experts(np.shape(router)[1])
    counts = np.bincount(ids[ids >= 0], minlength=n).astype(np.float64)
    mass = np.bincount(ids[ids >= 0], weights=w[ids >= 0], minlength=n)
    return {"counts": counts[None], "frequency": (counts / counts.sum())[None], "mass": mass[None],
            "inputs": np.asarray(x)[None], "tokens": x.shape[0], "mean_active": float((ids >= 0).sum() / x.shape[0])}
