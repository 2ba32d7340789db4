"""``moejax tune``: search pass settings for the smallest model within a quality budget.

Given a quality budget (``max_loss``: the largest relative increase of bits per byte
over the float model) and a target (``expert-bytes`` or ``active-flops``), :func:`tune`

1. traces the model's forward program and profiles its routing once
   (``select-impl(layout=stacked),profile``);
2. runs every candidate pipeline of the search space (:func:`search_space`) on that
   profiled program and measures its target cost (``moejax.stats``) and a cheap
   quality proxy: bits per byte on the first ``proxy_windows`` windows of the text;
3. measures the candidates on the Pareto front of (cost, proxy) whose proxy loss is
   within twice the budget on the whole evaluation text (``eval_windows``); since the
   proxy is noisy, it then verifies the other candidates whose proxy loss is within
   three times the budget, cheapest first, until one meets the budget, and picks the
   cheapest measured candidate whose measured loss meets the budget.

The search space crosses the settings this project measured as the strongest in
``benchmarks/compression_quality.py``: REAP pruning with a global budget, uniform and
mixed-precision expert quantization, and top-p gating, in the order
gating, prune, quantize (pruning must see float experts). Every figure it reports is
measured; nothing is extrapolated.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TARGETS", "Candidate", "TuneResult", "search_space", "tune", "pareto_front", "plot_front"]

TARGETS = {"expert-bytes": "expert_bytes", "active-flops": "active_expert_flops_per_token"}
PREFIX = ("select-impl(layout=stacked)", "profile")

_PRUNE = ("", "prune(keep=0.875,method=reap,budget=global)", "prune(keep=0.75,method=reap,budget=global)")
_QUANT = ("", "quantize(bits=8)", "quantize(bits=4,group_size=64)", "quantize(bits=4,mixed=true,group_size=64)",
          "quantize(bits=3,mixed=true,group_size=64)", "quantize(bits=3,group_size=64)",
          "quantize(bits=2.5,mixed=true,group_size=64)")
_GATING = ("", "gating(top_p=0.8)", "gating(top_p=0.7)", "gating(top_p=0.6)", "gating(top_p=0.5)")


def search_space(target: str) -> list[str]:
    """The candidate pipelines (after the profiling prefix) for ``target``."""
    if target == "expert-bytes":
        combos = [(p, q) for p in _PRUNE for q in _QUANT]
    elif target == "active-flops":
        combos = [(g, p) for g in _GATING for p in _PRUNE]
    else:
        raise ValueError(f"tune: target must be one of {sorted(TARGETS)}, got {target!r}")
    return [",".join(x for x in combo if x) for combo in combos]


@dataclasses.dataclass
class Candidate:
    """One measured pipeline: its target cost, proxy quality and (on the front) full quality."""

    pipeline: str
    cost: float
    proxy_bpb: float
    bpb: float | None = None

    def loss(self, base: float, full: bool = False) -> float:
        value = self.bpb if full else self.proxy_bpb
        return math.inf if value is None else value / base - 1


@dataclasses.dataclass
class TuneResult:
    """What :func:`tune` measured and chose (``chosen`` is None when nothing met the budget)."""

    target: str
    max_loss: float
    base_cost: float
    base_proxy_bpb: float
    base_bpb: float
    candidates: list[Candidate]
    front: list[Candidate]
    chosen: Candidate | None

    def table(self) -> str:
        rows = [("pipeline", self.target, "vs float", "proxy dbpb", "measured dbpb", "front")]
        for c in sorted(self.candidates, key=lambda c: c.cost):
            rows.append((c.pipeline or "(float)", f"{c.cost:.4g}", f"{c.cost / self.base_cost:.3f}x",
                         f"{100 * c.loss(self.base_proxy_bpb):+.2f}%",
                         "" if c.bpb is None else f"{100 * c.loss(self.base_bpb, full=True):+.2f}%",
                         "*" if c in self.front else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows)

    def summary(self) -> str:
        if self.chosen is None:
            return (f"no candidate met --max-loss {100 * self.max_loss:g}% on the full text; the float model "
                    f"stays (loosen the budget)")
        c = self.chosen
        return (f"chosen: {','.join(PREFIX[1:] + (c.pipeline,)) if c.pipeline else '(no compression)'}  "
                f"{self.target} {c.cost:.4g} ({c.cost / self.base_cost:.3f}x of float), bits per byte "
                f"{c.bpb:.4f} ({100 * c.loss(self.base_bpb, full=True):+.2f}% vs {self.base_bpb:.4f})")


def _windows(tokens: np.ndarray, n: int, seq_len: int) -> np.ndarray:
    """``n`` consecutive windows ``[n, seq_len + 1]`` (inputs plus next-token targets)."""
    usable = (len(tokens) - 1) // seq_len
    if usable < 1:
        raise ValueError(f"tune: the evaluation text has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    n = min(n, usable)
    return np.stack([tokens[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])


def _bits_per_token(program: Any, windows: np.ndarray, batch: int) -> float:
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch]
        pad = batch - len(chunk)
        x = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)]) if pad else chunk
        logits = program(jnp.asarray(x[:, :-1]))
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(x[:, 1:, None]), axis=-1)[..., 0]
        total += float(jnp.sum(nll[:len(chunk)]))
    return total / math.log(2) / (len(windows) * (windows.shape[1] - 1))


def pareto_front(cands: Sequence[Candidate]) -> list[Candidate]:
    """Candidates no other beats on both cost and proxy quality (cheapest first)."""
    front, best = [], math.inf
    for c in sorted(cands, key=lambda c: (c.cost, c.proxy_bpb)):
        if c.proxy_bpb < best:
            front.append(c)
            best = c.proxy_bpb
    return front


def tune(model: Any, eval_tokens: np.ndarray, *, target: str = "expert-bytes", max_loss: float = 0.01,
         calibration: Sequence[Any] | None = None, seq_len: int = 256, batch: int = 8, proxy_windows: int = 8,
         eval_windows: int = 64, candidates: Sequence[str] | None = None,
         progress: Callable[[str], None] | None = None) -> TuneResult:
    """Search :func:`search_space` (or ``candidates``) for the cheapest pipeline within ``max_loss``.

    ``eval_tokens``: int tokens of the evaluation text (bytes for byte-level models);
    ``calibration``: token batches for ``profile`` (None: its default, the bundled
    training text for byte-level models). See the module docstring for the method.
    """
    import moejax
    from moejax import stats
    from moejax.pipeline import PassContext, PassError, PassManager, parse_pipeline

    if target not in TARGETS:
        raise ValueError(f"tune: target must be one of {sorted(TARGETS)}, got {target!r}")
    if not 0 < max_loss < 1:
        raise ValueError(f"tune: max_loss must be a fraction in (0, 1), got {max_loss}")
    say = progress or (lambda _: None)
    key = TARGETS[target]
    tokens = np.asarray(eval_tokens, np.int32)
    proxy = _windows(tokens, proxy_windows, seq_len)
    full = _windows(tokens, eval_windows, seq_len)
    program = moejax.trace(model, jnp.zeros((batch, seq_len), jnp.int32))
    def context() -> PassContext:
        return PassContext(calibration=list(calibration) if calibration is not None else None)

    say("profiling routing")
    profiled = PassManager(list(PREFIX), check_exact=False).run(program, context())[-1].program
    base_cost = stats.program_stats(profiled)[key]
    base_proxy, base_full = _bits_per_token(profiled, proxy, batch), _bits_per_token(profiled, full, batch)
    measured, programs = [], {}
    space = list(candidates) if candidates is not None else search_space(target)
    for i, spec in enumerate(space, 1):
        say(f"candidate {i}/{len(space)}: {spec or '(float)'}")
        prog = profiled
        if spec:
            try:
                prog = PassManager(parse_pipeline(spec), check_exact=False).run(profiled, context())[-1].program
            except PassError as e:  # a setting this model cannot take (e.g. a group size its widths do not allow)
                say(f"skipped {spec}: {e}")
                continue
        programs[spec] = prog
        measured.append(Candidate(spec, float(stats.program_stats(prog)[key]), _bits_per_token(prog, proxy, batch)))
    front = pareto_front(measured)
    for c in front:
        if c.loss(base_proxy) <= 2 * max_loss:
            say(f"measuring {c.pipeline or '(float)'} on {len(full)} windows")
            c.bpb = _bits_per_token(programs[c.pipeline], full, batch)
    # The proxy is a few windows: a candidate it ranks off the front (or just past twice the budget) may meet the
    # budget where the front's cheaper points do not. Verify candidates cheapest first until one meets it.
    ok = [c for c in measured if c.bpb is not None and c.loss(base_full, full=True) <= max_loss]
    for c in sorted(measured, key=lambda c: c.cost):
        if ok and c.cost >= min(o.cost for o in ok):
            break
        if c.bpb is None and c.loss(base_proxy) <= 3 * max_loss:
            say(f"verifying {c.pipeline or '(float)'} on {len(full)} windows")
            c.bpb = _bits_per_token(programs[c.pipeline], full, batch)
            if c.loss(base_full, full=True) <= max_loss:
                ok.append(c)
    chosen = min(ok, key=lambda c: c.cost) if ok else None
    return TuneResult(target, max_loss, float(base_cost), base_proxy, base_full, measured, front, chosen)


def plot_front(result: TuneResult, path: str | Path) -> None:
    """Scatter of every candidate (cost vs proxy loss), the Pareto front and the chosen one, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [c.cost / result.base_cost for c in result.candidates]
    ys = [100 * c.loss(result.base_proxy_bpb) for c in result.candidates]
    ax.scatter(xs, ys, color="tab:gray", s=14, label="candidates (proxy quality)")
    front = sorted(result.front, key=lambda c: c.cost)
    ax.plot([c.cost / result.base_cost for c in front], [100 * c.loss(result.base_proxy_bpb) for c in front],
            "--o", color="tab:blue", ms=4, label="Pareto front")
    if result.chosen is not None:
        ax.scatter([result.chosen.cost / result.base_cost], [100 * result.chosen.loss(result.base_bpb, True)],
                   color="tab:red", s=60, marker="*", label="chosen (measured on the full text)", zorder=3)
    ax.axhline(100 * result.max_loss, color="tab:red", lw=0.8, ls=":", label="--max-loss")
    ax.set_xlabel(f"{result.target}, fraction of float")
    ax.set_ylabel("bits per byte increase (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
