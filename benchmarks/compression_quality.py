"""Quality and cost of dynamic gating, expert merging and expert pruning on the default model.

Run::

    python benchmarks/compression_quality.py                      # the committed rows (JSON + Pareto plot)
    python benchmarks/compression_quality.py --eval-bytes 16384   # quicker
    python benchmarks/compression_quality.py --only prune merge   # some settings only
    python benchmarks/compression_quality.py --smoke --no-plot    # a tiny random model, 4 settings (tests)

Every row is one pipeline run by ``moejax.optimize`` and labelled with it in full
(``pipeline``): ``select-impl(layout=stacked),profile,<setting>``. ``select-impl``
first so that profiling and every re-measurement run the fast CPU expert op (the
weights stay stacked because prune and merge come after it); ``profile`` measures
routing on the calibration tokens (the first ``--calib-bytes`` of the training text,
never the held-out text). ``exact`` is False for every setting but the baseline.

Per row: experts kept per layer, measured active experts per token (on the
calibration tokens), expert weight bytes, active expert FLOPs per token
(``moejax.stats``) and bits per byte on the first ``--eval-bytes`` of the default
model's held-out text. Quality only: nothing is timed (``seconds`` is how long the
row took, for planning), so there are no repeats. Writes JSON (``--out``) and a
Pareto plot next to it (same name, ``.png``).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_threads_argument, default_out, result_payload, set_threads_or_exit, smoke_model,  # noqa: E402
                    write_json)

import jax.numpy as jnp  # noqa: E402

import moejax  # noqa: E402
from moejax import data, evaluation  # noqa: E402
from moejax.passes.gating import DynamicGating, mean_active_experts  # noqa: E402
from moejax.passes.merge import MergeExperts  # noqa: E402
from moejax.passes.prune import PruneExperts  # noqa: E402
from moejax.pipeline import is_exact  # noqa: E402

# What every setting's pipeline starts with (see the docstring).
PREFIX = "select-impl(layout=stacked),profile"
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


def _family(name: str) -> str:
    return name.split("(")[0].split(" ")[0]


SMOKE_SETTINGS = ("baseline (top-2)", "gating(top_p=0.5)", "merge(6, output)", "prune(6, frequency)")


def checkpoint_id() -> dict[str, str]:
    """Which default-model checkpoint was measured (it may be retrained): sha256 prefix and last log line."""
    from moejax.models.default_model import DEFAULT_MODEL_DIR

    weights = DEFAULT_MODEL_DIR / "model.safetensors"
    log = DEFAULT_MODEL_DIR / "train_log.txt"
    last = log.read_text().strip().splitlines()[-1] if log.exists() else ""
    return {"sha256": hashlib.sha256(weights.read_bytes()).hexdigest()[:16], "train_log_last_line": last}


def run(model: Any, ckpt: dict[str, str], eval_bytes: int, calib_bytes: int, seq_len: int, batch: int,
        settings: Sequence[str], partial: Path | None = None) -> list[dict[str, Any]]:
    """One ``moejax.optimize`` call and one bits-per-byte score per setting."""
    n_experts = model.config.n_experts
    text = data.heldout_bytes()
    calibration = [data.calibration_tokens(calib_bytes, seq_len)]
    example = jnp.zeros((batch, seq_len), jnp.int32)
    rows: list[dict[str, Any]] = []
    for label in settings:
        passes = SETTINGS[label]
        t0 = time.perf_counter()
        # check_exact=False: the settings are lossy by design; bits per byte measures what they changed
        opt = moejax.optimize(model, (example,), [PREFIX, *passes], calibration=calibration, check_exact=False)
        kept = n_experts
        for p in passes:
            kept = getattr(p, "num_experts", None) or kept
        st = opt.stages[-1].stats
        profile = opt.program.metadata.get("routing_profile", {})
        bpb = evaluation.bits_per_byte(opt, text, eval_bytes=eval_bytes, seq_len=seq_len, batch=batch)
        row = {"setting": label, "family": _family(label), "pipeline": ",".join(str(p) for p in opt.passes),
               "exact": all(is_exact(p) for p in opt.passes), "experts_kept": kept,
               "active_experts_per_token": mean_active_experts(profile) if profile else float("nan"),
               "expert_bytes": st["expert_bytes"], "active_expert_flops_per_token": st["active_expert_flops_per_token"],
               "bits_per_byte": bpb, "seconds": time.perf_counter() - t0,
               "notes": {k: str(v) for k, v in opt.program.metadata.get("notes", {}).items()}, "checkpoint": ckpt}
        rows.append(row)
        if partial is not None:  # long runs: keep what is measured so far
            write_json(partial, {"rows": rows})
        print(f"{label:28s} bpb {bpb:.4f}  active {row['active_experts_per_token']:.3f}  "
              f"({row['seconds']:.0f}s)", file=sys.stderr, flush=True)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-bytes", type=int, default=65536, help="held-out bytes scored")
    ap.add_argument("--calib-bytes", type=int, default=65536, help="training-text bytes used for calibration")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", nargs="*", help="run only settings whose label contains one of these strings")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny random model and settings " + ", ".join(SMOKE_SETTINGS) + " (tests)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG (needs matplotlib)")
    add_threads_argument(ap)
    ap.add_argument("--out", default=None, help="JSON path, the plot goes next to it as .png (default "
                    "benchmarks/results/compression_quality.json; --smoke: a temp file)")
    args = ap.parse_args(argv)
    args.out = args.out or default_out("compression_quality", args.smoke)
    out = Path(args.out)
    if out.suffix != ".json":
        ap.error(f"--out must name a .json file, got {args.out!r}")
    for flag in ("eval_bytes", "calib_bytes", "seq_len", "batch"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.calib_bytes < args.seq_len:
        ap.error(f"--calib-bytes ({args.calib_bytes}) must hold one window of --seq-len ({args.seq_len})")
    settings = [s for s in (SMOKE_SETTINGS if args.smoke else SETTINGS)
                if not args.only or any(o in s for o in args.only)]
    if not settings:
        ap.error(f"--only {args.only} matches no setting; settings: {', '.join(SETTINGS)}")
    threads = set_threads_or_exit(ap, args.threads)  # before the first JAX computation: XLA sizes its pool then

    start = time.perf_counter()
    if args.smoke:
        model, ckpt = smoke_model(n_experts=8), {"smoke": "tiny random model (common.smoke_model)"}
    else:
        from moejax.models.default_model import load_default_model

        model, ckpt = load_default_model(), checkpoint_id()
    print(f"model checkpoint {ckpt}", file=sys.stderr)
    rows = run(model, ckpt, args.eval_bytes, args.calib_bytes, args.seq_len, args.batch, settings,
               partial=out.with_suffix(".partial.json"))
    print(table(rows))
    path = write_json(out, result_payload("compression_quality", args, threads, rows, smoke=args.smoke,
                                          checkpoint=ckpt, elapsed_s=time.perf_counter() - start))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    if not args.no_plot:
        plot(rows, out.with_suffix(".png"))
        print(f"wrote {path} and {out.with_suffix('.png')}")
    else:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
