"""Released-layout FP8 checkpoints (DeepSeek-V3, Kimi K2): experts load and run as FP8, no float copy."""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

from flax import nnx  # noqa: E402
from fp8_util import write_fp8_pair  # noqa: E402

import moejax  # noqa: E402
from moejax import weight_formats as wf  # noqa: E402
from moejax.models import CheckpointError, check_checkpoint, from_pretrained  # noqa: E402
from moejax.models.safetensors_io import Checkpoint, save_file  # noqa: E402
from moejax.program import path_to_str  # noqa: E402

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
TOL = 1e-5  # the same weight values; only where the experts are dequantized differs
forward = nnx.jit(lambda m, x: m(x))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_fp8_pair(str(tmp_path_factory.mktemp("fp8")))


@pytest.fixture(scope="module")
def loaded(pair):
    fp8, flt = pair
    return from_pretrained(fp8, dtype=jnp.float32), from_pretrained(flt, dtype=jnp.float32)


def _params(model) -> dict[str, object]:
    return {path_to_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_fp8_load_equals_dequantize_then_float(loaded):
    fp8, flt = loaded
    dev = float(jnp.abs(forward(fp8, TOKENS) - forward(flt, TOKENS)).max())
    assert dev <= TOL, dev
    print(f"FP8 checkpoint vs dequantized float checkpoint: max |logit diff| {dev:.2e}")


def test_experts_stay_fp8_without_a_float_copy(loaded):
    params = _params(loaded[0])
    experts = {k: v for k, v in params.items() if "/experts/" in k}
    assert experts and all(isinstance(v, wf.Fp8BlockTensor) for v in experts.values())
    w = experts["layers/1/mlp/experts/w_up"]
    assert w.weight.dtype == jnp.float8_e4m3fn and w.shape == (8, 32, 16) and w.format == "fp8-e4m3-b8"
    # no float array of an expert's size anywhere in the model: FP8 bytes plus a scale per 8x8 block
    assert all(not (getattr(v, "dtype", None) == jnp.float32 and v.size >= 8 * 16 * 32) for v in params.values())
    assert wf.nbytes_of(w) == 8 * 16 * 32 + 8 * 2 * 4 * 4
    # the other FP8 matrices (attention, dense and shared FFN) are dequantized to the model dtype
    assert params["layers/1/self_attn/o_proj/kernel"].dtype == jnp.float32


def test_fp8_experts_through_the_pipeline(loaded):
    fp8, flt = loaded
    opt = moejax.optimize(fp8, (TOKENS,), "select-impl", check_exact=False)  # compared with the float twin below
    leaves = [x for k, v in opt.program.weights.items() if "/experts/" in k for x in jax.tree_util.tree_leaves(v)]
    assert {str(x.dtype) for x in leaves} == {"float8_e4m3fn", "float32"}  # FP8 values, f32 block scales
    assert all(x.size < 16 * 32 for x in leaves if x.dtype == jnp.float32)  # scales only: no float expert
    assert float(jnp.abs(opt(TOKENS) - forward(flt, TOKENS)).max()) <= TOL
    float_bytes = moejax.optimize(flt, (TOKENS,), "", check_exact=False).stages[0].stats["expert_bytes"]
    assert opt.stages[0].stats["expert_bytes"] < 0.3 * float_bytes


def _edit(src: str, dst: str, tensors=None, config=None) -> str:
    os.makedirs(dst)
    ckpt = Checkpoint(src)
    t = {k: ckpt.read(k) for k in ckpt}
    cfg = json.load(open(os.path.join(src, "config.json")))
    if tensors:
        tensors(t)
    if config:
        config(cfg)
    save_file(t, os.path.join(dst, "model.safetensors"))
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


SCALE = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"


@pytest.mark.parametrize("tensors, config, error, needle", [
    (lambda t: t.pop(SCALE), None, CheckpointError, "has no 'model.layers.1.mlp.experts.3.up_proj.weight_scale_inv'"),
    (lambda t: t.__setitem__(SCALE, np.ones((3, 3), np.float32)), None, CheckpointError, "expected (2, 4)"),
    (lambda t: t.__setitem__(SCALE, np.full((2, 4), np.nan, np.float32)), None, CheckpointError, "NaN/Inf"),
    (None, lambda c: c.pop("quantization_config"), CheckpointError, "is FP8 but config.json has no quantization"),
    (None, lambda c: c["quantization_config"].update(quant_method="awq"), NotImplementedError, "'awq' is not"),
    (None, lambda c: c["quantization_config"].update(weight_block_size=[0, 8]), CheckpointError,
     "weight_block_size must be two positive integers"),
])
def test_bad_fp8_checkpoints_are_one_clear_error(pair, tmp_path, tensors, config, error, needle):
    folder = _edit(pair[0], str(tmp_path / "bad"), tensors, config)
    with pytest.raises(error) as exc:
        check_checkpoint(folder)
        from_pretrained(folder)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("pipeline", ["ep(num_devices=1)", "profile,offload"])
def test_exact_passes_run_on_fp8_experts(loaded, pipeline):
    fp8, flt = loaded
    opt = moejax.optimize(fp8, (TOKENS,), pipeline)
    assert all(isinstance(v, wf.Fp8BlockTensor) for k, v in opt.program.weights.items() if "/experts/" in k)
    assert float(jnp.abs(opt(TOKENS) - forward(flt, TOKENS)).max()) <= TOL


def test_prune_keeps_fp8_experts_fp8(loaded):
    """Pruning slices the FP8 values and scales: the same as pruning the dequantized model."""
    fp8, flt = loaded
    pruned = moejax.optimize(fp8, (TOKENS,), "profile,prune(num_experts=6)")
    reference = moejax.optimize(flt, (TOKENS,), "profile,prune(num_experts=6)")
    w = pruned.program.weights["layers/1/mlp/experts/w_up"]
    assert isinstance(w, wf.Fp8BlockTensor) and w.shape == (6, 32, 16) and w.scale_inv.shape == (6, 2, 4)
    assert float(jnp.abs(pruned(TOKENS) - reference(TOKENS)).max()) <= TOL


@pytest.mark.parametrize("pipeline, needle", [
    ("quantize(bits=8)", "is already quantized (fp8-e4m3-b8)"),
    ("profile,merge(num_experts=6)", "has quantized expert weights (fp8-e4m3-b8)"),
])
def test_passes_that_need_float_experts_refuse_fp8_clearly(loaded, pipeline, needle):
    with pytest.raises(moejax.PassError, match=re.escape(needle)):
        moejax.optimize(loaded[0], (TOKENS,), pipeline)


def test_fp8_row_blocks_dequantize_like_the_whole_matrix(pair):
    """A sharded load reads only the rows it needs (widened to whole scale blocks): any row range, aligned or
    not, equals that range of the whole dequantized matrix."""
    from moejax.models import fp8_checkpoint
    from moejax.models.hf import RuleReader

    ckpt = Checkpoint(pair[0])
    reader = RuleReader(ckpt, fp8_checkpoint.Fp8Blocks(8, 8), jnp.float32)
    name = "model.layers.1.self_attn.q_b_proj.weight"  # 48 x 8: six row blocks
    whole = reader.tensor(name, "q_b_proj")
    assert whole.shape == (48, 8)
    for rows in (slice(0, 48), slice(3, 21), slice(16, 24), slice(45, 48)):
        np.testing.assert_array_equal(reader.tensor(name, "q_b_proj", (rows, slice(2, 7))), whole[rows, 2:7])
