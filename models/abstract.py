"""Abstract (shapes-only) models: full-size presets without allocating a weight.

``abstract_model("deepseek-v3")`` is a :class:`~moejax.models.MoEDecoder` whose
parameters are ``jax.ShapeDtypeStruct`` (built under ``nnx.eval_shape``). Traced or
optimized, it gives an abstract :class:`~moejax.Program` (``program.is_abstract``):
shape-only passes (``ep``, ``select-impl``, ``quantize``) run on it and report
bytes and FLOPs; see :mod:`moejax.abstract`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.models.decoder import DecoderLayer, MoEConfig, MoEDecoder
from moejax.models.presets import PRESETS, preset

__all__ = ["abstract_model", "abstract_tokens"]


def abstract_model(model: str | MoEConfig, *, dtype: Any = jnp.bfloat16, **overrides: Any) -> MoEDecoder:
    """A shapes-only ``MoEDecoder`` of a preset name (see ``moejax.models.presets.PRESETS``) or a config.

    ``overrides`` replace config fields (``n_layers=4``, ``scan_layers=True``).
    The result has the state (paths, shapes, dtypes) and the call of
    ``nnx.eval_shape(lambda: MoEDecoder(cfg, ...))``, built faster: each decoder
    layer is shaped in its own ``nnx.eval_shape``, because inside one trace of the
    whole model every rng draw costs time proportional to the trace so far
    (flax's rng counter asks the tracer for its sharding, whose error message walks
    the trace): DeepSeek-V3's 61 layers took 8-11 s in one trace, about 1.5 s here.

    Raises:
      ValueError: an unknown preset name (the message lists the presets).
    """
    if isinstance(model, str):
        if model not in PRESETS:
            raise ValueError(f"unknown preset {model!r}; available: {', '.join(sorted(PRESETS))}")
        cfg = preset(model, **overrides)
    else:
        cfg = model.replace(**overrides) if overrides else model
    if cfg.scan_layers or cfg.n_layers <= 1:  # one (stacked) layer: a single trace is already fast
        return nnx.eval_shape(lambda: MoEDecoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    shell = nnx.eval_shape(lambda: MoEDecoder(cfg.replace(n_layers=0), rngs=nnx.Rngs(0), dtype=dtype))
    shell.config = cfg
    shell.layers = nnx.List([
        nnx.eval_shape(lambda i=i: DecoderLayer(cfg, rngs=nnx.Rngs(i), dense=cfg.is_dense(i),
                                                name=f"layers/{i}/mlp", dtype=dtype))
        for i in range(cfg.n_layers)])
    return shell


def abstract_tokens(batch: int, length: int) -> jax.ShapeDtypeStruct:
    """The example input of an abstract forward: ``int32[batch, length]`` token ids, shape only."""
    return jax.ShapeDtypeStruct((batch, length), jnp.int32)
