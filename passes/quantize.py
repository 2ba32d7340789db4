"""``quantize``: weight-only quantization of expert weights (lossy; survey section 3.2.2).

Storage formats (defined in the core, :mod:`moejax.weight_formats`; all
dequantize as ``(q - zero) * scale`` in f32, groups of ``group_size`` rows
along the contraction axis ``k`` = axis -2, one scale per group and output
column):

* ``int8`` (per output channel by default) and ``int4-g<G>`` (two nibbles per
  byte): :class:`~moejax.weight_formats.QuantizedTensor`, the format the
  Pallas kernels read.
* ``int3-g<G>`` / ``int2-g<G>``: :class:`~moejax.weight_formats.LowBitTensor`,
  bit-plane packed, so int3 really costs 3/8 byte per weight.
* Mixed precision (``mixed=true``): :class:`~moejax.weight_formats.MixedExpertTensor`,
  one quantized part per bit-width holding that width's experts stacked
  ``[..., E_b, k, n]`` plus ``perm int32 [..., E]``. Every stacked layer gets
  the same number of experts per width (the allocator guarantees that), so
  stacked layers stay scannable.

Every stored value is a pytree whose leaves carry only leading axes, so
``jax.lax.scan`` slicing stacked layers keeps it valid. The ``moe_expert_ffn``
op receives the packed leaves directly and its ``weight_format`` param names
the format (``weight_format=int4-g128``); its implementations dequantize inside
the op.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from moejax import abstract, analysis, dialect, rewrite
from moejax import weight_formats as wf
from moejax.stats import expert_weight_sites
# The storage formats live in the core; re-exported here for existing imports.
from moejax.weight_formats import LowBitTensor, MixedExpertTensor, pack_bitplanes, unpack_bitplanes
from moejax.passes.profile import calibration_batches
from moejax.passes.sensitivity import MAX_BATCHES, weight_change_kl
from moejax.pipeline import Pass, PassContext, PassError, register_pass
from moejax.program import Program

__all__ = ["QuantizeExperts", "LowBitTensor", "MixedExpertTensor", "quantize_weight", "pack_bitplanes",
           "unpack_bitplanes", "allocate_bits", "allocate_bits_global", "scale_to_measured", "STORAGE_BITS",
           "expert_weight_sites"]

STORAGE_BITS = (2, 3, 4, 8)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
# Dense FFN / shared-expert kernels of moejax.models (DenseFFN under "shared" or a dense layer's "mlp").
_SHARED_RE = re.compile(r"(^|/)(shared|mlp)/(gate_proj|up_proj|down_proj)/kernel$")


# --------------------------------------------------------------------------
# Quantizing one tensor.
# --------------------------------------------------------------------------
def _quantize_plain(w: jax.Array, bits: int, gs: int | None, symmetric: bool) -> Any:
    if bits in wf.SUPPORTED_BITS:
        return wf.quantize(w, bits=bits, group_size=gs, symmetric=symmetric)
    return wf.quantize_lowbit(w, bits, gs, symmetric)


def _group_err(w: jax.Array, dq: jax.Array, gs: int) -> jax.Array:
    k = w.shape[-2]
    d = (w.astype(jnp.float32) - dq).reshape(*w.shape[:-2], k // gs, gs, w.shape[-1])
    return jnp.sum(d * d, axis=-2)  # [..., k/gs, n]


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def quantize_weight(w: jax.Array, bits: int, group_size: int | None, symmetric: bool,
                    clip_search: bool = False) -> Any:
    """Quantize ``w [..., k, n]`` along ``k`` to ``bits`` (2, 3, 4 or 8).

    With ``clip_search``, each (group, column) picks the clip ratio of its range
    from :data:`CLIP_RATIOS` with the least squared error (AWQ/OmniQuant-style
    clipping, weight-space objective); the weight is clipped accordingly and
    quantized once more, which reproduces the chosen candidate exactly.
    """
    w = jnp.asarray(w, jnp.float32)
    if not clip_search:
        return _quantize_plain(w, bits, group_size, symmetric)
    k = w.shape[-2]
    gs = group_size or k
    g = w.reshape(*w.shape[:-2], k // gs, gs, w.shape[-1])
    lo, hi = jnp.min(g, axis=-2), jnp.max(g, axis=-2)
    if symmetric:
        hi = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        lo = -hi
    best_err, best_ratio = None, None
    for r in CLIP_RATIOS:
        wc = _clip_groups(w, lo * r, hi * r, gs)
        err = _group_err(w, _quantize_plain(wc, bits, group_size, symmetric).dequantize(jnp.float32), gs)
        if best_err is None:
            best_err, best_ratio = err, jnp.full_like(err, r)
        else:
            better = err < best_err
            best_err = jnp.where(better, err, best_err)
            best_ratio = jnp.where(better, r, best_ratio)
    return _quantize_plain(_clip_groups(w, lo * best_ratio, hi * best_ratio, gs), bits, group_size, symmetric)


def _clip_groups(w, lo, hi, gs):
    k = w.shape[-2]
    g = w.reshape(*w.shape[:-2], k // gs, gs, w.shape[-1])
    return jnp.clip(g, lo[..., None, :], hi[..., None, :]).reshape(w.shape)


# --------------------------------------------------------------------------
# Mixed precision: bits per expert from the routing profile.
# --------------------------------------------------------------------------
def _candidates(importance: np.ndarray, err: np.ndarray, choices: Sequence[int]):
    """Every count vector (experts per width, widest to most important) with its total error.

    Returns ``(order [S,E], [(bounds, cost, code_bits_per_stack_expert_sum)])``.
    """
    s_dim, e = importance.shape
    order = np.argsort(-importance, axis=1, kind="stable")  # most important first
    ranked = np.take_along_axis(err, order[:, :, None], axis=1)  # [S, E, C]
    cum = np.concatenate([np.zeros((s_dim, 1, len(choices))), np.cumsum(ranked, axis=1)], axis=1)
    out = []
    for cuts in itertools.combinations_with_replacement(range(e + 1), len(choices) - 1):
        bounds = (0,) + cuts + (e,)
        counts = np.diff(bounds)
        cost = sum(float(np.sum(cum[:, bounds[i + 1], i] - cum[:, bounds[i], i])) for i in range(len(choices)))
        out.append((bounds, cost, int(np.dot(counts, choices))))
    return order, out


def _bits_from_bounds(order: np.ndarray, bounds, choices) -> np.ndarray:
    s_dim, e = order.shape
    rank_bits = np.concatenate([np.full(bounds[i + 1] - bounds[i], b) for i, b in enumerate(choices)])
    out = np.empty((s_dim, e), int)
    np.put_along_axis(out, order, np.broadcast_to(rank_bits, (s_dim, e)), axis=1)
    return out


def allocate_bits(importance: np.ndarray, err: np.ndarray, budget: float,
                  choices: Sequence[int] = STORAGE_BITS) -> np.ndarray:
    """Bits per expert ``int [S, E]`` of one MoE layer under an average of ``budget`` bits per expert.

    ``importance [S, E]`` ranks experts inside each stacked layer (routing
    mass); ``err [S, E, len(choices)]`` is the importance-weighted error of each
    expert at each width (``choices`` in decreasing order). Every stacked layer
    gets the same count of experts per width (so stacked layers stay
    scannable): all count vectors meeting the budget are tried, experts taking
    widths in importance order (most important widest), and the vector with the
    least total error wins. Uniform widths are candidates too, so the result is
    never worse than uniform under this error model.
    """
    return allocate_bits_global({"": (importance, err, 1)}, budget, choices)[""]


def allocate_bits_global(layers: dict[str, tuple[np.ndarray, np.ndarray, int]], budget: float,
                         choices: Sequence[int] = STORAGE_BITS) -> dict[str, np.ndarray]:
    """Bits per expert for several MoE layers under one average budget over all expert weights.

    ``layers[name] = (importance [S,E], err [S,E,C], weights_per_expert)``.
    Each layer picks one count vector (see :func:`allocate_bits`); the choice
    across layers is a multiple-choice knapsack solved by Lagrangian relaxation
    (bisection on the price of a bit), so sensitive layers can take more bits
    than robust ones. The result always meets the budget.
    """
    choices = sorted(choices, reverse=True)
    cands, total = {}, 0.0
    for name, (imp, err, per_expert) in layers.items():
        order, cs = _candidates(imp, err, choices)
        s_dim, e = imp.shape
        cands[name] = (order, [(b, c, bits * s_dim * per_expert) for b, c, bits in cs])
        total += s_dim * e * per_expert
    limit = budget * total + 1e-6

    def pick(lam):
        chosen = {n: min(cs, key=lambda t: (t[1] + lam * t[2], t[2])) for n, (_, cs) in cands.items()}
        return chosen, sum(t[2] for t in chosen.values())

    chosen, used = pick(0.0)
    if used > limit:
        lo, hi = 0.0, 1.0
        while pick(hi)[1] > limit:
            hi *= 4.0
            if hi > 1e30:
                raise ValueError(f"no allocation of widths {choices} averages at most {budget} bits")
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if pick(mid)[1] > limit else (lo, mid)
        chosen, used = pick(hi)
        # Spend what the relaxation left over: best error drop per extra bit, while it fits.
        while True:
            best = None
            for n, (_, cs) in cands.items():
                cur = chosen[n]
                for t in cs:
                    extra = t[2] - cur[2]
                    if t[1] < cur[1] and used + extra <= limit:
                        gain = (cur[1] - t[1]) / max(extra, 1e-9)
                        if best is None or gain > best[0]:
                            best = (gain, n, t)
            if best is None:
                break
            used += best[2][2] - chosen[best[1]][2]
            chosen[best[1]] = best[2]
    return {n: _bits_from_bounds(cands[n][0], chosen[n][0], choices) for n in cands}


def scale_to_measured(err: np.ndarray, measured: Mapping[int, float],
                      choices: Sequence[int] = STORAGE_BITS) -> np.ndarray:
    """``err [S,E,C]`` with each width's errors scaled to sum to the layer's measured KL at that width.

    The layer-local errors keep ranking the experts inside the layer; the sums
    become the measured end-to-end costs, comparable across layers.
    """
    out = np.array(err, np.float64)
    for ci, b in enumerate(sorted(choices, reverse=True)):
        out[:, :, ci] *= measured[b] / max(float(out[:, :, ci].sum()), 1e-30)
    return out


def _mixed_tensor(w: jax.Array, bits_se: np.ndarray, group_size: int, symmetric_for, clip: bool
                  ) -> MixedExpertTensor:
    """Quantize stacked experts ``w [*lead, E, k, n]`` with ``bits_se [prod(lead), E]``."""
    lead, (e, k, n) = w.shape[:-3], w.shape[-3:]
    ws = jnp.reshape(w, (-1, e, k, n))
    parts, pos = [], np.zeros(bits_se.shape, np.int32)
    offset = 0
    for b in sorted(set(bits_se.ravel().tolist()), reverse=True):
        idx = np.stack([np.flatnonzero(row == b) for row in bits_se])  # [S, E_b]: same count per layer
        sub = jnp.take_along_axis(ws, jnp.asarray(idx)[:, :, None, None], axis=1)
        gs = None if b == 8 else group_size
        qt = quantize_weight(sub.reshape(*lead, idx.shape[1], k, n), b, gs, symmetric_for(b), clip)
        parts.append(qt)
        np.put_along_axis(pos, idx, offset + np.arange(idx.shape[1])[None, :], axis=1)
        offset += idx.shape[1]
    return MixedExpertTensor(tuple(parts), jnp.asarray(pos.reshape(*lead, e)))


# --------------------------------------------------------------------------
# Re-binding the expert op on the quantized weights.
# --------------------------------------------------------------------------
def _requantize_rule(ctx: rewrite.RuleContext):
    """Re-bind the expert op on the quantized pytrees so its params name the format."""
    leaves = ctx.invals[2:]
    if not any(wf.is_structured(v) for v in leaves):
        return None
    return rewrite.rebind_expert_ffn(ctx)


# --------------------------------------------------------------------------
# The pass.
# --------------------------------------------------------------------------
@register_pass
@dataclasses.dataclass(frozen=True)
class QuantizeExperts(Pass):
    """Weight-only quantization of routed-expert weights; router weights stay float.

    Options:
      bits: storage width 8, 4, 3 or 2; with ``mixed=true`` an average budget in
        [2, 8] (e.g. 3.5) split over experts by importance.
      group_size: rows of ``k`` sharing a scale for widths below 8 (default 128;
        must divide every expert matrix's contraction dim). int8 is per output
        channel unless a group size is given explicitly.
      symmetric: symmetric codes (zero fixed) or asymmetric (float zero per
        group); none: symmetric for 8 and 4 bits, asymmetric for 3 and 2 bits.
      mixed: per-expert widths from {2,3,4,8} under the ``bits`` budget, guided by
        the routing profile (needs ``profile`` earlier in the pipeline) and, on
        token -> logits programs, by each layer's measured end-to-end KL on the
        calibration windows (``metadata["bit_allocation"]`` keeps what was measured).
      include_shared: also quantize shared-expert / dense-FFN kernels (uniform
        width: ``bits`` rounded up to a storage width); they are dequantized where
        the ordinary matmuls read them.
      clip_search: per-(group, column) clip-ratio search minimising weight error.
    """

    name: ClassVar[str] = "quantize"
    exact: ClassVar[bool] = False
    # Uniform widths only need shapes (abstract weights get jax.eval_shape of the quantizer, so their
    # packed bytes are exact); mixed=true needs the profile, which needs values and refuses first.
    needs_weight_values: ClassVar[bool] = False
    needs_stacked_experts: ClassVar[bool] = True
    # What __post_init__ (and check, for group_size) accepts; shown by `moejax passes`.
    option_ranges: ClassVar[Mapping[str, str]] = {
        "bits": "8, 4, 3 or 2 (with mixed=true: a budget in [2, 8])",
        "group_size": "even integer >= 2 dividing the experts' contraction dim, or none",
        "symmetric": "true, false or none (none: symmetric for 8 and 4 bits)",
        "mixed": "true or false",
        "include_shared": "true or false",
        "clip_search": "true or false",
    }

    bits: float = 8
    group_size: int | None = None
    symmetric: bool | None = None
    mixed: bool = False
    include_shared: bool = False
    clip_search: bool = False

    def __post_init__(self):
        if self.mixed:
            if not 2 <= self.bits <= 8:
                raise ValueError(f"mixed precision needs an average bits budget in [2, 8], got bits={self.bits}")
        elif self.bits not in STORAGE_BITS:
            raise ValueError(f"bits={self.bits} is not a storage width; use one of {STORAGE_BITS}, or mixed=true "
                             f"for an average budget such as bits=3.5")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 2
                                            or self.group_size % 2):
            raise ValueError(f"group_size must be an even integer >= 2 (or none), got {self.group_size!r}")
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true, false or none, got {self.symmetric!r}")

    # ---- option helpers ------------------------------------------------------
    def _group(self, bits: int) -> int | None:
        if bits == 8:
            return self.group_size  # None: per output channel
        return self.group_size or 128

    def _symmetric(self, bits: int) -> bool:
        return self.symmetric if self.symmetric is not None else bits >= 4

    def _uniform_bits(self) -> int:
        return int(min(b for b in STORAGE_BITS if b >= self.bits))

    # ---- checks ---------------------------------------------------------------
    def check(self, program: Program, ctx: PassContext) -> None:
        if self.mixed and "routing_profile" not in program.metadata:
            raise PassError(f"pass {self} needs the routing profile to give frequent experts more bits; add the "
                            f"profile pass before it, e.g. 'profile,{self}'")
        sites = expert_weight_sites(program)
        if not sites:
            raise PassError(f"pass {self}: the program has no moe_expert_ffn weights to quantize")
        widths = sorted({self._uniform_bits()} if not self.mixed else {b for b in STORAGE_BITS if b < 8})
        for path, (layer, _) in sites.items():
            w = program.weights[path]
            if wf.is_structured(w):
                raise PassError(f"pass {self}: expert weight {path} of layer {layer!r} is already quantized "
                                f"({w.format}); quantize once, from float weights")
            k = w.shape[-2]
            for b in widths:
                gs = self._group(b)
                if gs is not None and k % gs:
                    divisors = [g for g in (16, 32, 64, 128, 256) if k % g == 0]
                    raise PassError(f"pass {self}: group_size={gs} does not divide the contraction dim {k} of "
                                    f"{path} {list(w.shape)} (layer {layer!r}); use group_size in {divisors}")
                if b < 4 and k % 8:
                    raise PassError(f"pass {self}: {b}-bit packing needs the contraction dim of {path} "
                                    f"{list(w.shape)} to be a multiple of 8, got {k}; use bits >= 4")
            if self.mixed:
                prof = analysis.read(program.metadata, analysis.RoutingProfile).layers.get(layer)
                if prof is None or prof.mass is None or prof.frequency is None:
                    raise PassError(f"pass {self}: the routing profile has no entry for layer {layer!r}; run "
                                    f"profile right before quantize (after passes that change experts)")
                s_dim, e = prof.counts.shape
                if int(np.prod(w.shape[:-3])) != s_dim or w.shape[-3] != e:
                    raise PassError(f"pass {self}: profile of layer {layer!r} has {s_dim}x{e} (stack x experts) "
                                    f"but weight {path} is {list(w.shape)}; re-run profile after changing experts")

    # ---- run ------------------------------------------------------------------
    def run(self, program: Program, ctx: PassContext) -> Program:
        sites = expert_weight_sites(program)
        new: dict[str, Any] = {}
        notes: dict[str, Any] = {}
        allocation = None
        if self.mixed:
            by_layer: dict[str, list[str]] = {}
            for path, (layer, _) in sites.items():
                by_layer.setdefault(layer, []).append(path)
            step = ctx.step(self)
            allocation = ctx.analysis.get(analysis.BitAllocation, step)  # the first program's choice
            if allocation is None or set(allocation.layers) != set(by_layer):
                allocation = ctx.analysis.put(step, self._allocate(program, ctx, by_layer))
            for layer, paths in by_layer.items():
                bits = allocation.layers[layer]
                notes[layer] = bits
                for path in paths:
                    w = program.weights[path]
                    new[path] = ctx.derived_weight(  # shared by the programs of one optimize call
                        f"quantize-mixed-{step}-{layer}", w,
                        lambda w=w, bits=bits: _mixed_tensor(w, bits, self.group_size or 128, self._symmetric,
                                                             self.clip_search))
        else:
            b = self._uniform_bits()
            for path in sites:
                w = program.weights[path]
                new[path] = ctx.derived_weight(  # shared by the programs of one optimize call
                    f"quantize-{b}-{self._group(b)}-{self._symmetric(b)}-{self.clip_search}", w,
                    lambda w=w: self._quantize(w, b, self._group(b)))
        if self.include_shared:
            b = self._uniform_bits()
            for path, w in program.weights.items():
                if _SHARED_RE.search(path) and path not in new and not wf.is_structured(w):
                    gs = self._group(b)
                    if gs is not None and w.shape[-2] % gs:
                        raise PassError(f"pass {self}: group_size={gs} does not divide the contraction dim "
                                        f"{w.shape[-2]} of shared/dense FFN weight {path} {list(w.shape)}")
                    new[path] = self._quantize(w, b, gs)
        meta = {"quantization": {"pass": str(self), "formats": {p: v.format for p, v in new.items()}}}
        if allocation is not None:
            meta = analysis.write(meta, allocation)
            meta["quantization"]["expert_bits"] = notes
        return program.rewrite({dialect.expert_ffn_p.name: _requantize_rule}, weights=new, metadata=meta)

    def _quantize(self, w: Any, bits: int, group_size: int | None) -> Any:
        """``w`` quantized uniformly; an abstract ``w`` gives the abstract result (exact packed shapes)."""
        return abstract.eval_or_shape(
            lambda v: quantize_weight(v, bits, group_size, self._symmetric(bits), self.clip_search), w)

    def _allocate(self, program: Program, ctx: PassContext, by_layer: dict[str, list[str]]
                  ) -> analysis.BitAllocation:
        """Bits per expert for every layer: the best of up to three allocations, by measured KL.

        Candidates: the layer-local error model alone (``local``); the same with each
        layer's errors scaled to its measured end-to-end cost (``measured``); every
        expert at the widest storage width the budget affords (``uniform``). Both
        models are proxies, and each has lost to the other on a bundled model, so each
        allocation is measured end to end on calibration windows and the least KL
        wins. Without a measurement (not a token -> logits program): ``local``.
        """
        budget = float(self.bits)
        kl = self._sensitivity(program, ctx)
        local, measured = {}, {}
        for layer, paths in by_layer.items():
            local[layer], measured[layer] = self._allocation_inputs(program, layer, paths, kl)
        candidates = {"local": allocate_bits_global(local, budget)}
        if kl is None:
            return analysis.BitAllocation(budget, candidates["local"])
        scaled = {layer: (imp, scale_to_measured(err, measured[layer]), per)
                  for layer, (imp, err, per) in local.items()}
        candidates["measured"] = allocate_bits_global(scaled, budget)
        uniform = max(b for b in STORAGE_BITS if b <= budget)
        candidates["uniform"] = {layer: np.full_like(bits, uniform) for layer, bits in candidates["local"].items()}

        def dequantized(bits: dict[str, np.ndarray]) -> dict[str, jax.Array]:  # as stored, back in float
            return {path: jnp.reshape(_mixed_tensor(program.weights[path], bits[layer], self.group_size or 128,
                                                    self._symmetric, self.clip_search).dequantize(jnp.float32),
                                      program.weights[path].shape)
                    for layer, paths in by_layer.items() for path in paths}

        candidate_kl: dict[str, float] = {}
        for name, bits in candidates.items():
            same = next((n for n in candidate_kl if all((candidates[n][l] == bits[l]).all() for l in bits)), None)
            # close calls (a few % apart): as many calibration tokens as the measurement takes
            candidate_kl[name] = candidate_kl[same] if same else kl(dequantized(bits), MAX_BATCHES)
        best = min(candidate_kl, key=candidate_kl.get)
        return analysis.BitAllocation(budget, candidates[best], measured, candidate_kl)

    def _sensitivity(self, program: Program, ctx: PassContext):
        """:func:`weight_change_kl` on the calibration windows; None where it cannot be measured."""
        try:
            batches, _ = calibration_batches(program, ctx, who=self.name)
        except PassError:  # not a token program, or no calibration data: the layer-local error model alone
            return None
        return weight_change_kl(program, batches)

    def _allocation_inputs(self, program: Program, layer: str, paths: list[str],
                           kl: Callable[..., float] | None = None):
        """((importance [S,E], error [S,E,C], weights per expert), {bits: measured KL}) of one MoE layer.

        The error of expert ``e`` at width ``b`` is its importance (share of the
        layer's routing mass) times the mean squared change of its output on the
        profile's sample of the layer's input tokens, all its matrices quantized
        at ``b``: the expected squared error the choice adds to the layer output.
        Without a token sample it falls back to the relative weight error.

        That error ranks the experts of one layer, but not the layers: the same
        output error costs more in early layers. With ``kl`` (see
        :func:`weight_change_kl`), the layer's end-to-end KL with all its experts
        at each width is measured too (see :func:`scale_to_measured`).
        """
        prof = analysis.read(program.metadata, analysis.RoutingProfile).layers[layer]
        mass = np.asarray(prof.mass, np.float64)
        freq = np.asarray(prof.frequency, np.float64)
        tot = mass.sum(1, keepdims=True)
        imp = np.where(tot > 0, mass / np.maximum(tot, 1e-30), freq) + 1e-6  # unused experts: error still ranks
        s_dim, e = imp.shape
        choices = sorted(STORAGE_BITS, reverse=True)
        by_pos = {expert_weight_sites(program)[p][1]: p for p in paths}
        mats = [jnp.reshape(jnp.asarray(program.weights[by_pos[i]], jnp.float32),
                            (s_dim, e) + program.weights[by_pos[i]].shape[-2:]) for i in sorted(by_pos)]
        per_expert = int(sum(m.shape[-2] * m.shape[-1] for m in mats))
        activation = next(s.eqn.params["activation"] for s in rewrite.dialect_sites(program.jaxpr, "moe_expert_ffn")
                          if s.name == layer)
        x = jnp.asarray(prof.inputs if prof.inputs is not None else np.zeros((s_dim, 0, 1)), jnp.float32)  # [S,n,d]
        use_outputs = x.shape[1] > 0 and len(mats) == len(by_pos) and x.shape[-1] == mats[0].shape[-2]
        ref = _expert_outputs(x, mats, activation) if use_outputs else None
        err, measured = np.zeros((s_dim, e, len(choices))), {}
        for ci, b in enumerate(choices):
            gs = None if b == 8 else (self.group_size or 128)
            deq = [quantize_weight(m, b, gs, self._symmetric(b), self.clip_search).dequantize(jnp.float32)
                   for m in mats]
            if use_outputs:
                diff = _expert_outputs(x, deq, activation) - ref  # [S, E, n, d]
                err[:, :, ci] = np.asarray(jnp.mean(jnp.sum(diff * diff, -1), -1), np.float64)
            else:
                for m, dq in zip(mats, deq):
                    err[:, :, ci] += np.asarray(jnp.sum((m - dq) ** 2, axis=(-2, -1)) /
                                                jnp.maximum(jnp.sum(m * m, axis=(-2, -1)), 1e-30), np.float64)
            err[:, :, ci] *= imp
            if kl is not None:
                measured[b] = max(0.0, kl({by_pos[i]: jnp.reshape(dq, program.weights[by_pos[i]].shape)
                                           for i, dq in zip(sorted(by_pos), deq)}))
        return (imp, err, per_expert), measured


@functools.partial(jax.jit, static_argnums=(2,))
def _expert_outputs(x: jax.Array, mats: list[jax.Array], activation: str) -> jax.Array:
    """Every expert on every sample token: ``x [S,n,d]``, mats ``[S,E,k,n]`` -> ``[S,E,n,d]``."""
    return dialect.expert_ffn_math(x, mats, activation)
