"""Quality and cost of dynamic gating, expert merging and expert pruning on the default model.

For every setting: experts kept per layer, measured active experts per token (on
the calibration tokens), expert weight bytes, active expert FLOPs per token
(``moejax.stats``) and bits per byte on the default model's held-out text.
Prints a table, writes JSON and a Pareto plot (PNG)::

    python benchmarks/compression_quality.py                      # full run
    python benchmarks/compression_quality.py --eval-bytes 16384   # quicker

Calibration tokens are the first ``--calib-bytes`` of the training text (never
the held-out text). The model is profiled once; every setting then runs its
pass on that profiled program (``select-impl`` ran first), then the final lowering.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import moejax
import moejax.blocked_ffn  # noqa: F401  (registers the CPU expert implementation)
from moejax import data, evaluation, lowering
from moejax.models.default_model import load_default_model
from moejax.passes.gating import DynamicGating, mean_active_experts
from moejax.passes.merge import MergeExperts
from moejax.passes.profile import ProfileRouting
from moejax.passes.prune import PruneExperts
from moejax.passes.select_impl import SelectImpl
from moejax.analysis import AnalysisStore
from moejax.pipeline import PassContext, PassManager

SETTINGS = {
    "baseline (top-2)": [],
    "gating(top_p=0.5)": [DynamicGating(top_p=0.5)],
    "gating(top_p=0.6)": [DynamicGating(top_p=0.6)],
    "gating(top_p=0.7)": [DynamicGating(top_p=0.7)],
    "gating(top_p=0.8)": [DynamicGating(top_p=0.8)],
    "gating(skip_ratio=0.2)": [DynamicGating(skip_ratio=0.2)],
    "gating(skip_ratio=0.3)": [DynamicGating(skip_ratio=0.3)],
    "gating(skip_ratio=0.5)": [DynamicGating(skip_ratio=0.5)],
    "gating(threshold=0.3)": [DynamicGating(threshold=0.3)],
    "merge(6, output)": [MergeExperts(num_experts=6)],
    "merge(6, router)": [MergeExperts(num_experts=6, similarity="router")],
    "merge(6, weight)": [MergeExperts(num_experts=6, similarity="weight")],
    "merge(4, output)": [MergeExperts(num_experts=4)],
    "prune(6, frequency)": [PruneExperts(num_experts=6)],
    "prune(6, mass)": [PruneExperts(num_experts=6, method="mass")],
    "prune(6, reconstruction)": [PruneExperts(num_experts=6, method="reconstruction")],
    "prune(4, frequency)": [PruneExperts(num_experts=4)],
    "prune(4, reconstruction)": [PruneExperts(num_experts=4, method="reconstruction")],
}


class _ForwardOnly:
    """A lowered forward program with the call form ``bits_per_byte`` needs (no decoding here)."""

    def __init__(self, program):
        self.program = program

    def __call__(self, tokens):
        return self.program(tokens)

    def init_cache(self, batch, max_len):
        raise NotImplementedError("compression_quality scores the forward program only")


def _family(name: str) -> str:
    return name.split("(")[0].split(" ")[0]


def checkpoint_id() -> dict:
    """Which default-model checkpoint was measured (it may be retrained): sha256 prefix and last log line."""
    import hashlib

    from moejax.models.default_model import DEFAULT_MODEL_DIR

    weights = DEFAULT_MODEL_DIR / "model.safetensors"
    log = DEFAULT_MODEL_DIR / "train_log.txt"
    last = log.read_text().strip().splitlines()[-1] if log.exists() else ""
    return {"sha256": hashlib.sha256(weights.read_bytes()).hexdigest()[:16], "train_log_last_line": last}


def run(eval_bytes: int, calib_bytes: int, seq_len: int, batch: int, only: list[str] | None,
        partial: Path | None = None) -> list[dict]:
    ckpt = checkpoint_id()
    model = load_default_model()
    print(f"default model checkpoint {ckpt}")
    n_experts = model.config.n_experts
    text = data.heldout_bytes()
    calibration = [data.calibration_tokens(calib_bytes, seq_len)]
    example = jnp.zeros((batch, seq_len), jnp.int32)
    ctx = PassContext(example_args=(example,), calibration=calibration)
    t0 = time.perf_counter()
    # select-impl first: profiling and every re-measurement then run the fast CPU expert op; the
    # weights stay stacked because prune, merge and quantize come after it
    profiled = ProfileRouting().run(SelectImpl(layout="stacked").run(moejax.trace(model, example), ctx), ctx)
    print(f"traced and profiled in {time.perf_counter() - t0:.1f}s on {calibration[0].size} calibration tokens")
    rows = []
    for label, passes in SETTINGS.items():
        if only and not any(o in label for o in only):
            continue
        t0 = time.perf_counter()
        run_ctx = PassContext(example_args=(example,), calibration=calibration, analysis=AnalysisStore())
        stages = PassManager(list(passes)).run(profiled, run_ctx)
        program = stages[-1].program
        kept = n_experts
        for p in passes:
            kept = getattr(p, "num_experts", None) or kept
        st = stages[-1].stats
        profile = program.metadata.get("routing_profile", {})
        final = lowering.inline_dialect(program)
        bpb = evaluation.bits_per_byte(_ForwardOnly(final), text, eval_bytes=eval_bytes, seq_len=seq_len, batch=batch)
        row = {"setting": label, "family": _family(label), "experts_kept": kept,
               "active_experts_per_token": mean_active_experts(profile) if profile else float("nan"),
               "expert_bytes": st["expert_bytes"], "active_expert_flops_per_token": st["active_expert_flops_per_token"],
               "bits_per_byte": bpb, "seconds": time.perf_counter() - t0,
               "notes": {k: str(v) for k, v in program.metadata.get("notes", {}).items()}}
        row["checkpoint"] = ckpt
        rows.append(row)
        if partial is not None:  # long runs: keep what is measured so far
            partial.write_text(json.dumps(rows, indent=2))
        print(f"{label:28s} bpb {bpb:.4f}  active {row['active_experts_per_token']:.3f}  "
              f"({row['seconds']:.0f}s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["family"] == "baseline"), rows[0])
    head = ("setting", "experts", "active/tok", "expert MB", "act. MFLOP/tok", "dFLOPs", "bpb", "dbpb")
    lines = [head]
    for r in rows:
        lines.append((r["setting"], str(r["experts_kept"]), f"{r['active_experts_per_token']:.3f}",
                      f"{r['expert_bytes'] / 1e6:.2f}", f"{r['active_expert_flops_per_token'] / 1e6:.2f}",
                      f"{100 * (r['active_expert_flops_per_token'] / base['active_expert_flops_per_token'] - 1):+.1f}%",
                      f"{r['bits_per_byte']:.4f}",
                      f"{100 * (r['bits_per_byte'] / base['bits_per_byte'] - 1):+.2f}%"))
    widths = [max(len(l[c]) for l in lines) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(l, widths)) for l in lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"baseline": "black", "gating": "tab:blue", "merge": "tab:green", "prune": "tab:red"}
    for ax, key, xlabel in ((axes[0], "active_expert_flops_per_token", "active expert MFLOP / token"),
                            (axes[1], "expert_bytes", "expert weight MB")):
        for r in rows:
            ax.scatter(r[key] / 1e6, r["bits_per_byte"], color=colors.get(r["family"], "gray"))
            ax.annotate(r["setting"], (r[key] / 1e6, r["bits_per_byte"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        pts = sorted((r[key], r["bits_per_byte"]) for r in rows)
        front, best = [], float("inf")
        for x, y in pts:  # lower-left Pareto front: fewer FLOPs/bytes and lower bpb
            if y < best:
                front.append((x / 1e6, y))
                best = y
        ax.plot(*zip(*front), "--", color="gray", lw=0.8, label="Pareto front")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("bits per byte (held-out)")
        ax.legend(fontsize=7)
    axes[0].set_title("quality vs active expert compute")
    axes[1].set_title("quality vs expert memory")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-bytes", type=int, default=65536, help="held-out bytes scored")
    ap.add_argument("--calib-bytes", type=int, default=65536, help="training-text bytes used for calibration")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", nargs="*", help="run only settings whose label contains one of these strings")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run(args.eval_bytes, args.calib_bytes, args.seq_len, args.batch, args.only,
               partial=out / "compression_quality.partial.json")
    text = table(rows)
    print(text)
    meta = {k: v for k, v in vars(args).items() if k != "out"}
    (out / "compression_quality.json").write_text(json.dumps({"args": meta, "rows": rows}, indent=2))
    plot(rows, out / "compression_quality.png")
    print(f"wrote {out / 'compression_quality.json'} and {out / 'compression_quality.png'}")


if __name__ == "__main__":
    main()
