"""The expert-parallel MoE region: a ``shard_map`` with all-to-all token exchange.

:func:`ep_moe` computes what ``moe_dispatch -> moe_expert_ffn -> moe_combine``
compute, with the expert weights sharded over a mesh axis:

* ``layout="shard"`` (prefill): tokens are split over the devices; each device
  packs its token slots into fixed-size per-destination buffers
  ``[n, C, d]`` (the expert's local id rides along, bit-cast into extra
  columns, so one ``all_to_all`` carries rows and ids), exchanges them, runs its
  local experts with ``moe_expert_ffn`` (group sizes over its own slots: the
  group offset of the local experts is the device index times the slots per
  device), and sends the results back with a second ``all_to_all``. With
  ``chunks=c`` the tokens go in ``c`` chunks written as a software pipeline
  (chunk ``i+1`` is sent before chunk ``i`` is computed) so an async
  collective can overlap compute: ``2*c`` all-to-alls per layer.
* ``layout="replicate"`` (decode): every device holds every token, computes
  the slots routed to its own experts, and one ``psum`` adds the partial
  outputs; no forward exchange.

Buffers are fixed-size (``ragged_all_to_all`` is not implemented on XLA:CPU).
Dropless capacity ``C = tokens_per_chunk * min(K, slots_per_device)`` never
drops a slot; a capacity factor shrinks ``C`` and the dropped slots are
counted.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moejax import dialect
from moejax.sharding.placement import Placement

__all__ = ["EPConfig", "ep_moe", "dropless_capacity", "capacity_for"]


@dataclasses.dataclass(frozen=True)
class EPConfig:
    """Static description of one layer's expert-parallel region."""

    mesh: Any  # jax Mesh or AbstractMesh
    axis: str
    data_axis: str | None
    placement: Placement
    layout: str  # "shard" or "replicate"
    chunks: int = 1
    capacity_factor: float | None = None
    count_dropped: bool = False

    @property
    def n(self) -> int:
        return int(self.mesh.shape[self.axis])

    @property
    def n_data(self) -> int:
        return int(self.mesh.shape[self.data_axis]) if self.data_axis else 1

    def token_shards(self) -> int:
        """How many pieces the token dimension is cut into."""
        return self.n_data * (self.n if self.layout == "shard" else 1)

    def token_spec(self) -> P:
        if self.layout == "shard":
            return P((self.data_axis, self.axis)) if self.data_axis else P(self.axis)
        return P(self.data_axis) if self.data_axis else P()


def dropless_capacity(tokens_per_chunk: int, k: int, slots_per_device: int) -> int:
    """Buffer rows per (source, destination) pair so that no slot is ever dropped.

    A token names distinct experts, hence at most ``min(K, spd)`` slots of one device.
    """
    return max(1, tokens_per_chunk * min(k, slots_per_device))


def capacity_for(tokens_per_chunk: int, k: int, n: int, slots_per_device: int,
                 capacity_factor: float | None) -> int:
    """Rows per (source, destination) buffer: dropless, or ``ceil(cf * tokens * K / n)`` capped at dropless."""
    full = dropless_capacity(tokens_per_chunk, k, slots_per_device)
    if capacity_factor is None:
        return full
    return max(1, min(full, math.ceil(capacity_factor * tokens_per_chunk * k / n)))


# --------------------------------------------------------------------------
# Packing int32 ids into the row buffer so one all_to_all carries both.
# --------------------------------------------------------------------------
def _id_columns(dtype) -> int:
    size = jnp.dtype(dtype).itemsize
    return {4: 1, 2: 2, 8: 1}.get(size, 0)


def _pack(rows: jax.Array, ids: jax.Array) -> jax.Array:
    """Append ``ids`` (int32) to ``rows [..., d]`` as bit-cast columns of the rows' dtype."""
    dt = rows.dtype
    size = jnp.dtype(dt).itemsize
    if size == 4:
        cols = jax.lax.bitcast_convert_type(ids, dt)[..., None]
    elif size == 2:
        cols = jax.lax.bitcast_convert_type(ids, dt)  # int32 -> [..., 2] of 16-bit
    elif size == 8:
        cols = jax.lax.bitcast_convert_type(ids.astype(jnp.int64), dt)[..., None]
    else:  # 8-bit floats: ids travel as exact small floats are not guaranteed; use a separate exchange
        raise NotImplementedError(f"expert parallel: rows of dtype {dt} cannot carry expert ids; cast to bf16/f32")
    return jnp.concatenate([rows, cols], axis=-1)


def _unpack(buf: jax.Array, d: int) -> tuple[jax.Array, jax.Array]:
    dt = buf.dtype
    size = jnp.dtype(dt).itemsize
    rows = buf[..., :d]
    if size == 4:
        ids = jax.lax.bitcast_convert_type(buf[..., d], jnp.int32)
    elif size == 2:
        ids = jax.lax.bitcast_convert_type(buf[..., d:d + 2], jnp.int32)
    else:
        ids = jax.lax.bitcast_convert_type(buf[..., d], jnp.int64).astype(jnp.int32)
    return rows, ids


# --------------------------------------------------------------------------
# Local expert compute.
# --------------------------------------------------------------------------
def _local_experts(rows, local_ids, weights, spd: int, ffn_params: dict[str, Any]) -> jax.Array:
    """Run the local experts on ``rows [N,d]`` whose local expert is ``local_ids [N]`` (-1: empty)."""
    key = jnp.where(local_ids < 0, spd, local_ids)
    order = jnp.argsort(key, stable=True)
    grouped = jnp.take(rows, order, axis=0)
    sizes = jnp.zeros((spd,), jnp.int32).at[key].add(1, mode="drop")
    out = dialect.moe_expert_ffn(grouped, sizes, weights, activation=ffn_params["activation"],
                                 impl=ffn_params.get("impl", "reference"), name=ffn_params.get("name", ""))
    return jnp.zeros_like(out).at[order].set(out)  # back to buffer order; empty rows are 0


def _slot_routes(ids, tok_index, rep_count, rep_slots, spd):
    """Destination device and local expert id of every token slot (``valid`` marks id >= 0)."""
    valid = ids >= 0
    e = jnp.maximum(ids, 0)
    reps = rep_count[e]
    r = jnp.mod(tok_index[:, None], reps)
    slot = rep_slots[e, r]
    return valid, slot // spd, slot % spd


# --------------------------------------------------------------------------
# The region.
# --------------------------------------------------------------------------
def ep_moe(x, ids, cw, weights, ffn_params: dict[str, Any], cfg: EPConfig):
    """Expert-parallel ``dispatch -> expert ffn -> combine`` of one layer.

    Args:
      x: tokens [T, d]; ids: expert ids [T, K] (-1 dropped); cw: combine weights [T, K].
      weights: the layer's expert weights laid out by ``cfg.placement`` (leading
        dim = slots, sharded over ``cfg.axis``); a tuple of arrays or quantized pytrees.
      ffn_params: ``activation``, ``impl``, ``name`` of the original expert op.
    Returns:
      ``(y [T, d], dropped)`` where ``dropped`` is the number of token slots
      that did not fit the buffers (an int32 scalar; ``None`` unless
      ``cfg.count_dropped``).
    """
    t, d = x.shape
    k = ids.shape[1]
    shards = cfg.token_shards() * (cfg.chunks if cfg.layout == "shard" else 1)
    t_pad = -(-t // shards) * shards
    if t_pad != t:  # padding tokens route nowhere
        x = jnp.pad(x, ((0, t_pad - t), (0, 0)))
        ids = jnp.pad(ids, ((0, t_pad - t), (0, 0)), constant_values=-1)
        cw = jnp.pad(cw, ((0, t_pad - t), (0, 0)))
    rep_count_np, rep_slots_np = cfg.placement.tables()
    leaves, tree = jax.tree_util.tree_flatten(tuple(weights))
    tok_spec = cfg.token_spec()
    w_spec = P(cfg.axis)
    body = _shard_body if cfg.layout == "shard" else _replicated_body

    def region(x, ids, cw, *leaves):
        w_local = jax.tree_util.tree_unflatten(tree, leaves)
        rep_count = jnp.asarray(rep_count_np)
        rep_slots = jnp.asarray(rep_slots_np)
        y, dropped = body(x, ids, cw, w_local, rep_count, rep_slots, ffn_params, cfg)
        return y, dropped

    manual = {cfg.axis} | ({cfg.data_axis} if cfg.data_axis else set())
    f = jax.shard_map(region, mesh=cfg.mesh, in_specs=(tok_spec, tok_spec, tok_spec) + (w_spec,) * len(leaves),
                      out_specs=(tok_spec, P()), axis_names=manual, check_vma=False)
    y, dropped = f(x, ids, cw, *leaves)
    return y[:t], (dropped if cfg.count_dropped else None)


def _all_axes(cfg: EPConfig):
    return (cfg.data_axis, cfg.axis) if cfg.data_axis else cfg.axis


def _shard_body(x, ids, cw, w_local, rep_count, rep_slots, ffn_params, cfg: EPConfig):
    """Per device: ``x [T_l, d]`` local tokens; chunked two-way all_to_all exchange."""
    n, spd, c = cfg.n, cfg.placement.slots_per_device, cfg.chunks
    t_l, d = x.shape
    k = ids.shape[1]
    tc = t_l // c
    cap = capacity_for(tc, k, n, spd, cfg.capacity_factor)
    me = jax.lax.axis_index(cfg.axis)
    if cfg.data_axis:
        base = (jax.lax.axis_index(cfg.data_axis) * n + me) * t_l
    else:
        base = me * t_l

    def send(q):
        """Pack chunk q into per-destination buffers and exchange them."""
        xq, idq = x[q * tc:(q + 1) * tc], ids[q * tc:(q + 1) * tc]
        tok = base + q * tc + jnp.arange(tc, dtype=jnp.int32)
        valid, dst, loc = _slot_routes(idq, tok, rep_count, rep_slots, spd)
        dst_f, valid_f = dst.reshape(-1), valid.reshape(-1)
        onehot = (jax.nn.one_hot(dst_f, n, dtype=jnp.int32) * valid_f[:, None].astype(jnp.int32))
        rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - onehot, dst_f[:, None], axis=1)[:, 0]
        keep = valid_f & (rank < cap)
        pos = jnp.where(keep, dst_f * cap + rank, n * cap)  # n*cap: a dummy row
        rows = jnp.repeat(xq, k, axis=0)  # slot t*K+j holds token t
        buf = jnp.zeros((n * cap + 1, d), x.dtype).at[pos].set(rows)[:n * cap]
        bid = jnp.full((n * cap + 1,), -1, jnp.int32).at[pos].set(loc.reshape(-1))[:n * cap]
        packed = _pack(buf, bid).reshape(n, cap, -1)
        recv = jax.lax.all_to_all(packed, cfg.axis, 0, 0)
        dropped = jnp.sum(valid_f & ~keep).astype(jnp.int32)
        return recv, pos, dropped

    def compute_and_return(recv):
        rows, rid = _unpack(recv.reshape(n * cap, -1), d)
        out = _local_experts(rows, rid, w_local, spd, ffn_params)
        return jax.lax.all_to_all(out.reshape(n, cap, d), cfg.axis, 0, 0).reshape(n * cap, d)

    ys, dropped = [], jnp.zeros((), jnp.int32)
    pending = send(0)
    for q in range(c):
        recv, pos, drop_q = pending
        if q + 1 < c:  # issue the next chunk's exchange before this chunk's compute
            pending = send(q + 1)
        back = compute_and_return(recv)
        back = jnp.concatenate([back, jnp.zeros((1, d), back.dtype)], axis=0)
        got = jnp.take(back, pos, axis=0).astype(jnp.float32).reshape(tc, k, d)
        cq = cw[q * tc:(q + 1) * tc]
        ys.append(jnp.einsum("tkd,tk->td", got, cq).astype(x.dtype))
        dropped = dropped + drop_q
    y = jnp.concatenate(ys, axis=0) if c > 1 else ys[0]
    if cfg.count_dropped:
        dropped = jax.lax.psum(dropped, _all_axes(cfg))
    return y, dropped


def _replicated_body(x, ids, cw, w_local, rep_count, rep_slots, ffn_params, cfg: EPConfig):
    """Per device: every token (of its data shard); local slots only; psum of the partial outputs."""
    spd = cfg.placement.slots_per_device
    t, d = x.shape
    k = ids.shape[1]
    me = jax.lax.axis_index(cfg.axis)
    base = jax.lax.axis_index(cfg.data_axis) * t if cfg.data_axis else 0
    tok = base + jnp.arange(t, dtype=jnp.int32)
    valid, dst, loc = _slot_routes(ids, tok, rep_count, rep_slots, spd)
    mine = valid & (dst == me)
    rid = jnp.where(mine, loc, -1).reshape(-1)
    rows = jnp.repeat(x, k, axis=0)
    out = _local_experts(rows, rid, w_local, spd, ffn_params)
    partial = jnp.einsum("tkd,tk->td", out.astype(jnp.float32).reshape(t, k, d), cw)
    y = jax.lax.psum(partial, cfg.axis).astype(x.dtype)
    return y, jnp.zeros((), jnp.int32)
