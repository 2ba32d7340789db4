"""``profile``: measure how a program routes calibration tokens (analysis pass, exact).

The pass runs the program on calibration token batches with taps on
``moe_route`` (hidden states, combine weights, expert ids), ``moe_dispatch``
(row order) and ``moe_expert_ffn`` (group sizes, expert outputs), then reduces
them on the host into a :class:`moejax.analysis.RoutingProfile`, one
:class:`~moejax.analysis.LayerRouting` per layer name::

    profile = analysis.read(program.metadata, RoutingProfile)
    profile.layers[layer_name]: counts [S,E], frequency [S,E], mass [S,E], coactivation [S,E,E],
                                output_mean [S,E,d], inputs [S,n,d], tokens: int, mean_active: float

(the metadata holds its plain form, ``metadata["routing_profile"][layer_name]["counts"]``).

``S`` is the stack axis: 1 for an unrolled layer, the number of layers for a
layer stacked under ``scan`` (name ``layers/*/mlp``).

Calibration batches may have any ``[b, s]`` shape: they are cut and padded
into windows of the program's own token shape (a Program is traced for one
shape) and padded positions are masked out of every statistic.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from moejax import analysis, dialect, rewrite
from moejax.pipeline import Pass, PassContext, PassError, register_pass
from moejax.program import Program

__all__ = ["ProfileRouting", "measure_routing", "calibration_batches", "windows", "token_input_shape",
           "save_load_heatmap", "MAX_INPUT_SAMPLES", "profile_matches"]

log = logging.getLogger(__name__)

MAX_INPUT_SAMPLES = 1024  # hidden states kept per layer ("inputs"): first n valid tokens (REAP, NAEE, refits)
_SEP = "\x00"  # tap key separator: layer names contain '/'


# --------------------------------------------------------------------------
# Calibration windows in the program's shape.
# --------------------------------------------------------------------------
def token_input_shape(program: Program) -> tuple[int, int]:
    """``(B, S)`` of a program whose only input is int tokens ``[B, S]``; else a clear error."""
    avals = program.in_avals
    if len(avals) != 1 or len(avals[0].shape) != 2 or not jnp.issubdtype(avals[0].dtype, jnp.integer):
        raise PassError(
            f"profile: the program takes {program.signature()}, but routing is measured on a program whose only "
            "input is int tokens [B, S] (the prefill/forward program). Profile the forward program first; "
            "moejax.optimize(..., decode_example=...) reuses that profile for the decode program")
    b, s = avals[0].shape
    return int(b), int(s)


def windows(batches: Sequence[Any], batch: int, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token batches of any shape -> ``[(tokens [B,S] int32, valid [B,S] bool)]`` for the program."""
    rows, masks = [], []
    for i, b in enumerate(batches):
        arr = np.asarray(b)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise PassError(f"profile: calibration batch {i} must be int tokens [B, S], got {arr.dtype}{list(arr.shape)}")
        for row in arr:
            for start in range(0, len(row), seq_len):  # long rows: consecutive windows; short: padded
                piece = row[start:start + seq_len]
                win = np.zeros(seq_len, np.int32)
                win[:len(piece)] = piece
                m = np.zeros(seq_len, bool)
                m[:len(piece)] = True
                rows.append(win)
                masks.append(m)
    if not rows:
        raise PassError("profile: no calibration tokens (empty calibration list)")
    out = []
    for i in range(0, len(rows), batch):
        t = np.zeros((batch, seq_len), np.int32)
        m = np.zeros((batch, seq_len), bool)
        n = min(batch, len(rows) - i)
        t[:n], m[:n] = rows[i:i + n], masks[i:i + n]
        out.append((t, m))
    return out


# --------------------------------------------------------------------------
# Taps and their reduction.
# --------------------------------------------------------------------------
def _route_rule(ctx: rewrite.RuleContext):
    w, ids = ctx.bind()
    ctx.tap(f"{ctx.name}{_SEP}x", ctx.invals[0])
    ctx.tap(f"{ctx.name}{_SEP}w", w)
    ctx.tap(f"{ctx.name}{_SEP}ids", ids)
    return [w, ids]


def _dispatch_rule(ctx: rewrite.RuleContext):
    grouped, sizes, order = ctx.bind()
    ctx.tap(f"{ctx.name}{_SEP}order", order)
    return [grouped, sizes, order]


def _ffn_rule(ctx: rewrite.RuleContext):
    out = ctx.bind()
    ctx.tap(f"{ctx.name}{_SEP}sizes", ctx.invals[1])
    ctx.tap(f"{ctx.name}{_SEP}out", out)
    return out


_TAP_RULES = {"moe_route": _route_rule, "moe_dispatch": _dispatch_rule, "moe_expert_ffn": _ffn_rule}


def _layer_specs(program: Program) -> dict[str, dict[str, Any]]:
    """Per layer name: expert count and unstacked tap ranks, from the dialect sites."""
    specs: dict[str, dict[str, Any]] = {}
    for site in rewrite.dialect_sites(program.jaxpr):
        op = site.eqn.primitive.name
        spec = specs.setdefault(site.name, {})
        if op in spec:
            raise PassError(f"profile: layer name {site.name!r} is used by two {op} ops; every MoE layer needs a "
                            "unique name (SparseMoE(name=...)) for its profile")
        spec[op] = site.eqn
    for name, spec in specs.items():
        missing = [op for op in _TAP_RULES if op not in spec]
        if missing:
            raise PassError(f"profile: layer {name!r} has no {', '.join(missing)} op (was it replaced by an "
                            "expert-parallel or fused region?); run profile before such passes")
    return specs


class _Accumulator:
    """Host-side float64 sums of one layer's statistics over calibration batches."""

    def __init__(self, n_experts: int, d: int):
        self.e, self.d = n_experts, d
        self.counts = self.mass = self.coact = self.out_sum = None
        self.inputs: list[np.ndarray] = []
        self.n_inputs = 0
        self.tokens = 0
        self.active = 0.0

    def add(self, x, w, ids, order, sizes, out, valid):
        """One batch. Arrays carry a leading stack axis S; ``valid`` is [T] over tokens."""
        s_dim, t, k = ids.shape
        e = self.e
        if self.counts is None:
            self.counts = np.zeros((s_dim, e))
            self.mass = np.zeros((s_dim, e))
            self.coact = np.zeros((s_dim, e, e))
            self.out_sum = np.zeros((s_dim, e, self.d))
        slot_ok = (ids >= 0) & valid[None, :, None]  # [S,T,K]
        self.tokens += int(valid.sum())
        self.active += float(slot_ok.sum())
        safe = np.where(slot_ok, ids, e)  # invalid slots into an extra bin
        for s in range(s_dim):
            self.counts[s] += np.bincount(safe[s].ravel(), minlength=e + 1)[:e]
            self.mass[s] += np.bincount(safe[s].ravel(), weights=w[s].ravel().astype(np.float64),
                                        minlength=e + 1)[:e]
            onehot = np.zeros((t, e + 1))
            np.add.at(onehot, (np.repeat(np.arange(t), k), safe[s].ravel()), 1.0)
            sel = np.minimum(onehot[:, :e], 1.0)
            self.coact[s] += sel.T @ sel
            # Expert outputs: grouped row r belongs to expert row_group[r], token order[r] // k.
            ends = np.cumsum(sizes[s])
            rg = np.searchsorted(ends, np.arange(order.shape[1]), side="right")
            row_ok = (rg < e) & valid[order[s] // k]
            np.add.at(self.out_sum[s], rg[row_ok], out[s][row_ok].astype(np.float64))
        if self.n_inputs < MAX_INPUT_SAMPLES:
            take = x[:, valid][:, :MAX_INPUT_SAMPLES - self.n_inputs]
            self.inputs.append(np.asarray(take, np.float32))
            self.n_inputs += take.shape[1]

    def result(self) -> analysis.LayerRouting:
        counts = self.counts
        diag = np.arange(self.e)
        self.coact[:, diag, diag] = counts  # spec: diagonal = counts (even with repeated slots)
        total = counts.sum(axis=1, keepdims=True)
        freq = counts / np.maximum(total, 1.0)
        out_mean = (self.out_sum / np.maximum(counts, 1.0)[..., None]).astype(np.float32)
        s_dim = counts.shape[0]
        return analysis.LayerRouting(
            counts=counts,
            frequency=freq,
            mass=self.mass,
            coactivation=self.coact,
            output_mean=out_mean,
            inputs=np.concatenate(self.inputs, axis=1) if self.inputs else np.zeros((s_dim, 0, self.d), np.float32),
            tokens=int(self.tokens),
            mean_active=float(self.active / max(self.tokens * s_dim, 1)),
        )


def _stacked(a: Any, base_ndim: int) -> np.ndarray:
    """Tap array with all leading scan axes merged into one stack axis S (S=1 unrolled)."""
    a = np.asarray(a)
    lead = a.shape[:a.ndim - base_ndim]
    return a.reshape((int(np.prod(lead, dtype=int)),) + a.shape[a.ndim - base_ndim:])


def measure_routing(program: Program, batches: Sequence[Any]) -> analysis.RoutingProfile:
    """The routing profile of ``program`` on token ``batches`` (see the module doc).

    ``batches`` are int token arrays of any ``[b, s]`` shape; they are cut and
    padded into windows of the program's ``[B, S]`` input and padded tokens are
    not counted. Gating, pruning and merging passes call this to re-measure.
    """
    batch, seq_len = token_input_shape(program)
    specs = _layer_specs(program)
    if not specs:
        raise PassError("profile: the program has no moe_* ops; nothing to profile")
    accs = {}
    for name, spec in specs.items():
        e = int(spec["moe_dispatch"].params["num_experts"])
        d = int(spec["moe_route"].invars[0].aval.shape[1])
        accs[name] = _Accumulator(e, d)
    for tokens, mask in windows(batches, batch, seq_len):
        _, taps = program.run_with_taps(_TAP_RULES, jnp.asarray(tokens))
        valid = mask.reshape(-1)
        for name, acc in accs.items():
            g = lambda key, nd: _stacked(taps[f"{name}{_SEP}{key}"], nd)  # noqa: E731
            x = g("x", 2)
            if x.shape[1] != valid.shape[0]:
                raise PassError(f"profile: layer {name!r} routes {x.shape[1]} rows per call but the input has "
                                f"{valid.shape[0]} tokens; profile expects one routed row per token")
            acc.add(x, g("w", 2), g("ids", 2), g("order", 1), g("sizes", 1), g("out", 2), valid)
    return analysis.RoutingProfile({name: acc.result() for name, acc in accs.items()})


def profile_matches(program: Program, profile: analysis.RoutingProfile) -> bool:
    """Whether ``profile`` describes the MoE layers of ``program`` (names and expert counts)."""
    try:
        specs = _layer_specs(program)
    except PassError:
        return False
    if set(specs) != set(profile.layers):
        return False
    return all(profile.layers[n].num_experts == int(s["moe_dispatch"].params["num_experts"])
               for n, s in specs.items())


def calibration_batches(program: Program, ctx: PassContext, calibration_bytes: int = 65536,
                        seq_len: int | None = None, who: str = "profile") -> tuple[list[Any], str]:
    """The token batches a calibrating pass runs on, and what they are.

    ``ctx.calibration`` when given, else the first ``calibration_bytes`` of the
    default model's training text in ``seq_len`` windows (byte-level models only),
    else the example inputs. ``who`` names the calling pass in warnings and errors.
    """
    _, s = token_input_shape(program)
    if ctx.calibration is not None:
        return list(ctx.calibration), "calibration"
    seq_len = seq_len or s
    vocab = int(program.jaxpr.out_avals[0].shape[-1]) if program.jaxpr.out_avals else 0
    if vocab >= 256:
        try:
            from moejax import data
            tokens = data.calibration_tokens(max(calibration_bytes, seq_len), seq_len)
            return [tokens], f"train_bytes[:{tokens.size}]"
        except (ImportError, AttributeError, OSError, ValueError) as e:
            log.warning("%s: training text unavailable (%s); using the example inputs", who, e)
    else:
        log.warning("%s: model vocabulary %d < 256 cannot read byte text; calibrating on the example "
                    "inputs (pass calibration=[token batches] for a real profile)", who, vocab)
    if not ctx.example_args:
        raise PassError(f"{who}: no calibration data: pass calibration=[token batches] to optimize")
    return [np.asarray(ctx.example_args[0])], "example_args"


# --------------------------------------------------------------------------
# The pass.
# --------------------------------------------------------------------------
@register_pass
@dataclasses.dataclass(frozen=True)
class ProfileRouting(Pass):
    """Measure expert frequency, routing mass, co-activation and mean outputs per MoE layer.

    Calibration tokens come from ``ctx.calibration`` when given, else the first
    ``calibration_bytes`` of the default model's training text (byte-level
    models only), else the example inputs. Windows are ``seq_len`` tokens long
    (default: the program's sequence length) and are run ``batch`` at a time
    (must equal the program's batch: a program is traced for one input shape).
    The profile goes to ``program.metadata["routing_profile"]`` and to
    ``ctx.analysis`` under this pipeline step, so that the decode program of
    the same optimize call reuses it instead of re-measuring.

    Options:
      calibration_bytes: bytes of the default model's training text to profile on
        when no calibration batches are given (byte-level models only).
      seq_len: tokens per calibration window (default: the program's sequence
        length); longer windows are cut, shorter ones padded.
      batch: windows run at a time; must equal the batch the program was traced
        for (default: that batch).
    """

    name: ClassVar[str] = "profile"
    exact: ClassVar[bool] = True
    provides: ClassVar[tuple[str, ...]] = ("routing_profile",)
    # What __post_init__ (and _calibration, for batch) accepts; shown by `moejax passes`.
    option_ranges: ClassVar[Mapping[str, str]] = {
        "calibration_bytes": "integer >= 1",
        "seq_len": "integer >= 1, or none",
        "batch": "integer >= 1 equal to the program's batch, or none",
    }

    calibration_bytes: int = 65536
    seq_len: int | None = None
    batch: int | None = None

    def __post_init__(self):
        if self.calibration_bytes < 1:
            raise ValueError(f"calibration_bytes must be >= 1, got {self.calibration_bytes}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")

    def _calibration(self, program: Program, ctx: PassContext) -> tuple[list[Any], str]:
        b, _ = token_input_shape(program)
        if self.batch is not None and self.batch != b:
            raise PassError(f"profile(batch={self.batch}): the program was traced for batch {b}; trace (optimize) "
                            f"with example tokens of batch {self.batch} or drop the option")
        return calibration_batches(program, ctx, self.calibration_bytes, self.seq_len)

    def run(self, program: Program, ctx: PassContext) -> Program:
        # The decode (or any later) program of the same optimize call reuses the profile this step
        # measured on the first program; a pipeline that profiles twice has two steps.
        step = ctx.step(self)
        profile = ctx.analysis.get(analysis.RoutingProfile, step)
        if profile is None or not profile_matches(program, profile):
            batches, source = self._calibration(program, ctx)
            profile = ctx.analysis.put(step, dataclasses.replace(measure_routing(program, batches), source=source))
        return program.replace(metadata={**analysis.write(program.metadata, profile),
                                         "routing_profile_source": profile.source})


# --------------------------------------------------------------------------
# Picture.
# --------------------------------------------------------------------------
def save_load_heatmap(profile: analysis.RoutingProfile | dict[str, Any], path_png: str | Path,
                      title: str = "expert load") -> Path:
    """Write a heatmap PNG of expert load (fraction of routing slots), one row per (stacked) layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not profile:
        raise ValueError("save_load_heatmap: empty routing profile")
    rows, labels = [], []
    # entry["frequency"] reads a LayerRouting and the metadata's plain dict alike
    width = max(np.shape(p["frequency"])[1] for p in profile.values())
    for name, p in profile.items():
        freq = np.asarray(p["frequency"])
        for s, row in enumerate(freq):
            rows.append(np.pad(row, (0, width - len(row)), constant_values=np.nan))
            labels.append(name.replace("*", str(s)) if freq.shape[0] > 1 else name)
    grid = np.stack(rows)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * width + 2), max(2.0, 0.3 * len(rows) + 1.2)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(f"{title} (uniform = {1 / width:.3f})")
    fig.colorbar(im, ax=ax, label="fraction of routing slots")
    fig.tight_layout()
    path = Path(path_png)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
