"""Tests of the expert quantization pass (passes/quantize.py)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax.models import MoEDecoder, tiny_mixtral
from moejax.pallas_kernels import quant_format as qf
from moejax.passes import profile as prof
from moejax.passes import quantize as qz
from moejax.passes import sensitivity
from moejax.pipeline import PassContext, PassError, PassManager

RNG = np.random.default_rng(0)


def _formats(program) -> list[str]:
    return re.findall(r"weight_format=(\S+)", str(program))


@pytest.fixture(scope="module")
def tiny():
    model = MoEDecoder(tiny_mixtral(), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(RNG.integers(0, 64, (2, 8)), jnp.int32)
    return model, tokens, moejax.trace(model, tokens)


# ---- storage formats ---------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3])
def test_bitplane_pack_unpack_exact(bits):
    u = jnp.asarray(RNG.integers(0, 2 ** bits, (3, 24, 5)), jnp.uint8)
    packed = qz.pack_bitplanes(u, bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 24 * bits // 8, 5)
    np.testing.assert_array_equal(qz.unpack_bitplanes(packed, bits), u)


@pytest.mark.parametrize("bits,gs,sym", [(8, None, True), (4, 16, True), (4, 16, False), (3, 16, False),
                                         (2, 8, False), (3, 16, True)])
def test_quantize_weight_error_bound_and_bytes(bits, gs, sym):
    w = jnp.asarray(RNG.normal(size=(2, 32, 6)), jnp.float32)
    t = qz.quantize_weight(w, bits, gs, sym)
    dq = t.dequantize(jnp.float32)
    scale = np.repeat(np.asarray(t.scale), 32 // t.scale.shape[-2], axis=-2)
    assert np.all(np.abs(np.asarray(dq) - np.asarray(w)) <= scale / 2 + 1e-6)
    assert t.shape == (2, 32, 6)
    assert t.nbytes * 8 < w.size * (bits + 2) + 64 * t.scale.size  # codes really take `bits` bits each
    assert np.prod(t.q.shape) == w.size * bits // 8


def test_int4_codes_are_the_shared_format():
    """The int4 tensor is the pallas_kernels format: nibble-packed codes unpack to the rounded values."""
    w = jnp.asarray(RNG.normal(size=(4, 8)), jnp.float32)
    t = qz.quantize_weight(w, 4, 4, True)
    assert isinstance(t, qf.QuantizedTensor) and t.format == "int4-g4"
    codes = np.asarray(qf.unpack_int4(t.q))
    scale = np.repeat(np.asarray(t.scale), 4, axis=0)
    np.testing.assert_array_equal(codes, np.clip(np.round(np.asarray(w) / scale + 8), 0, 15))
    np.testing.assert_array_equal(qf.pack_int4(codes), t.q)


def test_clip_search_never_increases_error():
    w = jnp.asarray(RNG.standard_t(3, size=(64, 16)), jnp.float32)  # heavy tails: clipping helps
    plain = qz.quantize_weight(w, 3, 16, False).dequantize()
    clipped = qz.quantize_weight(w, 3, 16, False, clip_search=True).dequantize()
    e_plain, e_clip = float(jnp.sum((plain - w) ** 2)), float(jnp.sum((clipped - w) ** 2))
    assert e_clip < e_plain


def test_structured_weights_survive_scan_slicing():
    w = jnp.asarray(RNG.normal(size=(3, 4, 16, 8)), jnp.float32)  # [L, E, k, n]
    bits_se = np.array([[8, 4, 2, 2], [2, 8, 2, 4], [4, 2, 8, 2]])
    tensors = [qz.quantize_weight(w, 4, 8, True), qz.quantize_weight(w, 2, 8, False),
               qz._mixed_tensor(w, bits_se, 8, lambda b: b >= 4, False)]
    for t in tensors:
        full = t.dequantize(jnp.float32)
        _, per_layer = jax.lax.scan(lambda c, tl: (c, tl.dequantize(jnp.float32)), 0, t)
        np.testing.assert_array_equal(per_layer, full)
        np.testing.assert_allclose(full, w, atol=float(jnp.abs(w).max()))
    mixed = tensors[2]
    assert mixed.format == "mixed(int8x1,int4-g8x1,int2-g8-asymx2)"
    # each expert got the width the allocation asked for: its error matches that width's quantizer
    for layer, row in enumerate(bits_se):
        for e, b in enumerate(row):
            want = qz.quantize_weight(w[layer, e], b, None if b == 8 else 8, b >= 4).dequantize()
            np.testing.assert_allclose(mixed.dequantize()[layer, e], want, rtol=1e-6, atol=1e-6)


def test_allocate_bits_prefers_important_experts_and_meets_budget():
    imp = np.array([[0.5, 0.3, 0.15, 0.05]])
    err = np.array([[[0.0, 0.2, 0.5, 1.0]] * 4]) * imp[..., None]  # widths (8, 4, 3, 2)
    bits = qz.allocate_bits(imp, err, 3.5)
    assert bits.mean() <= 3.5
    assert list(bits[0]) == sorted(bits[0], reverse=True)  # more bits to more important experts
    assert bits[0, 0] > bits[0, -1]
    with pytest.raises(ValueError, match="averages at most"):
        qz.allocate_bits(imp, err, 1.5)
    # across layers: the more sensitive layer gets more bits, the average stays on budget
    both = qz.allocate_bits_global({"robust": (imp, err, 1), "sensitive": (imp, 10 * err, 1)}, 3.0)
    assert both["sensitive"].mean() > both["robust"].mean()
    assert (both["sensitive"].sum() + both["robust"].sum()) / 8 <= 3.0


# ---- the pass on a program --------------------------------------------------------
def test_int4_graph_change_bytes_and_output(tiny):
    model, tokens, program = tiny
    out = qz.QuantizeExperts(bits=4, group_size=16).run(program, PassContext())
    assert _formats(out) == ["int4-g16", "int4-g16"]
    assert _formats(program) == ["float", "float"]
    assert "(int4-g16)" in str(out)  # weight table shows the stored format
    before, after = moejax.program_stats(program), moejax.program_stats(out)
    # 3 matrices x 2 layers of E*k*n f32 -> nibbles + one f32 scale per 16 rows
    assert before["expert_bytes"] == 147456
    assert after["expert_bytes"] == 147456 // 8 + 147456 // 16
    assert after["total_bytes"] == before["total_bytes"] - before["expert_bytes"] + after["expert_bytes"]
    assert isinstance(out.weights["layers/0/mlp/gate/kernel"], jax.Array)  # router stays float
    ref, got = np.asarray(model(tokens)), np.asarray(out(tokens))
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < rel < 0.5  # random tiny weights: int4 moves logits, but not wildly
    # The op consuming packed weights computes what the float program computes on the dequantized weights.
    deq = {p: w.dequantize(jnp.float32) for p, w in out.weights.items() if hasattr(w, "dequantize")}
    np.testing.assert_allclose(got, np.asarray(program.rewrite(weights=deq)(tokens)), rtol=1e-5, atol=1e-5)


def test_int8_on_scanned_layers_runs_inside_scan():
    model = MoEDecoder(tiny_mixtral(scan_layers=True), rngs=nnx.Rngs(1))
    tokens = jnp.asarray(RNG.integers(0, 64, (2, 8)), jnp.int32)
    program = moejax.trace(model, tokens)
    out = qz.QuantizeExperts(bits=8).run(program, PassContext())
    assert _formats(out) == ["int8"]
    w = out.weights["layers/mlp/experts/w_up"]
    assert w.q.dtype == jnp.int8 and w.q.shape == (2, 4, 32, 48) and w.scale.shape == (2, 4, 1, 48)
    ref, got = np.asarray(model(tokens)), np.asarray(out(tokens))
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.01


def test_mixed_precision_from_profile(tiny):
    model, tokens, program = tiny
    cal = [RNG.integers(0, 64, (4, 8))]
    ctx = PassContext(example_args=(tokens,), calibration=cal)
    profiled = prof.ProfileRouting().run(program, ctx)
    out = qz.QuantizeExperts(bits=3.5, mixed=True, group_size=16).run(profiled, ctx)
    alloc = out.metadata["quantization"]["expert_bits"]
    assert set(alloc) == {"layers/0/mlp", "layers/1/mlp"}
    # one budget over all expert weights (both layers have equal experts): layers may differ
    assert np.mean([b.mean() for b in alloc.values()]) <= 3.5
    for layer, bits in alloc.items():
        assert bits.shape == (1, 4) and set(bits.ravel()) <= {2, 3, 4, 8}
        mass = profiled.metadata["routing_profile"][layer]["mass"][0]
        assert bits[0, np.argmax(mass)] == bits.max()  # the heaviest expert gets the widest codes
    assert all(f.startswith("mixed(") for f in _formats(out))
    assert np.isfinite(np.asarray(out(tokens))).all()


def test_mixed_precision_weighs_layers_by_their_measured_end_to_end_cost(tiny):
    """The layer-local output error ranks a layer's experts; the measured KL decides between layers."""
    _, tokens, program = tiny
    ctx = PassContext(example_args=(tokens,), calibration=[RNG.integers(0, 64, (4, 8))])
    profiled = prof.ProfileRouting().run(program, ctx)
    q = qz.QuantizeExperts(bits=3, mixed=True, group_size=16)
    layers = ("layers/0/mlp", "layers/1/mlp")
    paths = {layer: [p for p, (l, _) in qz.expert_weight_sites(profiled).items() if l == layer] for layer in layers}

    # Known answer: the measured cost is the KL of the program with only that layer's experts at that width.
    kl = sensitivity.weight_change_kl(profiled, ctx.calibration)
    (_, err, _), measured = q._allocation_inputs(profiled, layers[0], paths[layers[0]], kl)
    batches = [jnp.asarray(ctx.calibration[0][i:i + 2], jnp.int32) for i in (0, 2)]  # the program takes [2, 8]

    def kl_of(prog):
        ref = [jax.nn.log_softmax(profiled(b), -1) for b in batches]
        got = [jax.nn.log_softmax(prog(b), -1) for b in batches]
        return float(np.mean([jnp.mean(jnp.sum(jnp.exp(r) * (r - g), -1)) for r, g in zip(ref, got)]))

    for ci, bits in enumerate(sorted(qz.STORAGE_BITS, reverse=True)):
        assert qz.scale_to_measured(err, measured)[..., ci].sum() == pytest.approx(measured[bits], rel=1e-6)
        deq = {p: qz.quantize_weight(profiled.weights[p], bits, None if bits == 8 else 16, bits >= 4,
                                     False).dequantize(jnp.float32) for p in paths[layers[0]]}
        assert measured[bits] == pytest.approx(kl_of(profiled.rewrite(weights=deq)), rel=1e-3, abs=1e-7)
    assert measured[2] > measured[3] > measured[4] > measured[8]

    # Whichever layer is measured to cost 100x more per unit of weight error gets the wider codes.
    def relative_error(costly):
        def cost(replaced):
            e = sum(float(jnp.sum((jnp.asarray(v) - profiled.weights[p]) ** 2) / jnp.sum(profiled.weights[p] ** 2))
                    for p, v in replaced.items())
            return e * (100.0 if next(iter(replaced)).startswith(costly) else 1.0)
        return cost

    for costly, cheap in (layers, layers[::-1]):
        inputs = {}
        for l in layers:
            (imp, err, per), measured = q._allocation_inputs(profiled, l, paths[l], relative_error(costly))
            inputs[l] = (imp, qz.scale_to_measured(err, measured), per)
        bits = qz.allocate_bits_global(inputs, 3.0)
        assert bits[costly].mean() > 3.0 > bits[cheap].mean(), bits

    # The pass measures whole allocations too and keeps the one with the least KL.
    allocation = q.run(profiled, ctx).metadata["bit_allocation"]
    assert set(allocation["measured_kl"]) == set(layers)
    tried = allocation["candidate_kl"]
    assert set(tried) == {"local", "measured", "uniform"}
    real = {l: q._allocation_inputs(profiled, l, paths[l], kl) for l in layers}
    expected = {"local": qz.allocate_bits_global({l: inputs for l, (inputs, _) in real.items()}, 3.0),
                "measured": qz.allocate_bits_global({l: (imp, qz.scale_to_measured(err, m), per)
                                                     for l, ((imp, err, per), m) in real.items()}, 3.0),
                "uniform": {l: np.full((1, 4), 3) for l in layers}}
    best = min(tried, key=tried.get)
    assert all((allocation["layers"][l] == expected[best][l]).all() for l in layers), (best, tried)


def test_errors_for_impossible_options(tiny):
    _, tokens, program = tiny
    with pytest.raises(PassError, match=r"bits=5 is not a storage width.*mixed=true"):
        moejax.parse_pipeline("quantize(bits=5)")
    with pytest.raises(PassError, match=r"group_size=128 does not divide the contraction dim (32|48) of layers/0/mlp/experts.*group_size in"):
        qz.QuantizeExperts(bits=4).check(program, PassContext())
    with pytest.raises(PassError, match=r"needs the routing profile.*'profile,quantize\(bits=3.5"):
        PassManager(["quantize(bits=3.5,mixed=true,group_size=16)"]).run(program, PassContext())
    with pytest.raises(PassError, match="already quantized"):
        q = qz.QuantizeExperts(bits=8).run(program, PassContext())
        qz.QuantizeExperts(bits=8).check(q, PassContext())


# ---- persistence -----------------------------------------------------------------
def test_quantized_program_round_trips_bit_for_bit(tiny, tmp_path):
    from moejax import serialization

    model, tokens, program = tiny
    ctx = PassContext(example_args=(tokens,), calibration=[RNG.integers(0, 64, (2, 8))])
    q = qz.QuantizeExperts(bits=3, mixed=True, group_size=16).run(prof.ProfileRouting().run(program, ctx), ctx)
    q.save(str(tmp_path / "q"))
    back = moejax.Program.restore(str(tmp_path / "q"))
    assert _formats(back) == _formats(q) and all(f.startswith("mixed(") for f in _formats(back))
    for a, b in zip(q.weight_leaves, back.weight_leaves):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(back(tokens)), np.asarray(q(tokens)))
    # quantized weights onto the float program (the wrong model for them) fail with the tensors named
    with pytest.raises(serialization.ProgramFormatError, match=r"do not fit this program.*experts/w_down"):
        serialization.load_weights(program, tmp_path / "q")


class _Callable:
    """A program with the model's init_cache, the call forms evaluation expects."""

    def __init__(self, program, model):
        self.program, self.init_cache = program, model.init_cache

    def __call__(self, *args, **kwargs):
        return self.program(*args, **kwargs)


# ---- quality on the bundled default model --------------------------------------------
@pytest.mark.full_optimization
def test_quality_bounds_on_default_model():
    """int8 <= +0.5% and int4-g128 <= +3% bits/byte on a slice of the held-out text."""
    from moejax import data, evaluation
    from moejax.models import default_model

    if not (default_model.DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip("default model checkpoint not present (models/default/model.safetensors)")
    model = default_model.load_default_model()
    text = data.heldout_bytes(4096)
    tokens = jnp.zeros((4, 128), jnp.int32)
    program = moejax.trace(model, tokens)
    bpb = {"float": evaluation.bits_per_byte(model, text, seq_len=128, batch=4)}
    for label, p in (("int8", qz.QuantizeExperts(bits=8)), ("int4", qz.QuantizeExperts(bits=4, group_size=128))):
        bpb[label] = evaluation.bits_per_byte(_Callable(p.run(program, PassContext()), model), text, seq_len=128,
                                              batch=4)
    assert 1.0 < bpb["float"] < 4.0, bpb  # a trained byte model, not a uniform one (8 bits)
    assert bpb["int8"] <= bpb["float"] * 1.005, bpb
    assert bpb["int4"] <= bpb["float"] * 1.03, bpb
    assert bpb["int4"] != bpb["float"], bpb  # the quantized weights are really used
