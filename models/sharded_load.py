"""Loading a checkpoint straight onto a mesh: each process reads only the slices its devices hold.

``from_pretrained(path, mesh=mesh)`` builds the model abstractly (no weight is
allocated), gives every parameter a ``NamedSharding`` from :data:`DEFAULT_RULES`
(or the caller's rules), and creates each parameter with
``jax.make_array_from_callback``: JAX asks each process only for the blocks of
its own devices, and each block is read from the safetensors file with
``pread`` (rows of axis 0 only; :meth:`SafetensorsFile.read`). So a process's
resident memory is its share of the model plus one block in flight, and on a
multi-host cluster no process ever reads the others' experts.

Sharding rules are ``(regex, spec)`` pairs matched against parameter paths
(``layers/3/mlp/experts/w_up``); the first match wins, unmatched parameters are
replicated. A spec names one mesh axis (or ``None``) per dimension of the
unstacked parameter; stacked (scanned) layers get ``None`` for the layer axis.
Axes the mesh lacks are ignored (so one rule set serves ``(expert,)``,
``(data, expert)`` and ``(expert, model)`` meshes). With the default rules a
dimension that the axis does not divide stays whole (replicated); with explicit
rules that is an error.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.models.decoder import MoEConfig, MoEDecoder
from moejax.models.safetensors_io import Checkpoint
from moejax.models.validation import CheckpointError
from moejax.program import path_to_str

__all__ = ["DEFAULT_RULES", "ShardingRules", "partition_spec", "parameter_shardings", "load_onto_mesh",
           "shard_model"]

ShardingRules = Sequence[tuple[str, tuple[str | None, ...]]]

# Experts split over "expert" (expert parallelism, as the ep pass lays them out); attention
# and dense FFN matrices over "model" (Megatron-style tensor parallelism: column-split
# inputs, row-split outputs); embeddings, norms and routers replicated.
DEFAULT_RULES: ShardingRules = (
    (r"mlp/experts/w_(gate|up|down)$", ("expert", None, None)),
    (r"mlp/experts/b_(gate|up|down)$", ("expert", None)),
    (r"self_attn/(q_proj|k_proj|v_proj|q_b_proj|kv_b_proj)/kernel$", (None, "model")),
    (r"self_attn/o_proj/kernel$", ("model", None)),
    (r"mlp/(shared/|shared_expert/)?(gate_proj|up_proj)/kernel$", (None, "model")),
    (r"mlp/(shared/|shared_expert/)?down_proj/kernel$", ("model", None)),
    (r"lm_head/kernel$", (None, "model")),
)


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules: ShardingRules | None = None) -> P:
    """The ``PartitionSpec`` of parameter ``path`` (of ``shape``) on ``mesh`` under ``rules``.

    ``rules=None`` takes :data:`DEFAULT_RULES` and replicates any dimension its
    axis does not divide; explicit rules raise ``ValueError`` instead.
    """
    lenient = rules is None
    sizes = dict(mesh.shape)
    for pattern, spec in (DEFAULT_RULES if rules is None else rules):
        if not re.search(pattern, path):
            continue
        spec = tuple(spec)
        if len(shape) == len(spec) + 1 and path.startswith("layers/") and not re.match(r"layers/\d+/", path):
            spec = (None,) + spec  # stacked layers under scan: the layer axis stays whole
        if len(spec) != len(shape):
            if lenient:
                return P()
            raise ValueError(f"sharding rule {pattern!r} gives {len(spec)} axes for parameter {path} of shape "
                             f"{shape}; give one mesh axis or None per dimension")
        out = []
        for dim, axis in zip(shape, spec):
            if axis is None or axis not in sizes:
                out.append(None)
            elif dim % sizes[axis] == 0:
                out.append(axis)
            elif lenient:
                out.append(None)
            else:
                raise ValueError(f"parameter {path} of shape {shape}: mesh axis {axis!r} of size {sizes[axis]} does "
                                 f"not divide its dimension {dim}; change the rule or the mesh")
        return P(*out)
    return P()


def parameter_shardings(abstract_model: Any, mesh: Mesh, rules: ShardingRules | None = None
                        ) -> dict[str, NamedSharding]:
    """``{parameter path: NamedSharding}`` for every parameter of an (abstract) model."""
    return {path_to_str(p): NamedSharding(mesh, partition_spec(path_to_str(p), tuple(v.shape), mesh, rules))
            for p, v in nnx.to_flat_state(nnx.state(abstract_model, nnx.Param))}


def _norm_index(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(d)[:2]) for s, d in zip(tuple(index) + (slice(None),) * len(shape), shape))


def _block_reader(rule: Any, reader: Any, dst: str) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """A function ``index -> dst[index]`` that reads only what ``index`` needs (see ``hf.RuleReader``)."""
    def read(src: str, index: tuple[slice, ...]) -> np.ndarray:
        return reader.tensor(src, dst, index)

    if rule.kind == "copy":
        return lambda idx: read(rule.srcs[0], idx)
    if rule.kind == "linear":  # dst = src.T, so dst[a, b] = src[b, a].T
        return lambda idx: read(rule.srcs[0], idx[::-1]).T
    if rule.kind == "experts":  # dst[e] = srcs[e].T
        return lambda idx: np.stack([read(rule.srcs[e], (idx[2], idx[1])).T
                                     for e in range(*idx[0].indices(len(rule.srcs)))])

    def custom(idx: tuple[slice, ...]) -> np.ndarray:  # fused layouts (DBRX, JetMoE): build whole, then slice
        return np.asarray(rule.build([read(s, ()) for s in rule.srcs]))[idx]
    return custom


def _global_array(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding,
                  block: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A global array whose blocks (only those of this process's devices) come from ``block(index)``."""
    # Devices holding the same block (replicas) share one read; the blocks of one
    # parameter together are at most that parameter, dropped once it is placed.
    memo: dict[tuple, np.ndarray] = {}

    def callback(index):
        index = _norm_index(index, shape)
        k = tuple((s.start, s.stop) for s in index)
        if k not in memo:
            memo[k] = np.ascontiguousarray(block(index), dtype=dtype)
        return memo[k]

    return jax.make_array_from_callback(shape, sharding, callback)


def _fp8_experts(rule: Any, reader: Any, sharding: NamedSharding) -> Any:
    """An FP8 experts parameter, each leaf split along the experts as the float one would be."""
    n = len(rule.srcs)
    abstract = reader.fp8_experts_shapes(rule, n)
    spec = P(tuple(sharding.spec)[0] if len(sharding.spec) else None)  # the expert axis only
    parts: dict[tuple[int, int], list[np.ndarray]] = {}  # one read of an expert range serves values and scales

    def leaf(i: int, struct: Any) -> jax.Array:
        def block(idx):
            span = idx[0].indices(n)[:2]
            if span not in parts:
                parts[span] = jax.tree_util.tree_leaves(reader.fp8_experts(rule, range(*span)))
            return parts[span][i][(slice(None),) + idx[1:]]
        return _global_array(tuple(struct.shape), struct.dtype, NamedSharding(sharding.mesh, spec), block)

    leaves, tree = jax.tree_util.tree_flatten(abstract)
    return jax.tree_util.tree_unflatten(tree, [leaf(i, x) for i, x in enumerate(leaves)])


def load_onto_mesh(cfg: MoEConfig, rules_by_param: dict[str, Any], reader: Any, mesh: Mesh,
                   sharding_rules: ShardingRules | None) -> MoEDecoder:
    """A ``MoEDecoder(cfg)`` whose parameters are global arrays on ``mesh``, read slice by slice.

    ``rules_by_param`` maps each per-layer parameter path to its checkpoint
    :class:`~moejax.models.hf.Rule` (already checked against the headers);
    ``reader`` (a :class:`~moejax.models.hf.RuleReader`) reads, checks and
    dequantizes the tensors.
    """
    abstract = nnx.eval_shape(lambda: MoEDecoder(cfg, rngs=nnx.Rngs(0), dtype=reader.dtype))
    graphdef, state = nnx.split(abstract)
    shardings = parameter_shardings(abstract, mesh, sharding_rules)
    flat = []
    for p, var in nnx.to_flat_state(state):
        key, shape = path_to_str(p), tuple(var.shape)
        rule = rules_by_param.get(key)
        if rule is not None and reader.is_fp8_experts(rule):
            value = _fp8_experts(rule, reader, shardings[key])
        else:
            value = _global_array(shape, var.dtype, shardings[key],
                                  _stacked_reader(key, cfg, rules_by_param, reader))
        flat.append((p, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _stacked_reader(key: str, cfg: MoEConfig, rules_by_param: dict[str, Any], reader: Any
                    ) -> Callable[[tuple[slice, ...]], np.ndarray]:
    if key in rules_by_param:
        return _block_reader(rules_by_param[key], reader, key)
    m = re.match(r"layers/(.*)", key)
    per_layer = [f"layers/{i}/{m.group(1)}" for i in range(cfg.n_layers)] if m and cfg.scan_layers else []
    if not per_layer or any(k not in rules_by_param for k in per_layer):
        raise CheckpointError(f"no checkpoint tensor maps to parameter {key} (internal mapping gap for {cfg.family})")
    if any(reader.is_fp8_experts(rules_by_param[k]) for k in per_layer):
        raise NotImplementedError(f"parameter {key}: FP8 experts onto a mesh need unstacked layers; load with "
                                  "scan_layers=False")
    readers = [_block_reader(rules_by_param[k], reader, k) for k in per_layer]
    return lambda idx: np.stack([readers[i](idx[1:]) for i in range(*idx[0].indices(len(readers)))])


def shard_model(model: MoEDecoder, mesh: Mesh, rules: ShardingRules | None = None) -> MoEDecoder:
    """``model`` with every parameter placed on ``mesh`` by ``rules`` (for models already in memory)."""
    shardings = parameter_shardings(model, mesh, rules)
    graphdef, state = nnx.split(model)
    flat = []
    for p, var in nnx.to_flat_state(state):
        key = path_to_str(p)
        if key in shardings:
            host = np.asarray(var[...])
            var = var.replace(jax.make_array_from_callback(host.shape, shardings[key], lambda idx, h=host: h[idx]))
        flat.append((p, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
