"""The quantized weight format: packing, quantize/dequantize bounds, pytree behaviour."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.pallas_kernels.quant_format import (
    QuantizedTensor, dequantize_array, pack_int4, quantize, quantize_array, unpack_int4)


def _w(shape, seed=0):
    # numpy data: no per-shape compile for test inputs
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_pack_unpack_int4_exact_round_trip_and_layout():
    u = np.random.default_rng(0).integers(0, 16, (3, 10, 7)).astype(np.uint8)
    p = pack_int4(u)
    assert p.shape == (3, 5, 7) and p.dtype == jnp.uint8
    np.testing.assert_array_equal(unpack_int4(p), u)
    # byte i holds row 2i in the low nibble and row 2i+1 in the high nibble
    np.testing.assert_array_equal(np.asarray(p)[:, 1, :], u[:, 2, :] | (u[:, 3, :] << 4))


def test_pack_int4_other_axis_and_odd_length_error():
    u = np.random.default_rng(1).integers(0, 16, (4, 6)).astype(np.uint8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(u, axis=-1), axis=-1), u)
    with pytest.raises(ValueError, match="odd length"):
        pack_int4(jnp.zeros((5, 4), jnp.uint8))


@pytest.mark.parametrize("bits,group_size,symmetric", [
    (8, None, True), (8, None, False), (4, 16, True), (4, 16, False), (4, None, True), (8, 32, True)])
def test_dequantize_error_within_half_scale(bits, group_size, symmetric):
    w = _w((3, 64, 24)) * np.linspace(0.1, 3.0, 24, dtype=np.float32)  # columns of different ranges
    qt = quantize(w, bits, group_size, symmetric).validate()
    assert qt.shape == w.shape
    deq = np.asarray(qt.dequantize(jnp.float32))
    k = w.shape[-2]
    scale = np.repeat(np.asarray(qt.scale), k // qt.scale.shape[-2], axis=-2)
    err = np.abs(deq - w)
    assert np.all(err <= scale * 0.5 * (1 + 1e-5) + 1e-7), float(np.max(err / scale))
    # the bound is tight-ish: rounding uses the whole range
    assert float(np.max(err / scale)) > 0.3
    assert float(np.max(err) / np.max(np.abs(w))) < 2.0 / 2 ** bits


def test_storage_dtypes_shapes_and_format_names():
    w = _w((2, 32, 8))
    q8 = quantize(w, 8)
    assert q8.q.dtype == jnp.int8 and q8.q.shape == (2, 32, 8) and q8.scale.shape == (2, 1, 8)
    assert q8.zero is None and q8.format == "int8"
    q4 = quantize(w, 4, 16, symmetric=False)
    assert q4.q.dtype == jnp.uint8 and q4.q.shape == (2, 16, 8) and q4.scale.shape == (2, 2, 8)
    assert q4.zero.shape == (2, 2, 8) and q4.format == "int4-g16-asym"
    assert quantize(w, 4, 16).format == "int4-g16"
    assert q4.nbytes == 2 * 16 * 8 + 2 * (2 * 2 * 8 * 4)
    # symmetric int4 is offset binary in [1, 15]
    u = unpack_int4(quantize(w, 4, 16).q)
    assert int(u.min()) >= 1 and int(u.max()) <= 15


def test_plain_functions_match_class():
    w = _w((16, 6), 3)
    q, s, z = quantize_array(w, 4, 8, False)
    np.testing.assert_array_equal(dequantize_array(q, s, z, bits=4), quantize(w, 4, 8, False).dequantize())


def test_zero_weight_and_constant_groups_are_exact():
    w = np.zeros((8, 4), np.float32)
    w[:, 1] = 2.5
    for bits, sym in [(8, True), (8, False), (4, True), (4, False)]:
        np.testing.assert_allclose(quantize(w, bits, 4 if bits == 4 else None, sym).dequantize(), w, atol=1e-6)


def test_static_metadata_survives_scan_and_vmap_slices():
    qt = quantize(_w((3, 4, 32, 8)), 4, 16)  # [layers, E, k, n]
    leaves, treedef = jax.tree_util.tree_flatten(qt)
    assert len(leaves) == 2  # zero=None is no leaf

    def body(carry, layer):
        assert isinstance(layer, QuantizedTensor) and layer.shape == (4, 32, 8)
        return carry + layer.dequantize().sum(), None

    total, _ = jax.lax.scan(body, 0.0, qt)
    np.testing.assert_allclose(total, np.asarray(qt.dequantize()).sum(), rtol=1e-5)
    per_layer = jax.vmap(lambda t: t.dequantize())(qt)
    np.testing.assert_array_equal(per_layer, qt.dequantize())
    # an expert slice keeps the format
    one = jax.tree.map(lambda x: x[0, 1], qt)
    assert one.shape == (32, 8) and one.format == "int4-g16"
    np.testing.assert_array_equal(one.dequantize(), np.asarray(qt.dequantize())[0, 1])


def test_bad_input_errors_name_the_fix():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        quantize(_w((2, 30, 4)), 4, 16)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(_w((2, 32, 4)), 3)
    with pytest.raises(TypeError, match="float weight"):
        quantize(np.ones((4, 4), np.int32), 8)
    bad = QuantizedTensor(np.zeros((2, 16, 4), np.int8), np.ones((2, 2, 4), np.float32), bits=8)
    with pytest.raises(ValueError, match="scale shape"):
        bad.validate()
