"""Tests of the routing-profile pass (passes/profile.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import dialect
from moejax.analysis import RoutingProfile
from moejax.models import MoEDecoder, tiny_mixtral
from moejax.passes import profile as prof
from moejax.pipeline import PassContext, PassError

E, D, F, K, V = 4, 8, 12, 2, 16


def _one_layer_params(seed=0):
    r = np.random.default_rng(seed)
    return {
        "emb": jnp.asarray(r.normal(size=(V, D)), jnp.float32),
        "router": jnp.asarray(r.normal(size=(D, E)) * 2, jnp.float32),
        "w_gate": jnp.asarray(r.normal(size=(E, D, F)) / 3, jnp.float32),
        "w_up": jnp.asarray(r.normal(size=(E, D, F)) / 3, jnp.float32),
        "w_down": jnp.asarray(r.normal(size=(E, F, D)) / 3, jnp.float32),
    }


def _one_layer(params, tokens):
    x = params["emb"][tokens]
    return dialect.sparse_moe(x, params["router"], (params["w_gate"], params["w_up"], params["w_down"]),
                              routing=dialect.Routing(k=K), name="moe")


def test_profile_matches_direct_computation():
    """Counts, mass, co-activation, output means and inputs against a numpy re-computation."""
    params = _one_layer_params()
    tokens = np.random.default_rng(1).integers(0, V, (2, 5)).astype(np.int32)
    program = moejax.trace(_one_layer, jnp.asarray(tokens), params=params)
    # Two calibration batches of other shapes: one longer row (split) and short rows (padded, masked).
    cal = [np.random.default_rng(2).integers(0, V, (1, 13)), np.random.default_rng(3).integers(0, V, (3, 4))]
    p = prof.measure_routing(program, cal)["moe"]
    toks = np.concatenate([cal[0].ravel(), cal[1].ravel()])
    x = np.asarray(params["emb"])[toks]
    w, ids = dialect.route_reference(jnp.asarray(x), params["router"], routing=dialect.Routing(k=K))
    w, ids = np.asarray(w), np.asarray(ids)
    counts = np.bincount(ids.ravel(), minlength=E).astype(float)
    assert p["tokens"] == len(toks) == 25
    np.testing.assert_array_equal(p["counts"], counts[None])
    np.testing.assert_allclose(p["frequency"], (counts / counts.sum())[None])
    np.testing.assert_allclose(p["mass"][0], np.bincount(ids.ravel(), weights=w.ravel(), minlength=E), rtol=1e-6)
    onehot = np.zeros((len(toks), E))
    onehot[np.arange(len(toks))[:, None], ids] = 1
    np.testing.assert_array_equal(p["coactivation"][0], onehot.T @ onehot)
    assert p["mean_active"] == pytest.approx(2.0)
    # mean expert output (before combine weights) over the tokens routed to each expert
    for e in range(E):
        rows = x[(ids == e).any(1)]
        h = jax.nn.silu(rows @ np.asarray(params["w_gate"][e])) * (rows @ np.asarray(params["w_up"][e]))
        want = np.asarray(h @ np.asarray(params["w_down"][e])).mean(0) if len(rows) else np.zeros(D)
        np.testing.assert_allclose(p["output_mean"][0, e], want, rtol=2e-4, atol=2e-5)
    assert p["inputs"].shape == (1, 25, D)
    np.testing.assert_allclose(p["inputs"][0], x, rtol=1e-6)
    assert p["output_mean"].dtype == np.float32 and p["counts"].dtype == np.float64


def test_scanned_layers_give_stacked_profile_and_decode_reuses_it():
    model = MoEDecoder(tiny_mixtral(scan_layers=True), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
    cal = [np.random.default_rng(1).integers(0, 64, (3, 8))]
    program = moejax.trace(model, tokens)
    ctx = PassContext(example_args=(tokens,), calibration=cal)
    out = prof.ProfileRouting().run(program, ctx)
    p = out.metadata["routing_profile"]["layers/*/mlp"]
    assert p["counts"].shape == (2, 4) and p["coactivation"].shape == (2, 4, 4)
    assert p["output_mean"].shape == (2, 4, 32) and p["inputs"].shape == (2, 24, 32)
    np.testing.assert_array_equal(p["counts"].sum(1), [24 * 2, 24 * 2])  # 24 tokens x k=2 per layer
    np.testing.assert_allclose(p["frequency"].sum(1), 1.0)
    np.testing.assert_array_equal(np.diagonal(p["coactivation"], axis1=1, axis2=2), p["counts"])
    assert not np.allclose(p["counts"][0], p["counts"][1])  # the two layers route differently
    assert ctx.analysis.get(RoutingProfile, "profile#0").to_metadata() is out.metadata["routing_profile"]
    # A second context sharing the analysis (the decode program) reuses the profile without running.
    d_ctx = PassContext(example_args=(tokens,), calibration=None, analysis=ctx.analysis)
    again = prof.ProfileRouting().run(program, d_ctx)
    assert again.metadata["routing_profile"] is out.metadata["routing_profile"]


def test_decode_program_without_prefill_profile_errors():
    model = MoEDecoder(tiny_mixtral(), rngs=nnx.Rngs(0))
    tok = jnp.zeros((1, 1), jnp.int32)
    program = moejax.trace(model, tok, cache=model.init_cache(1, 4), cache_index=jnp.asarray(0, jnp.int32))
    with pytest.raises(PassError, match="only input is int tokens"):
        prof.ProfileRouting().run(program, PassContext(example_args=(tok,), calibration=[np.zeros((1, 4))]))


def test_batch_option_must_match_program():
    params = _one_layer_params()
    program = moejax.trace(_one_layer, jnp.zeros((2, 5), jnp.int32), params=params)
    with pytest.raises(PassError, match="traced for batch 2"):
        prof.ProfileRouting(batch=4).run(program, PassContext(calibration=[np.zeros((2, 5), np.int32)]))
    with pytest.raises(PassError, match="calibration_bytes"):
        moejax.parse_pipeline("profile(calibration_bytes=0)")


def test_heatmap_png(tmp_path):
    profile = {"layers/*/mlp": {"frequency": np.array([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])},
               "layers/9/mlp": {"frequency": np.array([[0.5, 0.5]])}}
    path = prof.save_load_heatmap(profile, tmp_path / "load.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
