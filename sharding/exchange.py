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

``exchange="dense"`` uses fixed-size buffers with ``all_to_all`` (the only
choice on XLA:CPU, where ``ragged_all_to_all`` is not implemented).
``exchange="ragged"`` (GPU/TPU) sends only the filled rows with
``ragged_all_to_all`` after one small ``all_gather`` of the per-destination
counts; its offset bookkeeping is tested on CPU through
``exchange="ragged_emulated"``, which performs the same ragged exchange with
an ``all_gather`` (the real op has only been lowered/exported here).
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
    exchange: str = "dense"  # "dense" (all_to_all), "ragged" (ragged_all_to_all), "ragged_emulated" (tests)

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


def _ragged_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """``ragged_all_to_all`` written with ``all_gather`` (runs on XLA:CPU; for tests of the bookkeeping)."""
    del recv_sizes  # implied by the gathered send sizes, as in the real op
    n = jax.lax.psum(1, axis_name)
    me = jax.lax.axis_index(axis_name)
    ops = jax.lax.all_gather(operand, axis_name)  # [n, N, ...]
    in_off = jax.lax.all_gather(input_offsets, axis_name)[:, me]  # where source i's slice for me starts
    size = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    out_off = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    rows = jnp.arange(output.shape[0])
    for i in range(n):
        inside = (rows >= out_off[i]) & (rows < out_off[i] + size[i])
        src = jnp.clip(in_off[i] + rows - out_off[i], 0, operand.shape[0] - 1)
        mask = inside.reshape((-1,) + (1,) * (output.ndim - 1))
        output = jnp.where(mask, jnp.take(ops[i], src, axis=0), output)
    return output


def _ragged_fn(cfg: "EPConfig"):
    return jax.lax.ragged_all_to_all if cfg.exchange == "ragged" else _ragged_emulated


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
    if cfg.layout == "shard":
        body = _shard_body if cfg.exchange == "dense" else _ragged_body
    else:
        body = _replicated_body

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


def _chunk_geometry(t_l: int, k: int, cfg: EPConfig):
    """(chunk tokens, per-destination capacity, this device's expert index, global row of its first token)."""
    tc = t_l // cfg.chunks
    cap = capacity_for(tc, k, cfg.n, cfg.placement.slots_per_device, cfg.capacity_factor)
    me = jax.lax.axis_index(cfg.axis)
    device = jax.lax.axis_index(cfg.data_axis) * cfg.n + me if cfg.data_axis else me
    return tc, cap, me, device * t_l


def _shard_body(x, ids, cw, w_local, rep_count, rep_slots, ffn_params, cfg: EPConfig):
    """Per device: ``x [T_l, d]`` local tokens; chunked two-way all_to_all exchange."""
    n, spd, c = cfg.n, cfg.placement.slots_per_device, cfg.chunks
    t_l, d = x.shape
    k = ids.shape[1]
    tc, cap, me, base = _chunk_geometry(t_l, k, cfg)

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


def _ragged_body(x, ids, cw, w_local, rep_count, rep_slots, ffn_params, cfg: EPConfig):
    """Per device, like :func:`_shard_body` but exchanging only filled rows with ``ragged_all_to_all``.

    Counts per destination travel first (one ``all_gather`` of ``[n]`` ints) so
    that every device knows the full ``[n, n]`` send matrix ``M`` and hence the
    offsets: a device's slice for ``j`` lands in ``j``'s buffer after the
    slices of devices ``< me``; results go back along the reversed routes.
    """
    n, spd, c = cfg.n, cfg.placement.slots_per_device, cfg.chunks
    t_l, d = x.shape
    k = ids.shape[1]
    tc, cap, me, base = _chunk_geometry(t_l, k, cfg)
    a2a = _ragged_fn(cfg)
    s_rows = tc * k  # every slot of the chunk, at most
    r_rows = n * dropless_capacity(tc, k, spd)  # received rows, at most

    def excl(a, axis):
        return jnp.cumsum(a, axis=axis) - a

    def send(q):
        xq, idq = x[q * tc:(q + 1) * tc], ids[q * tc:(q + 1) * tc]
        tok = base + q * tc + jnp.arange(tc, dtype=jnp.int32)
        valid, dst, loc = _slot_routes(idq, tok, rep_count, rep_slots, spd)
        dst_f, valid_f = dst.reshape(-1), valid.reshape(-1)
        onehot = jax.nn.one_hot(dst_f, n, dtype=jnp.int32) * valid_f[:, None].astype(jnp.int32)
        rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - onehot, dst_f[:, None], axis=1)[:, 0]
        keep = valid_f & (rank < cap)
        sizes = jnp.sum(onehot * keep[:, None].astype(jnp.int32), axis=0)  # [n] rows to each device
        in_off = excl(sizes, 0)
        pos = jnp.where(keep, in_off[dst_f] + rank, s_rows)  # s_rows: a dummy row
        rows = jnp.repeat(xq, k, axis=0)
        buf = jnp.zeros((s_rows + 1, d), x.dtype).at[pos].set(rows)[:s_rows]
        bid = jnp.full((s_rows + 1,), -1, jnp.int32).at[pos].set(loc.reshape(-1))[:s_rows]
        packed = _pack(buf, bid)
        m = jax.lax.all_gather(sizes, cfg.axis)  # m[i, j]: rows device i sends to device j
        recv_sizes = m[:, me]
        out_off = excl(m, 0)[me]  # where my slice lands on each destination
        recv = a2a(packed, jnp.zeros((r_rows, packed.shape[1]), packed.dtype), in_off, sizes, out_off,
                   recv_sizes, axis_name=cfg.axis)
        dropped = jnp.sum(valid_f & ~keep).astype(jnp.int32)
        return recv, pos, dropped, (m, sizes, recv_sizes)

    def compute_and_return(recv, route):
        m, sizes, recv_sizes = route
        rows, rid = _unpack(recv, d)
        filled = jnp.arange(r_rows) < jnp.sum(recv_sizes)
        out = _local_experts(rows, jnp.where(filled, rid, -1), w_local, spd, ffn_params)
        back_in_off = excl(recv_sizes, 0)  # source i's rows sit after those of sources < i
        back_out_off = excl(m, 1)[:, me]  # where source i put its rows for me = its send offset for me
        return a2a(out, jnp.zeros((s_rows, d), out.dtype), back_in_off, recv_sizes, back_out_off, sizes,
                   axis_name=cfg.axis)

    ys, dropped = [], jnp.zeros((), jnp.int32)
    pending = send(0)
    for q in range(c):
        recv, pos, drop_q, route = pending
        if q + 1 < c:
            pending = send(q + 1)
        back = compute_and_return(recv, route)
        back = jnp.concatenate([back, jnp.zeros((1, d), back.dtype)], axis=0)
        got = jnp.take(back, pos, axis=0).astype(jnp.float32).reshape(tc, k, d)
        ys.append(jnp.einsum("tkd,tk->td", got, cw[q * tc:(q + 1) * tc]).astype(x.dtype))
        dropped = dropped + drop_q
    y = jnp.concatenate(ys, axis=0) if c > 1 else ys[0]
    if cfg.count_dropped:
        dropped = jax.lax.psum(dropped, _all_axes(cfg))
    return y, dropped
