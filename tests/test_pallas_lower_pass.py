"""The ``pallas`` pipeline pass on the tiny model (interpret mode on CPU)."""
import jax.numpy as jnp
from flax import nnx

import moejax
from moejax import models
from moejax.pallas_kernels import LowerToPallas


def test_pallas_pass_after_int4_quantize_on_scanned_layers_is_exact():
    model = models.MoEDecoder(models.tiny_mixtral(scan_layers=True), rngs=nnx.Rngs(0))
    tokens = (jnp.arange(2 * 7, dtype=jnp.int32).reshape(2, 7) * 5) % 64
    opt = moejax.optimize(model, (tokens,), "quantize(bits=4,group_size=16),pallas")
    quant, lowered = opt.stages[1], opt.stages[2]
    assert str(moejax.parse_pipeline("pallas")[0]) == "pallas" and isinstance(moejax.parse_pipeline("pallas")[0],
                                                                           LowerToPallas)
    assert lowered.exact and lowered.max_deviation is not None and lowered.max_deviation < 1e-4
    assert lowered.stats["ffn_impls"] == {"pallas": 2}
    text = str(lowered.program)
    assert "impl=pallas" in text and "impl=pallas" not in str(quant.program)
    # (the manager's exactness check above already ran both stages on the example tokens)
