"""Group metadata for grouped matmul: which row tile belongs to which group.

Kept apart from the kernel bodies (as in megablox): it is plain ``jax.numpy``
computed once per call, then handed to the kernel (scalar prefetch on TPU,
ordinary inputs on GPU).

Rows ``[offsets[g], offsets[g+1])`` of ``lhs`` belong to group ``g``. A row tile
``[i*tm, (i+1)*tm)`` that holds rows of several groups is visited once per
group; each visit stores only its group's rows. Visits are ordered by group,
then by tile, so revisits of one output tile are consecutive (needed by the
TPU pipeline, which keeps an output block in VMEM while its index repeats).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["GroupMetadata", "make_group_metadata", "max_visits"]


class GroupMetadata(NamedTuple):
    """Per-visit tables for the grid's group axis.

    Attributes:
      offsets: ``[G+1]`` int32, row at which each group starts (CSR style).
      group_ids: ``[V]`` int32, global group of each visit (``V = max_visits``);
        visits past ``num_visits`` repeat the last real visit.
      m_tile_ids: ``[V]`` int32, row tile of each visit.
      num_visits: scalar int32, how many leading visits are real.
    """

    offsets: jax.Array
    group_ids: jax.Array
    m_tile_ids: jax.Array
    num_visits: jax.Array


def max_visits(m: int, tm: int, num_local_groups: int) -> int:
    """Upper bound on visits: every row tile once, plus one per group boundary."""
    return pl_cdiv(m, tm) + num_local_groups - 1


def pl_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make_group_metadata(group_sizes: jax.Array, m: int, tm: int, group_offset: jax.Array | int = 0,
                        num_local_groups: int | None = None) -> GroupMetadata:
    """Visit tables for groups ``[group_offset, group_offset + num_local_groups)``.

    Empty groups get no visit. ``m`` need not be a multiple of ``tm`` (the last
    tile is partial). Rows of groups outside the local block get no visit.
    """
    num_groups = group_sizes.shape[0]
    gl = num_groups if num_local_groups is None else num_local_groups
    if gl < 1 or gl > num_groups:
        raise ValueError(f"make_group_metadata: {gl} local groups but group_sizes has {num_groups}")
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    off = jnp.asarray(group_offset, jnp.int32)
    local = jax.lax.dynamic_slice_in_dim(jnp.stack([offsets[:-1], sizes]), off, gl, axis=1)
    starts, lsizes = local[0], local[1]
    first_tile = starts // tm
    last_tile = (starts + lsizes - 1) // tm
    tiles = jnp.where(lsizes > 0, last_tile - first_tile + 1, 0)
    num_visits = tiles.sum().astype(jnp.int32)
    v = max_visits(m, tm, gl)
    visit = jnp.arange(v, dtype=jnp.int32)
    # Local group of each visit: number of groups whose visits end at or before it.
    visit_ends = jnp.cumsum(tiles)
    lg = jnp.searchsorted(visit_ends, visit, side="right").astype(jnp.int32)
    real = visit < num_visits
    # Padding visits repeat the last real one (same group and tile), so they
    # neither move the output block nor touch new rows.
    last = jnp.maximum(num_visits - 1, 0)
    lg_last = jnp.searchsorted(visit_ends, last, side="right").astype(jnp.int32)
    lg = jnp.where(real, lg, lg_last)
    lg = jnp.minimum(lg, gl - 1)
    visit_idx = jnp.where(real, visit, last)
    visits_before = visit_ends[lg] - tiles[lg]
    m_tile_ids = first_tile[lg] + (visit_idx - visits_before)
    m_tile_ids = jnp.clip(m_tile_ids, 0, pl_cdiv(m, tm) - 1).astype(jnp.int32)
    group_ids = (lg + off).astype(jnp.int32)
    return GroupMetadata(offsets, group_ids, m_tile_ids, num_visits)
