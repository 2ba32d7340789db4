"""Every kernel variant lowers for TPU (Mosaic) and CUDA (Triton) on a CPU-only host.

``jax.export`` runs the Pallas backend lowering (Mosaic or Triton IR
generation) without a device; compilation by the device toolchain is not
checked here. The Triton custom call has no compatibility guarantee, so its
safety check is disabled for the check.
"""
import jax
import jax.numpy as jnp
import pytest
from jax import export

from moejax.pallas_kernels import ffn_pallas, fused_route, gmm, gmm_gated, quantize

SD = jax.ShapeDtypeStruct
M, K, N, G = 300, 512, 384, 4   # m ragged against every tile
LHS = SD((M, K), jnp.bfloat16)
GS = SD((G,), jnp.int32)
_W = SD((G, K, N), jnp.float32)
FLOAT = SD((G, K, N), jnp.bfloat16)
INT8 = jax.eval_shape(lambda w: quantize(w, 8), _W)
INT8_ASYM = jax.eval_shape(lambda w: quantize(w, 8, symmetric=False), _W)
INT4 = jax.eval_shape(lambda w: quantize(w, 4, 128), _W)
INT4_ASYM = jax.eval_shape(lambda w: quantize(w, 4, 128, symmetric=False), _W)

VARIANTS = {
    "float": (lambda a, w, g: gmm(a, w, g), FLOAT),
    "float-ragged-k": (lambda a, w, g: gmm(a[:, :500], w[:, :500], g), FLOAT),
    "float-group-offset": (lambda a, w, g: gmm(a, w[1:3], g, group_offset=1), FLOAT),
    "int8": (lambda a, w, g: gmm(a, w, g), INT8),
    "int8-asym": (lambda a, w, g: gmm(a, w, g), INT8_ASYM),
    "int4-g128": (lambda a, w, g: gmm(a, w, g), INT4),
    "int4-g128-asym": (lambda a, w, g: gmm(a, w, g), INT4_ASYM),
    "gelu-epilogue": (lambda a, w, g: gmm(a, w, g, epilogue="gelu"), FLOAT),
    "swiglu-fused": (lambda a, w, g: gmm_gated(a, w, w, g), FLOAT),
    "geglu-fused": (lambda a, w, g: gmm_gated(a, w, w, g, activation="geglu"), FLOAT),
    "swiglu-fused-int4": (lambda a, w, g: gmm_gated(a, w, w, g), INT4),
    "swiglu-fused-int8": (lambda a, w, g: gmm_gated(a, w, w, g), INT8),
    "float-vjp": (lambda a, w, g: jax.grad(lambda x: gmm(x, w, g).sum())(a), FLOAT),
}
PLATFORMS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def _export(fn, platform, *args):
    exp = export.export(jax.jit(fn), platforms=[platform],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(PLATFORMS["cuda"])])(*args)
    return exp.mlir_module()


@pytest.mark.parametrize("platform", list(PLATFORMS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernel_variant_lowers(variant, platform):
    fn, rhs = VARIANTS[variant]
    text = _export(fn, platform, LHS, rhs, GS)
    # the default backend picks the platform's kernel at lowering time
    assert PLATFORMS[platform] in text
    other = PLATFORMS["cuda" if platform == "tpu" else "tpu"]
    assert other not in text


@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_fused_router_lowers(platform):
    fn = lambda x, w, b: fused_route(x, w, b, k=6, score="sigmoid", n_group=8, topk_group=3,  # noqa: E731
                                     group_score="top2_sum")
    text = _export(fn, platform, SD((300, 2048), jnp.bfloat16), SD((2048, 64), jnp.bfloat16), SD((64,), jnp.float32))
    assert PLATFORMS[platform] in text


@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_ffn_pallas_lowers_with_mixed_formats(platform):
    e, d, f = 8, 256, 512
    wg = jax.eval_shape(lambda w: quantize(w, 4, 128), SD((e, d, f), jnp.float32))
    wd = jax.eval_shape(lambda w: quantize(w, 8), SD((e, f, d), jnp.float32))
    fn = lambda x, g, a, b, c: ffn_pallas(x, g, (a, b, c), activation="swiglu")  # noqa: E731
    text = _export(fn, platform, SD((64, d), jnp.bfloat16), SD((e,), jnp.int32), wg, wg, wd)
    assert text.count(PLATFORMS[platform]) >= 2  # fused gate/up kernel + down kernel
