"""Expert weight formats (moejax/weight_formats.py): protocol, hand-made examples, tensors, layouts, the op.

Expected numbers in the hand-made examples are written out from each format's
formula, not computed by the code under test.
"""
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import deserialize, safe_open
from safetensors.numpy import save_file

import moejax
from moejax import dialect, expert_layout, rewrite
from moejax import weight_formats as wf

F8 = ml_dtypes.float8_e4m3fn


# --------------------------------------------------------------------------
# Hand-made examples: one per format.
# --------------------------------------------------------------------------
def test_int8_per_channel_hand_example():
    # w = (q - 0) * scale[column]
    t = wf.QuantizedTensor(jnp.array([[10, -20], [127, 0]], jnp.int8), jnp.array([[0.5, 0.25]], jnp.float32))
    assert t.format == "int8" and t.shape == (2, 2)
    np.testing.assert_array_equal(t.dequantize(), [[5.0, -5.0], [63.5, 0.0]])


def test_int4_groupwise_hand_example():
    # rows (k) = nibbles 9, 7 | 15, 8 (groups of 2), offset-binary zero 8 -> 1, -1 | 7, 0
    # bytes: 9 | 7 << 4 = 121, 15 | 8 << 4 = 143; group scales 0.5 and 2
    t = wf.QuantizedTensor(jnp.array([[121], [143]], jnp.uint8), jnp.array([[0.5], [2.0]], jnp.float32),
                           bits=4, group_size=2)
    assert t.format == "int4-g2" and t.shape == (4, 1)
    np.testing.assert_array_equal(t.dequantize(), [[0.5], [-0.5], [14.0], [0.0]])


def test_int2_asymmetric_hand_example():
    # codes 0 1 2 3 3 2 1 0 -> plane 0 (bit 0, row r in bit r) = 2+8+16+64 = 90, plane 1 = 4+8+16+32 = 60
    t = wf.LowBitTensor(jnp.array([[90], [60]], jnp.uint8), jnp.array([[0.5]], jnp.float32),
                        jnp.array([[1.0]], jnp.float32), bits=2, group_size=8, symmetric=False)
    assert t.format == "int2-g8-asym" and t.shape == (8, 1)
    np.testing.assert_array_equal(t.dequantize()[:, 0], [-0.5, 0, 0.5, 1, 1, 0.5, 0, -0.5])


def test_int3_symmetric_hand_example():
    # codes 4 5 3 7 1 4 6 2, zero 4 -> 0 1 -1 3 -3 0 2 -2; scale 0.25
    # planes: bit0 rows 1,2,3,4 -> 30; bit1 rows 2,3,6,7 -> 204; bit2 rows 0,1,3,5,6 -> 107
    t = wf.LowBitTensor(jnp.array([[30], [204], [107]], jnp.uint8), jnp.array([[0.25]], jnp.float32),
                        bits=3, group_size=8, symmetric=True)
    assert t.format == "int3-g8" and t.shape == (8, 1)
    np.testing.assert_array_equal(t.dequantize()[:, 0], [0, 0.25, -0.25, 0.75, -0.75, 0, 0.5, -0.5])


def test_mixed_hand_example():
    # part 0 holds one int8 expert (2 * 0.5 = 1), part 1 one int8 expert (3 * 2 = 6);
    # perm [1, 0]: expert 0 is row 1 of the concatenation (part 1), expert 1 is row 0.
    p0 = wf.QuantizedTensor(jnp.array([[[2]]], jnp.int8), jnp.array([[[0.5]]], jnp.float32))
    p1 = wf.QuantizedTensor(jnp.array([[[3]]], jnp.int8), jnp.array([[[2.0]]], jnp.float32), group_size=1)
    m = wf.MixedExpertTensor((p0, p1), jnp.array([1, 0], jnp.int32))
    assert m.shape == (2, 1, 1) and m.format == "mixed(int8x1,int8-g1x1)"
    np.testing.assert_array_equal(m.dequantize()[:, 0, 0], [6.0, 1.0])
    np.testing.assert_array_equal(wf.expert_slice(m, 0).dequantize(), [[6.0]])


def test_fp8_block_hand_example_with_partial_blocks():
    # checkpoint weight [out=3, in=2], blocks 2x2: out rows {0,1} use scale 2, row 2 (a partial block) scale 10
    weight = jnp.asarray(np.array([[1, 2], [-0.5, 1.5], [3, 4]], F8))
    t = wf.Fp8BlockTensor(weight, jnp.array([[2.0], [10.0]], jnp.float32), block_n=2, block_k=2)
    assert t.shape == (2, 3) and t.format == "fp8-e4m3-b2"
    # dequantized [out, in] = [[2, 4], [-1, 3], [30, 40]]; moejax [k=in, n=out] is its transpose
    np.testing.assert_array_equal(t.dequantize(), [[2, -1, 30], [4, 3, 40]])


def test_mxfp4_hand_example():
    # column 0: bytes 0x21 (low 1 -> 0.5, high 2 -> 1.0), 0xF8 (low 8 -> -0, high 15 -> -6), scale 128 -> x2
    # column 1: byte 0x73 (low 3 -> 1.5, high 7 -> 6.0), scale 125 -> x1/4
    blocks = np.zeros((2, 1, 16), np.uint8)
    blocks[0, 0, :2] = [0x21, 0xF8]
    blocks[1, 0, 0] = 0x73
    t = wf.Mxfp4Tensor(jnp.asarray(blocks), jnp.array([[128], [125]], jnp.uint8))
    assert t.shape == (32, 2) and t.format == "mxfp4"
    want = np.zeros((32, 2), np.float32)
    want[:4, 0] = [1.0, 2.0, -0.0, -12.0]
    want[:2, 1] = [0.375, 1.5]
    got = np.asarray(t.dequantize())
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[2, 0])  # -0 stays negative zero


# --------------------------------------------------------------------------
# Checkpoint formats at checkpoint sizes, and their quantizers.
# --------------------------------------------------------------------------
def test_fp8_default_blocks_on_shapes_the_blocks_do_not_divide():
    rng = np.random.default_rng(0)
    e, k, n = 2, 130, 200  # 130 = 128 + 2 and 200 = 128 + 72: partial edge blocks on both axes
    w = rng.standard_normal((e, k, n)).astype(np.float32) * np.array([1.0, 100.0])[:, None, None]
    t = wf.quantize_fp8_block(w)
    assert t.weight.dtype == jnp.float8_e4m3fn and t.weight.shape == (e, n, k)
    assert t.scale_inv.dtype == jnp.float32 and t.scale_inv.shape == (e, 2, 2)
    assert t.shape == (e, k, n) and t.format == "fp8-e4m3-b128"
    # The formula, by loops over the blocks (numpy only).
    wt, s = np.asarray(t.weight).astype(np.float32), np.asarray(t.scale_inv)
    want = np.empty((e, n, k), np.float32)
    for i in range(2):
        for j in range(2):
            want[:, i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (
                wt[:, i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] * s[:, i, j][:, None, None])
    np.testing.assert_array_equal(t.dequantize(), want.transpose(0, 2, 1))
    # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 (plus the subnormal floor of the block scale).
    err = np.abs(np.asarray(t.dequantize()) - w)
    scale = np.repeat(np.repeat(s, 128, 1)[:, :n], 128, 2)[:, :, :k].transpose(0, 2, 1)
    assert np.all(err <= np.abs(w) * 2.0 ** -4 + scale * 2.0 ** -9)


def test_mxfp4_quantizer_is_exact_on_representable_values_and_bounded_otherwise():
    rng = np.random.default_rng(1)
    lut = np.array(wf.E2M1_VALUES, np.float32)
    codes = rng.integers(0, 16, (3, 64, 5))
    codes[:, ::32, :] = 7  # every block holds a 6 so its exponent is the one chosen below
    exps = rng.integers(-5, 5, (3, 2, 5))
    w = lut[codes] * np.repeat(2.0 ** exps, 32, axis=1)
    t = wf.quantize_mxfp4(w)
    assert t.blocks.shape == (3, 5, 2, 16) and t.scales.shape == (3, 5, 2) and t.shape == (3, 64, 5)
    np.testing.assert_array_equal(t.dequantize(), w)
    np.testing.assert_array_equal(np.asarray(t.scales), (exps + 127).transpose(0, 2, 1))
    x = rng.standard_normal((2, 96, 3)).astype(np.float32)
    err = np.abs(np.asarray(wf.quantize_mxfp4(x).dequantize()) - x)
    amax = np.abs(x).reshape(2, 3, 32, 3).max(2)
    # spacing of e2m1 at the top is 2 (4 -> 6) in units of 2**(floor(log2 amax) - 2) <= amax / 4
    assert np.all(err <= np.repeat(amax, 32, axis=1) / 4 + 1e-7)
    with pytest.raises(ValueError, match="multiple of 32"):
        wf.quantize_mxfp4(np.ones((40, 2), np.float32))


# --------------------------------------------------------------------------
# Every format: tensors, slicing, layouts.
# --------------------------------------------------------------------------
E, K, N = 3, 64, 32


def _all_formats():
    w = np.random.default_rng(2).standard_normal((E, K, N)).astype(np.float32)
    mixed = wf.MixedExpertTensor((wf.quantize(w[:1], 8), wf.quantize_lowbit(w[1:], 3, 16)),
                                 jnp.array([1, 0, 2], jnp.int32))
    return {
        "float": jnp.asarray(w),
        "int8": wf.quantize(w, 8),
        "int4-g16": wf.quantize(w, 4, 16),
        "int8-asym": wf.quantize(w, 8, symmetric=False),
        "int3-g16-asym": wf.quantize_lowbit(w, 3, 16),
        "int2-g32": wf.quantize_lowbit(w, 2, 32, symmetric=True),
        "mixed": mixed,
        "fp8-e4m3-b128": wf.quantize_fp8_block(w),
        "mxfp4": wf.quantize_mxfp4(w),
    }


FORMATS = list(_all_formats())
_NP_DTYPES = {"F32": np.float32, "I8": np.int8, "U8": np.uint8, "I32": np.int32, "F8_E4M3": F8}


@pytest.fixture(scope="module")
def formats():
    return _all_formats()


@pytest.mark.parametrize("name", FORMATS)
def test_protocol(formats, name):
    w = formats[name]
    assert wf.is_structured(w) == (name != "float")
    assert wf.format_of(w).startswith(name.split("-")[0] if name != "mixed" else "mixed(")
    assert tuple(w.shape) == (E, K, N)
    assert wf.nbytes_of(w) == sum(x.nbytes for x in wf.to_tensors(w, "p").values())
    assert wf.dequantize(w, jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("name", FORMATS)
def test_safetensors_round_trip_is_bit_exact(formats, name, tmp_path):
    w = formats[name]
    prefix = "model.layers.0.mlp.experts.w"
    tensors = wf.to_tensors(w, prefix)
    path = str(tmp_path / "w.safetensors")
    save_file(tensors, path, metadata=wf.tensors_metadata(w, prefix) or None)
    with open(path, "rb") as f:
        loaded = {k: np.frombuffer(v["data"], _NP_DTYPES[v["dtype"]]).reshape(v["shape"])
                  for k, v in deserialize(f.read())}
    with safe_open(path, "np") as f:
        meta = f.metadata()
    back = wf.from_tensors(loaded, prefix, meta)
    assert type(back) is type(w) and wf.format_of(back) == wf.format_of(w)
    a, b = jax.tree_util.tree_leaves(w), jax.tree_util.tree_leaves(back)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def test_checkpoint_tensor_names(formats):
    assert set(formats["fp8-e4m3-b128"].to_tensors("m.experts.0.gate_proj")) == {
        "m.experts.0.gate_proj.weight", "m.experts.0.gate_proj.weight_scale_inv"}
    assert set(formats["mxfp4"].to_tensors("m.experts.gate_up_proj")) == {
        "m.experts.gate_up_proj_blocks", "m.experts.gate_up_proj_scales"}
    t = wf.Fp8BlockTensor.from_tensors(formats["fp8-e4m3-b128"].to_tensors("x"), "x")
    np.testing.assert_array_equal(t.dequantize(), formats["fp8-e4m3-b128"].dequantize())


@pytest.mark.parametrize("name", FORMATS)
def test_per_expert_slice_matches_the_whole_weight(formats, name):
    w = formats[name]
    whole = np.asarray(wf.dequantize(w, jnp.float32))
    for e in range(E):
        x = wf.expert_slice(w, e)
        assert tuple(np.shape(x) if not wf.is_structured(x) else x.shape) == (K, N)
        np.testing.assert_array_equal(wf.dequantize(x, jnp.float32), whole[e])


@pytest.mark.parametrize("name", FORMATS)
def test_split_and_stack_round_trip(formats, name):
    w = formats[name]
    split = expert_layout.split_experts(w)
    assert expert_layout.is_split(split) and wf.is_structured(split) and split.shape == (E, K, N)
    assert dialect.weight_format_of([split]).endswith("/per-expert")
    back = expert_layout.stack_experts(split)
    np.testing.assert_array_equal(wf.dequantize(back), wf.dequantize(w))
    if name != "mixed":  # mixed parts come back ordered by first expert; the values are the same
        assert type(back) is type(w)
        for x, y in zip(jax.tree_util.tree_leaves(w), jax.tree_util.tree_leaves(back)):
            np.testing.assert_array_equal(x, y)


def test_per_expert_weights_round_trip_through_tensors(formats, tmp_path):
    split = expert_layout.split_experts(formats["mixed"])
    tensors = wf.to_tensors(split, "w")
    back = wf.from_tensors(tensors, "w", wf.tensors_metadata(split, "w"))
    assert expert_layout.is_split(back) and back.format == split.format
    np.testing.assert_array_equal(back.dequantize(), split.dequantize())


def test_registry_and_errors():
    assert {"QuantizedTensor", "LowBitTensor", "MixedExpertTensor", "Fp8BlockTensor", "Mxfp4Tensor",
            "PerExpertWeights"} <= set(wf.registered_formats())
    with pytest.raises(TypeError, match="dataclass subclass of ExpertWeight"):
        wf.register_format(object)
    with pytest.raises(KeyError, match="import the module"):
        wf.format_class("NoSuchFormat")
    with pytest.raises(ValueError, match=r"\[E, k, n\]"):
        wf.quantize(np.ones((2, 3, 8, 4), np.float32)).expert(0)
    assert not wf.is_structured(np.ones(3)) and wf.format_of(np.ones(3)) == "float"


def test_a_pass_can_register_its_own_format(monkeypatch):
    import dataclasses

    # The registry is process-wide: register into a copy so later tests (the saved-program
    # allow-list test among them) do not see this function-local class.
    monkeypatch.setattr(wf, "_REGISTRY", dict(wf._REGISTRY))

    @wf.register_format
    @dataclasses.dataclass(frozen=True)
    class Doubled(wf.ExpertWeight):  # stores w / 2
        half: jax.Array

        @property
        def shape(self):
            return tuple(self.half.shape)

        @property
        def format(self):
            return "doubled"

        def dequantize(self, dtype=jnp.float32):
            return (2 * self.half).astype(dtype)

    d = Doubled(jnp.ones((2, 4, 3)))
    assert wf.is_structured(d) and wf.format_class("Doubled") is Doubled
    assert jax.tree_util.tree_leaves(d)[0].shape == (2, 4, 3)
    np.testing.assert_array_equal(wf.expert_slice(d, 1).dequantize(), 2 * np.ones((4, 3)))
    back = wf.from_tensors(wf.to_tensors(d, "d"), "d", wf.tensors_metadata(d, "d"))
    np.testing.assert_array_equal(back.half, d.half)


def test_core_imports_no_pass_module():
    code = ("import sys, moejax, moejax.weight_formats, moejax.expert_layout, moejax.rewrite, moejax.program; "
            "bad = [m for m in sys.modules if m.startswith('moejax.passes')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------
# The expert op on the checkpoint formats.
# --------------------------------------------------------------------------
D, FF, EXPERTS = 32, 64, 4  # k of every matrix (32 or 64) is a whole number of MXFP4 blocks


def _op_inputs():
    rng = np.random.default_rng(3)
    mats = [rng.standard_normal(s).astype(np.float32) * 0.2
            for s in ((EXPERTS, D, FF), (EXPERTS, D, FF), (EXPERTS, FF, D))]
    sizes = jnp.array([5, 0, 9, 4], jnp.int32)  # an empty expert, and 2 padding rows
    grouped = jnp.asarray(rng.standard_normal((20, D)).astype(np.float32))
    return grouped, sizes, mats


@pytest.mark.parametrize("quantizer", [wf.quantize_fp8_block, wf.quantize_mxfp4], ids=["fp8", "mxfp4"])
@pytest.mark.parametrize("impl,split", [("reference", False), ("blocked", False), ("blocked", True)])
def test_expert_op_on_checkpoint_formats_matches_dequantized_floats(quantizer, impl, split):
    grouped, sizes, mats = _op_inputs()
    ws = [quantizer(m) for m in mats]
    dense = [w.dequantize(jnp.float32) for w in ws]
    want = dialect.moe_expert_ffn(grouped, sizes, dense, impl="reference")
    if split:
        ws = [expert_layout.split_experts(w) for w in ws]
    got = jax.jit(lambda g, s, w: dialect.moe_expert_ffn(g, s, w, impl=impl))(grouped, sizes, ws)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(got)[18:])  # padding rows


def test_binding_the_expert_op_keeps_structured_weights_in_both_paths():
    grouped, sizes, mats = _op_inputs()
    params = {"w": tuple(jnp.asarray(m) for m in mats)}

    def fn(p, g, s):
        return dialect.moe_expert_ffn(g, s, p["w"], name="layer")

    prog = moejax.trace(fn, grouped, sizes, params=params)
    fp8 = {f"w/{i}": wf.quantize_fp8_block(m) for i, m in enumerate(mats)}
    for rule in (lambda ctx: ctx.bind(), lambda ctx: rewrite.rebind_expert_ffn(ctx)):
        new = prog.rewrite({dialect.expert_ffn_p.name: rule}, weights=fp8)
        (site,) = rewrite.dialect_sites(new.jaxpr, "moe_expert_ffn")
        assert site.eqn.params["weight_format"] == "fp8-e4m3-b128"
        assert {v.aval.dtype for v in site.eqn.invars[2:]} == {jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float32)}
        np.testing.assert_allclose(new(grouped, sizes),
                                   fn({"w": [w.dequantize() for w in fp8.values()]}, grouped, sizes),
                                   rtol=1e-5, atol=1e-5)
