"""Grouped matmul kernels in interpret mode against jax.lax.ragged_dot and megablox."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.pallas_kernels import gmm, gmm_gated, make_group_metadata, quantize
from moejax.pallas_kernels.tiling import choose_tiling, tiling_override

RNG = np.random.default_rng(0)
M, K, N = 37, 40, 24          # none a multiple of the 16-tiles below
SIZES = [10, 0, 17, 6]        # an empty group, rows 33..36 are padding
LHS = RNG.standard_normal((M, K)).astype(np.float32)  # numpy: slicing inputs costs no compile
RHS = RNG.standard_normal((4, K, N)).astype(np.float32)
RHS2 = RNG.standard_normal((4, K, N)).astype(np.float32)
GS = np.asarray(SIZES, np.int32)
ROWS = np.arange(M)


def _rows_in(lo, hi):
    return ((ROWS >= lo) & (ROWS < hi))[:, None]


def np_ragged(lhs, rhs, sizes, offset=0):
    """float64 numpy reference: rows of group g times rhs[g - offset]; other rows zero."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[-1]))
    start = 0
    for g, size in enumerate(sizes):
        if 0 <= g - offset < rhs.shape[0]:
            out[start:start + size] = lhs[start:start + size] @ rhs[g - offset]
        start += size
    return out


@functools.partial(jax.jit, static_argnames=("backend", "tiling", "epilogue", "offset"))
def _gmm(lhs, rhs, gs, *, backend, tiling, epilogue="none", offset=None):
    return gmm(lhs, rhs, gs, tiling=tiling, backend=backend, interpret=True, epilogue=epilogue,
               group_offset=offset)


def test_metadata_visits_each_tile_once_per_group():
    meta = jax.jit(make_group_metadata, static_argnums=(1, 2, 4))(GS, M, 16, 0, 4)
    nv = int(meta.num_visits)
    # group 0: rows 0-9 (tile 0); group 2: rows 10-26 (tiles 0, 1); group 3: rows 27-32 (tiles 1, 2)
    assert nv == 5
    assert meta.group_ids[:nv].tolist() == [0, 2, 2, 3, 3]
    assert meta.m_tile_ids[:nv].tolist() == [0, 0, 1, 1, 2]
    assert meta.offsets.tolist() == [0, 10, 10, 27, 33]
    # padding visits repeat the last real one (no new output block)
    assert set(meta.m_tile_ids[nv:].tolist()) <= {2} and set(meta.group_ids[nv:].tolist()) <= {3}
    local = jax.jit(make_group_metadata, static_argnums=(1, 2, 4))(GS, M, 16, 2, 2)
    nl = int(local.num_visits)
    assert local.group_ids[:nl].tolist() == [2, 2, 3, 3] and local.m_tile_ids[:nl].tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize("backend", ["mosaic", "triton"])
def test_float_gmm_matches_ragged_dot_ragged_shapes_and_empty_group(backend):
    out = _gmm(LHS, RHS, GS, backend=backend, tiling=(16, 16, 16))
    ref = jax.lax.ragged_dot(LHS, RHS, GS)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    assert float(jnp.abs(out[33:]).max()) == 0.0  # padding rows are zero


def test_float_gmm_matches_megablox_interpret():
    from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm
    lhs = LHS[:32]  # megablox needs m divisible by tm
    gs = jnp.asarray([10, 0, 17, 5], jnp.int32)
    ref = megablox_gmm(lhs, RHS, gs, tiling=(16, 16, 16), interpret=True)
    out = _gmm(lhs, RHS, gs, backend="mosaic", tiling=(16, 16, 16))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out, np_ragged(lhs, RHS, [10, 0, 17, 5]), atol=2e-5, rtol=1e-5)


def test_group_offset_leaves_other_groups_zero_and_single_group():
    out = _gmm(LHS, RHS[1:3], GS, backend="mosaic", tiling=(16, 16, 16), offset=1)
    np.testing.assert_allclose(out, np_ragged(LHS, RHS[1:3], SIZES, offset=1), atol=2e-5, rtol=1e-5)
    assert not np.any(np.asarray(out)[~_rows_in(10, 27)[:, 0]])
    # a single group holding every row, with the default (table) tiling
    one = gmm(LHS, RHS[:1], jnp.asarray([M], jnp.int32), interpret=True, backend="interpret")
    np.testing.assert_allclose(one, np_ragged(LHS, RHS[:1], [M]), atol=2e-5, rtol=1e-5)


def test_bf16_inputs_accumulate_in_f32():
    lhs, rhs = LHS.astype(jnp.bfloat16), RHS.astype(jnp.bfloat16)
    out = _gmm(lhs, rhs, GS, backend="mosaic", tiling=(16, 16, 16))
    assert out.dtype == jnp.float32
    # exact products of the bf16 values, summed in f32: only summation order differs
    ref = np_ragged(np.asarray(lhs, np.float32), np.asarray(rhs, np.float32), SIZES)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5)
    out16 = gmm(lhs, rhs, GS, tiling=(16, 16, 16), backend="interpret", preferred_element_type=jnp.bfloat16)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), ref, atol=0.05, rtol=1e-2)


QUANT_CASES = [  # (backend, bits, group_size, symmetric, tiling)
    ("mosaic", 8, None, False, (16, 16, 16)),
    ("mosaic", 4, 8, True, (16, 16, 16)),     # two scale groups per k tile
    ("triton", 8, None, False, (16, 16, 16)),
    ("triton", 4, 16, True, (16, 16, 16)),    # k tile == group on Triton (k=32)
]


@pytest.mark.parametrize("backend,bits,group_size,symmetric,tiling", QUANT_CASES)
def test_quantized_gmm_matches_dequantized_ragged_dot(backend, bits, group_size, symmetric, tiling):
    k = K if bits == 8 or K % tiling[1] == 0 else 32
    lhs, rhs = LHS[:, :k], RHS[:, :k]
    qt = quantize(rhs, bits, group_size, symmetric)
    out = np.asarray(_gmm(lhs, qt, GS, backend=backend, tiling=tiling))
    np.testing.assert_allclose(out, np_ragged(lhs, qt.dequantize(jnp.float32), SIZES), atol=3e-5, rtol=1e-5)
    # distance to the float product stays under the format's bound sum_k |x_k| * scale_k / 2
    half_scale = np.repeat(np.asarray(qt.scale), k // qt.scale.shape[1], axis=1) / 2
    bound = np_ragged(np.abs(lhs), half_scale, SIZES) + 1e-4
    err = np.abs(out - np_ragged(lhs, rhs, SIZES))
    assert np.all(err <= bound), float(np.max(err - bound))


@pytest.mark.parametrize("backend,activation", [("mosaic", "swiglu"), ("triton", "geglu")])
def test_fused_gated_matches_unfused(backend, activation):
    out = gmm_gated(LHS, RHS, RHS2, GS, activation=activation, tiling=(16, 16, 16), backend=backend,
                    interpret=True)
    g, u = np_ragged(LHS, RHS, SIZES), np_ragged(LHS, RHS2, SIZES)
    erf = np.vectorize(math.erf)
    act = g / (1 + np.exp(-g)) if activation == "swiglu" else 0.5 * g * (1 + erf(g / np.sqrt(2)))
    np.testing.assert_allclose(out, act * u, atol=1e-4, rtol=1e-5)


def test_custom_vjp_gradients_match_ragged_dot():
    def loss(fn, lhs, rhs):
        return jnp.sum(jnp.sin(fn(lhs, rhs)))

    ours = jax.jit(jax.grad(functools.partial(
        loss, lambda a, b: gmm(a, b, GS, tiling=(16, 16, 16), backend="interpret")), argnums=(0, 1)))(LHS, RHS)
    ref = jax.grad(functools.partial(loss, lambda a, b: jax.lax.ragged_dot(a, b, GS)), argnums=(0, 1))(LHS, RHS)
    np.testing.assert_allclose(ours[0], ref[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours[1], ref[1], atol=1e-4, rtol=1e-4)


def test_choose_tiling_table_and_override_hook():
    assert choose_tiling(512, 4096, 14336, jnp.bfloat16, "tpu") == (128, 512, 512)
    tm, tk, tn = choose_tiling(64, 4096, 1024, jnp.bfloat16, "gpu", bits=4, group_size=128)
    assert tk == 128 and all(t & (t - 1) == 0 for t in (tm, tk, tn))
    tpu4 = choose_tiling(64, 4096, 1024, jnp.bfloat16, "tpu", bits=4, group_size=128)
    assert tpu4[1] % 256 == 0 and 4096 % tpu4[1] == 0
    with tiling_override(lambda m, k, n, dtype, platform, **q: (8, 8, 8) if platform == "cpu" else None):
        assert choose_tiling(37, 40, 24, jnp.float32, "cpu") == (8, 8, 8)
        assert choose_tiling(37, 40, 24, jnp.float32, "tpu") != (8, 8, 8)
    assert choose_tiling(37, 40, 24, jnp.float32, "cpu") != (8, 8, 8)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="pass group_offset"):
        gmm(LHS, RHS[:2], GS, backend="interpret")
    with pytest.raises(ValueError, match=r"rhs must be \[G, k=40, n\]"):
        gmm(LHS, RHS[:, :32], GS, backend="interpret")
    with pytest.raises(ValueError, match="must be a multiple of the group size"):
        gmm(LHS, quantize(RHS, 4, 8), GS, tiling=(16, 12, 16), backend="interpret")
    with pytest.raises(ValueError, match="powers of two"):
        gmm(LHS, RHS, GS, tiling=(16, 24, 16), backend="triton", interpret=True)
    with pytest.raises(ValueError, match="unknown Pallas backend"):
        gmm(LHS, RHS, GS, backend="metal")
    with pytest.raises(ValueError, match="use gmm_gated"):
        gmm(LHS, RHS, GS, epilogue="swiglu")
