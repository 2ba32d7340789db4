"""The two grouped-matmul drivers: TPU (Mosaic) and GPU (Triton).

Both run the same per-tile math (:mod:`tile_math`) over the same visit tables
(:mod:`metadata`); they differ only in how tiles reach the kernel, which is
where Pallas backends differ:

* ``mosaic``: grid ``(n tiles, visits, k tiles)`` with a dynamic visit count
  (as megablox); the visit tables are
  scalar-prefetched and drive the BlockSpec index maps, so the pipeline DMAs the
  right lhs row tile and expert weight tile; an f32 VMEM accumulator per
  right-hand side. Also the CPU interpret path.
* ``triton``: grid ``(visits, n tiles)``; whole-array refs, the kernel reads
  its visit, loops over k with masked loads (ragged edges read as zero) and
  stores only its group's rows.

Every visit stores only rows of its own group; rows of no local group are
zeroed after the call, which also covers group_offset and padding rows.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.pallas_kernels.metadata import GroupMetadata, make_group_metadata, pl_cdiv
from moejax.pallas_kernels.tile_math import RhsSpec, apply_epilogue, tile_product

__all__ = ["grouped_call", "zero_rows_outside", "split_even_odd"]


def _split_refs(refs, n_lhs: int, specs):
    """Kernel refs -> (lhs refs, one tuple of refs per rhs spec, remaining refs)."""
    rest = refs[n_lhs:]
    rhs_refs = []
    for spec in specs:
        rhs_refs.append(rest[:spec.num_arrays])
        rest = rest[spec.num_arrays:]
    return refs[:n_lhs], rhs_refs, rest


def zero_rows_outside(out: jax.Array, offsets: jax.Array, group_offset: jax.Array, num_local: int) -> jax.Array:
    """Zero rows that belong to no local group (other experts, padding rows)."""
    start = offsets[group_offset]
    end = offsets[group_offset + num_local]
    rows = jnp.arange(out.shape[0], dtype=jnp.int32)
    return jnp.where(((rows >= start) & (rows < end))[:, None], out, jnp.zeros((), out.dtype))


def _check_tiling(driver: str, specs: Sequence[RhsSpec], k: int, tiling: tuple[int, int, int]) -> None:
    tm, tk, tn = tiling
    if min(tiling) <= 0:
        raise ValueError(f"grouped matmul: tile sizes must be positive, got {tiling}")
    for spec in specs:
        if spec.kind == "int4":
            gs = spec.group_size or k
            if tk % gs or k % tk:
                raise ValueError(f"grouped matmul int4 (group size {gs}): the k tile {tk} must be a multiple "
                                 f"of the group size and divide k={k}; pass tiling=(tm, {gs}, tn) or use "
                                 "choose_tiling")
            if driver == "triton" and tk != gs:
                raise ValueError(f"grouped matmul int4 on Triton: the k tile must equal the group size {gs}, got {tk}")
    if driver == "triton":
        for t in tiling:
            if t & (t - 1) or t < 16:
                raise ValueError(f"grouped matmul on Triton: tiles must be powers of two >= 16, got {tiling}")


def grouped_call(lhs_parts: Sequence[jax.Array], rhs: Sequence[tuple[RhsSpec, tuple[jax.Array, ...]]],
                 group_sizes: jax.Array, group_offset: jax.Array, *, k: int, n: int,
                 tiling: tuple[int, int, int], epilogue: str, out_dtype: Any, driver: str,
                 interpret: bool) -> jax.Array:
    """``epilogue(lhs_g @ rhs_1[g], ..., lhs_g @ rhs_j[g])`` for each local group ``g``.

    ``lhs_parts`` is ``(lhs,)`` or ``(lhs_even_cols, lhs_odd_cols)`` for int4;
    every right-hand side has the same spec kind. Returns ``[m, n]`` in
    ``out_dtype`` with rows outside the local groups set to zero.
    """
    specs = tuple(s for s, _ in rhs)
    _check_tiling(driver, specs, k, tiling)
    m = lhs_parts[0].shape[0]
    num_local = rhs[0][1][0].shape[0]
    tm = tiling[0]
    meta = make_group_metadata(group_sizes, m, tm, group_offset, num_local)
    goff = jnp.reshape(group_offset.astype(jnp.int32), (1,))
    run = _mosaic_call if driver == "mosaic" else _triton_call
    out = run(lhs_parts, rhs, meta, goff, k=k, n=n, tiling=tiling, epilogue=epilogue,
              out_dtype=out_dtype, interpret=interpret)
    return zero_rows_outside(out, meta.offsets, goff[0], num_local)


def _compute_dtype(lhs: jax.Array, rhs: Sequence[tuple[RhsSpec, tuple[jax.Array, ...]]]) -> Any:
    dt = lhs.dtype
    for spec, arrays in rhs:
        if spec.kind == "float":
            dt = jnp.promote_types(dt, arrays[0].dtype)
    return dt


def _store_mask(offsets, g, m_tile, tm, tn):
    rows = m_tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
    return (rows >= offsets[g]) & (rows < offsets[g + 1])


# --------------------------------------------------------------------------
# TPU / Mosaic driver (also the CPU interpret path).
# --------------------------------------------------------------------------
def _mosaic_call(lhs_parts, rhs, meta: GroupMetadata, goff, *, k, n, tiling, epilogue, out_dtype, interpret):
    from jax.experimental.pallas import tpu as pltpu

    tm, tk, tn = tiling
    m = lhs_parts[0].shape[0]
    tiles_k, tiles_n = pl_cdiv(k, tk), pl_cdiv(n, tn)
    cdt = _compute_dtype(lhs_parts[0], rhs)
    specs = [s for s, _ in rhs]
    int4 = specs[0].kind == "int4"
    tkx = tk // 2 if int4 else tk  # lhs / weight rows per k tile as stored
    ragged_k = (k % tk) != 0  # only float / int8 (int4 tiles divide k)

    def k_eff(t, k_i, nvis):
        # Padding visits pin k to the last tile so no new blocks are fetched.
        return jnp.where(t < nvis[0], k_i, tiles_k - 1)

    def lhs_map(n_i, t, k_i, offsets, gids, mtiles, nvis, go):
        return mtiles[t], k_eff(t, k_i, nvis)

    def w_map(n_i, t, k_i, offsets, gids, mtiles, nvis, go):
        return gids[t] - go[0], k_eff(t, k_i, nvis), n_i

    def scale_map(n_i, t, k_i, offsets, gids, mtiles, nvis, go):
        return gids[t] - go[0], 0, n_i

    def out_map(n_i, t, k_i, offsets, gids, mtiles, nvis, go):
        return mtiles[t], n_i

    in_specs = [pl.BlockSpec((tm, tkx), lhs_map) for _ in lhs_parts]
    flat_rhs = []
    for spec, arrays in rhs:
        if spec.kind == "float":
            in_specs.append(pl.BlockSpec((None, tk, tn), w_map))
        else:
            in_specs.append(pl.BlockSpec((None, tkx, tn), w_map))
            groups = arrays[1].shape[1]  # scale rows: all k groups (int4) or 1 (int8)
            in_specs += [pl.BlockSpec((None, groups, tn), scale_map)] * (len(arrays) - 1)
        flat_rhs += list(arrays)
    n_lhs, n_acc = len(lhs_parts), len(rhs)
    gpt = (tk // (specs[0].group_size or k)) if int4 else 1  # scale rows per k tile

    def kernel(offsets, gids, mtiles, nvis, go, *refs):
        x_refs, rhs_refs, rest = _split_refs(refs, n_lhs, specs)
        out_ref, accs = rest[0], rest[1:]
        t, k_i = pl.program_id(1), pl.program_id(2)
        real = t < nvis[0]

        @pl.when(k_i == 0)
        def _init():
            for acc in accs:
                acc[...] = jnp.zeros_like(acc)

        @pl.when(real)
        def _accumulate():
            xs = [x[...] for x in x_refs]
            if ragged_k:
                col = k_i * tk + jax.lax.broadcasted_iota(jnp.int32, xs[0].shape, 1)
                xs = [jnp.where(col < k, x, jnp.zeros((), x.dtype)) for x in xs]
            for spec, refs_j, acc in zip(specs, rhs_refs, accs):
                tiles = [refs_j[0][...]]
                if ragged_k:
                    row = k_i * tk + jax.lax.broadcasted_iota(jnp.int32, tiles[0].shape, 0)
                    tiles = [jnp.where(row < k, tiles[0], jnp.zeros((), tiles[0].dtype))]
                for r in refs_j[1:]:
                    tiles.append(r[pl.ds(k_i * gpt, gpt), :] if spec.kind == "int4" else r[...])
                acc[...] += tile_product(spec, xs, tiles, cdt)

        @pl.when(real & (k_i == tiles_k - 1))
        def _store():
            g = gids[t]
            mask = _store_mask(offsets, g, mtiles[t], tm, tn)
            val = apply_epilogue(epilogue, [a[...] for a in accs]).astype(out_dtype)
            out_ref[...] = jnp.where(mask, val, out_ref[...])

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tn), out_map),
            # Dynamic visit count (as megablox): no grid steps are spent on padding visits.
            grid=(tiles_n, meta.num_visits, tiles_k),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32) for _ in range(n_acc)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        cost_estimate=pl.CostEstimate(
            flops=2 * m * k * n * n_acc, transcendentals=m * n if epilogue != "none" else 0,
            bytes_accessed=sum(int(a.size) * a.dtype.itemsize for a in (*lhs_parts, *flat_rhs))
            + m * n * jnp.dtype(out_dtype).itemsize),
        name=f"moejax_gmm_{specs[0].kind}_{epilogue}",
    )
    return call(meta.offsets, meta.group_ids, meta.m_tile_ids, jnp.reshape(meta.num_visits, (1,)), goff,
                *lhs_parts, *flat_rhs)


# --------------------------------------------------------------------------
# GPU / Triton driver.
# --------------------------------------------------------------------------
def _triton_call(lhs_parts, rhs, meta: GroupMetadata, goff, *, k, n, tiling, epilogue, out_dtype, interpret):
    from jax.experimental.pallas import triton as pltriton

    tm, tk, tn = tiling
    m = lhs_parts[0].shape[0]
    tiles_k, tiles_n = pl_cdiv(k, tk), pl_cdiv(n, tn)
    visits = meta.group_ids.shape[0]
    cdt = _compute_dtype(lhs_parts[0], rhs)
    specs = [s for s, _ in rhs]
    int4 = specs[0].kind == "int4"
    tkx = tk // 2 if int4 else tk
    kx = k // 2 if int4 else k
    n_lhs = len(lhs_parts)
    flat_rhs = [a for _, arrays in rhs for a in arrays]

    def kernel(offsets, gids, mtiles, nvis, go, *refs):
        x_refs, rhs_refs, rest = _split_refs(refs, n_lhs, specs)
        out_ref = rest[0]
        t, n_i = pl.program_id(0), pl.program_id(1)
        g = gids[t]
        gl = g - go[0]
        m0 = mtiles[t] * tm
        n0 = n_i * tn
        rows = m0 + jnp.arange(tm, dtype=jnp.int32)
        cols = n0 + jnp.arange(tn, dtype=jnp.int32)

        @pl.when(t < nvis[0])
        def _visit():
            def body(k_i, accs):
                k0 = k_i * tkx
                kk = k0 + jnp.arange(tkx, dtype=jnp.int32)
                xmask = (rows < m)[:, None] & (kk < kx)[None, :]
                xs = [pltriton.load(x.at[pl.ds(m0, tm), pl.ds(k0, tkx)], mask=xmask, other=0) for x in x_refs]
                wmask = (kk < kx)[:, None] & (cols < n)[None, :]
                out = []
                for spec, refs_j, acc in zip(specs, rhs_refs, accs):
                    tiles = [pltriton.load(refs_j[0].at[gl, pl.ds(k0, tkx), pl.ds(n0, tn)], mask=wmask, other=0)]
                    srow = k_i if spec.kind == "int4" else 0  # k tile == group on Triton
                    for r in refs_j[1:]:
                        tiles.append(pltriton.load(r.at[gl, pl.ds(srow, 1), pl.ds(n0, tn)],
                                                   mask=(cols < n)[None, :], other=0))
                    out.append(acc + tile_product(spec, xs, tiles, cdt))
                return tuple(out)

            accs = jax.lax.fori_loop(0, tiles_k, body,
                                     tuple(jnp.zeros((tm, tn), jnp.float32) for _ in specs))
            val = apply_epilogue(epilogue, accs, poly_erf=True).astype(out_dtype)
            mask = ((rows >= offsets[g]) & (rows < offsets[g + 1]) & (rows < m))[:, None] & (cols < n)[None, :]
            pltriton.store(out_ref.at[pl.ds(m0, tm), pl.ds(n0, tn)], val, mask=mask)

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(visits, tiles_n),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name=f"moejax_gmm_{specs[0].kind}_{epilogue}",
    )
    return call(meta.offsets, meta.group_ids, meta.m_tile_ids, jnp.reshape(meta.num_visits, (1,)), goff,
                *lhs_parts, *flat_rhs)


def split_even_odd(lhs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Columns ``0::2`` and ``1::2`` of ``lhs``, matching int4's byte packing along k."""
    return lhs[:, 0::2], lhs[:, 1::2]

