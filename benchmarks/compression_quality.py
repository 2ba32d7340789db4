"""Quality and cost of expert compression on both bundled models: gating, pruning, merging, quantization.

Run::

    python benchmarks/compression_quality.py                          # both models (JSON + Pareto plot)
    python benchmarks/compression_quality.py --models default         # one model
    python benchmarks/compression_quality.py --only prune merge       # some settings only
    python benchmarks/compression_quality.py --only "75% reap global + recal logits" "75% refit + recal logits" \\
        --out benchmarks/results/compression_quality_logits.json  # end-to-end router recalibration
    python benchmarks/compression_quality.py --models fine-grained --only "50% naee + recal logits" --no-plot \\
        --out benchmarks/results/compression_quality_logits_50.json
    python benchmarks/compression_quality.py --models fine-grained default --only "75% reap global + distill" \
        --no-plot --out benchmarks/results/compression_quality_distill.json  # routers and kept experts distilled
    python benchmarks/compression_quality.py --models fine-grained --only "50% naee + distill" --no-plot \
        --out benchmarks/results/compression_quality_distill_50.json
    python benchmarks/compression_quality.py --models default --only "75% refit + distill" --no-plot \
        --out benchmarks/results/compression_quality_distill_merge.json
    python benchmarks/compression_quality.py --models fine-grained --only "75% refit + distill" --no-plot \
        --out benchmarks/results/compression_quality_distill_merge_fine_grained.json
    python benchmarks/compression_quality.py --models fine-grained --only "distill 500 steps" "distill all 500 steps" \
        --no-plot --out benchmarks/results/compression_quality_distill_500.json  # longer, on more text; every weight
    python benchmarks/compression_quality.py --models fine-grained --only "75% reap global, distill all 1000" \
        --no-plot --out benchmarks/results/compression_quality_distill_1000.json  # 1000 steps, every weight
    python benchmarks/compression_quality.py --models fine-grained --only "skip_ratio=0.35" --no-plot \
        --out benchmarks/results/compression_quality_gating_distill.json
    python benchmarks/compression_quality.py --models fine-grained --only "50% naee, distill all 1000" --no-plot \
        --out benchmarks/results/compression_quality_distill_50_all.json  # half the experts, every weight distilled
    python benchmarks/compression_quality.py --only "quantize 3 bits" "quantize mixed" --no-plot \
        --out benchmarks/results/compression_quality_mixed.json  # mixed precision, measured allocator
    python benchmarks/compression_quality.py --only "merge 75% dominant refit" --no-plot \
        --out benchmarks/results/compression_quality_merge_dominant.json  # merged experts start from the dominant
    python benchmarks/compression_quality.py --models fine-grained --only "skip_ratio=0.27" --no-plot \
        --out benchmarks/results/compression_quality_gating_distill_027.json
    python benchmarks/compression_quality.py --models fine-grained --only "skip_ratio=0.3), distill" --no-plot \
        --out benchmarks/results/compression_quality_gating_distill_1000.json
    python benchmarks/compression_quality.py --models default --only "merge 75% dominant refit distinct" \
        --no-plot --out benchmarks/results/compression_quality_merge_distinct.json  # k distinct merged experts
    python benchmarks/compression_quality.py --only "merge 75% reap global" --no-plot \
        --out benchmarks/results/compression_quality_merge_reap_global.json  # REAP-guided merging, global budget
    python benchmarks/compression_quality.py --only "renormalize=false" --no-plot \
        --out benchmarks/results/compression_quality_gating_kept_weights.json  # skipped experts' share left out
    python benchmarks/compression_quality.py --smoke --no-plot        # a tiny random model, 4 settings (tests)

Every row is one pipeline run by ``moejax.optimize`` and labelled with it in full
(``pipeline``): ``select-impl(layout=stacked),profile,<setting>``. ``select-impl``
first so that profiling and every re-measurement run the fast CPU expert op (the
weights stay stacked because prune and merge come after it); ``profile`` measures
routing on the calibration tokens (the first ``--calib-bytes`` of the training text,
never the held-out text). Settings are fractions of each model's experts
(``keep=0.75`` is 6 of 8 experts on the default model, 24 of 32 on the fine-grained one).

Per row: experts kept, measured active experts per token (on the calibration
tokens), expert weight bytes, active expert FLOPs per token (``moejax.stats``),
bits per byte on the first ``--eval-bytes`` of the held-out text (the standard
library files neither model was trained on, the split every method was chosen on),
and bits per byte on three texts nothing here was tuned on (``--ood-bytes`` each):
third-party Python (the installed ``jax`` package's source), C headers (this
Python's ``include`` directory) and English prose (this Python's licence text).
Quality only: nothing is timed (``seconds`` is how long the row took, for
planning), so there are no repeats. Writes JSON (``--out``), a Pareto plot next to
it (same name, ``.png``) and prints each model's goal summary.
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
import numpy as np  # noqa: E402

import moejax  # noqa: E402
from moejax import data, evaluation  # noqa: E402
from moejax.passes.gating import mean_active_experts  # noqa: E402
from moejax.pipeline import is_exact  # noqa: E402

# What every setting's pipeline starts with (see the docstring).
PREFIX = "select-impl(layout=stacked),profile"
# label -> the passes after PREFIX (pipeline spelling); "" is the float baseline.
SETTINGS: dict[str, str] = {
    "baseline": "",
    "gating(top_p=0.5)": "gating(top_p=0.5)",
    "gating(top_p=0.6)": "gating(top_p=0.6)",
    "gating(top_p=0.7)": "gating(top_p=0.7)",
    "gating(top_p=0.8)": "gating(top_p=0.8)",
    "gating(skip_ratio=0.3)": "gating(skip_ratio=0.3)",
    "gating(skip_ratio=0.35)": "gating(skip_ratio=0.35)",
    "gating(skip_ratio=0.3,renormalize=false)": "gating(skip_ratio=0.3,renormalize=false)",
    "gating(min_weight=0.145,renormalize=false)": "gating(min_weight=0.145,renormalize=false)",
    "gating(min_weight=0.15,renormalize=false)": "gating(min_weight=0.15,renormalize=false)",
    "gating(skip_ratio=0.35), distill all": "gating(skip_ratio=0.35),distill(steps=300,calibration_bytes=262144,"
                                            "train=all)",
    "gating(skip_ratio=0.27), distill all": "gating(skip_ratio=0.27),distill(steps=300,calibration_bytes=262144,"
                                            "train=all)",
    "gating(skip_ratio=0.3), distill all 1000 steps 512K": "gating(skip_ratio=0.3),distill(steps=1000,"
                                                           "calibration_bytes=524288,train=all)",
    "prune 75% frequency": "prune(keep=0.75,method=frequency)",
    "prune 75% naee": "prune(keep=0.75,method=naee)",
    "prune 75% reap": "prune(keep=0.75,method=reap)",
    "prune 75% reap global": "prune(keep=0.75,method=reap,budget=global)",
    "prune 75% reap global + recal": "prune(keep=0.75,method=reap,budget=global),recalibrate-router",
    "prune 75% reap global + recal logits": "prune(keep=0.75,method=reap,budget=global),"
                                            "recalibrate-router(target=logits,steps=200)",
    "prune 75% reap global + distill": "prune(keep=0.75,method=reap,budget=global),distill(calibration_bytes=262144)",
    "prune 75% reap global, distill 500 steps 512K": "prune(keep=0.75,method=reap,budget=global),"
                                                     "distill(steps=500,calibration_bytes=524288)",
    "prune 75% reap global, distill all 500 steps 512K": "prune(keep=0.75,method=reap,budget=global),"
                                                         "distill(steps=500,calibration_bytes=524288,train=all)",
    "prune 75% reap global, distill all 1000 steps 512K": "prune(keep=0.75,method=reap,budget=global),"
                                                          "distill(steps=1000,calibration_bytes=524288,train=all)",
    "merge 75%": "merge(keep=0.75)",
    "merge 75% refit": "merge(keep=0.75,refit=true)",
    "merge 75% refit + recal": "merge(keep=0.75,refit=true),recalibrate-router",
    "merge 75% refit + recal logits": "merge(keep=0.75,refit=true),recalibrate-router(target=logits,steps=200)",
    "merge 75% refit + distill": "merge(keep=0.75,refit=true),distill(calibration_bytes=262144)",
    "merge 75% dominant refit": "merge(keep=0.75,refit=true,weights=dominant)",
    "merge 75% dominant refit + distill": "merge(keep=0.75,refit=true,weights=dominant),"
                                          "distill(calibration_bytes=262144)",
    "merge 75% dominant refit distinct": "merge(keep=0.75,refit=true,weights=dominant,distinct=true)",
    "merge 75% dominant refit distinct + distill": "merge(keep=0.75,refit=true,weights=dominant,distinct=true),"
                                                   "distill(calibration_bytes=262144)",
    "merge 75% reap global dominant refit distinct": "merge(keep=0.75,method=reap,budget=global,refit=true,"
                                                     "weights=dominant,distinct=true)",
    "merge 75% reap global dominant refit distinct + distill": "merge(keep=0.75,method=reap,budget=global,"
                                                               "refit=true,weights=dominant,distinct=true),"
                                                               "distill(calibration_bytes=262144)",
    "prune 50% naee": "prune(keep=0.5,method=naee)",
    "prune 50% reap global": "prune(keep=0.5,method=reap,budget=global)",
    "prune 50% naee + recal logits": "prune(keep=0.5,method=naee),recalibrate-router(target=logits,steps=200)",
    "prune 50% naee + distill": "prune(keep=0.5,method=naee),distill(calibration_bytes=262144)",
    "prune 50% naee, distill all 1000 steps 512K": "prune(keep=0.5,method=naee),"
                                                   "distill(steps=1000,calibration_bytes=524288,train=all)",
    "merge 50% refit": "merge(keep=0.5,refit=true)",
    "quantize 4 bits g64": "quantize(bits=4,group_size=64)",
    "quantize 3 bits": "quantize(bits=3,group_size=64)",
    "quantize mixed <= 3 bits": "quantize(bits=3,mixed=true,group_size=64)",
}
SMOKE_SETTINGS = ("baseline", "gating(top_p=0.5)", "merge 75% refit", "prune 75% reap")


def _family(name: str) -> str:
    return name.split("(")[0].split(" ")[0]


def ood_texts(n_bytes: int) -> dict[str, bytes]:
    """Texts no setting was tuned on, from files every install has (see the module docstring)."""
    import sysconfig

    import jax

    def first(files, limit):
        out = b""
        for f in files:
            out += f.read_bytes() + b"\x1c"
            if len(out) >= limit:
                break
        return out[:limit]

    jax_src = sorted(Path(jax.__file__).parent.joinpath("_src").glob("*.py"))
    headers = sorted(Path(sysconfig.get_paths()["include"]).glob("*.h"))
    licence = [p for p in (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt",) if p.is_file()]
    texts = {"third-party Python (jax)": first(jax_src, n_bytes), "C headers (Python.h dir)": first(headers, n_bytes),
             "English prose (PSF licence)": first(licence, n_bytes)}
    return {k: v for k, v in texts.items() if len(v) > 1024}


def checkpoint_id(folder: Path) -> dict[str, str]:
    """Which bundled checkpoint was measured (it may be retrained): sha256 prefix and last log line."""
    weights = folder / "model.safetensors"
    log = folder / "train_log.txt"
    last = log.read_text().strip().splitlines()[-1] if log.exists() else ""
    return {"sha256": hashlib.sha256(weights.read_bytes()).hexdigest()[:16], "train_log_last_line": last}


def run(model: Any, model_name: str, ckpt: dict[str, str], eval_bytes: int, ood_bytes: int, calib_bytes: int,
        seq_len: int, batch: int, settings: Sequence[str], partial: Path | None = None,
        done: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One ``moejax.optimize`` call and its bits-per-byte scores per setting."""
    n_experts = model.config.n_experts
    text = data.heldout_bytes()
    others = ood_texts(ood_bytes) if ood_bytes else {}
    calibration = [data.calibration_tokens(calib_bytes, seq_len)]
    example = jnp.zeros((batch, seq_len), jnp.int32)
    rows: list[dict[str, Any]] = []
    for label in settings:
        spec = SETTINGS[label]
        t0 = time.perf_counter()
        # check_exact=False: the settings are lossy by design; bits per byte measures what they changed
        opt = moejax.optimize(model, (example,), PREFIX + ("," + spec if spec else ""), calibration=calibration,
                              check_exact=False)
        st = opt.stages[-1].stats
        profile = opt.program.metadata.get("routing_profile", {})
        kept = [int(np.shape(v["counts"])[-1]) for v in profile.values()] if profile else [n_experts]
        bpb = evaluation.bits_per_byte(opt, text, eval_bytes=eval_bytes, seq_len=seq_len, batch=batch)
        ood = {name: evaluation.bits_per_byte(opt, t, seq_len=seq_len, batch=batch) for name, t in others.items()}
        row = {"model": model_name, "setting": label, "family": _family(label),
               "pipeline": ",".join(str(p) for p in opt.passes),
               "exact": all(is_exact(p) for p in opt.passes), "experts_kept": sum(kept) / len(kept),
               "experts_kept_per_layer": kept,
               "active_experts_per_token": mean_active_experts(profile) if profile else float("nan"),
               "expert_bytes": st["expert_bytes"], "active_expert_flops_per_token": st["active_expert_flops_per_token"],
               "bits_per_byte": bpb, "ood_bits_per_byte": ood, "seconds": time.perf_counter() - t0,
               "notes": {k: str(v) for k, v in opt.program.metadata.get("notes", {}).items()}, "checkpoint": ckpt}
        rows.append(row)
        if partial is not None:  # long runs: keep what is measured so far
            write_json(partial, {"rows": (done or []) + rows})
        print(f"{model_name:13s} {label:32s} bpb {bpb:.4f}  active {row['active_experts_per_token']:.3f}  "
              f"({row['seconds']:.0f}s)", file=sys.stderr, flush=True)
    return rows


def _rel(r: dict, base: dict, key: str = "bits_per_byte") -> float:
    return 100 * (r[key] / base[key] - 1)


def _ood_rel(r: dict, base: dict) -> float:
    """Mean relative change of bits per byte over the untuned texts."""
    names = sorted(base["ood_bits_per_byte"])
    if not names:
        return float("nan")
    return float(np.mean([100 * (r["ood_bits_per_byte"][n] / base["ood_bits_per_byte"][n] - 1) for n in names]))


def table(rows: list[dict]) -> str:
    head = ("model", "setting", "experts", "active/tok", "expert MB", "dFLOPs", "bpb", "dbpb", "dbpb untuned")
    lines = [head]
    for r in rows:
        base = next((b for b in rows if b["model"] == r["model"] and b["family"] == "baseline"), r)
        lines.append((r["model"], r["setting"], f"{r['experts_kept']:g}", f"{r['active_experts_per_token']:.3f}",
                      f"{r['expert_bytes'] / 1e6:.2f}",
                      f"{_rel(r, base, 'active_expert_flops_per_token'):+.1f}%", f"{r['bits_per_byte']:.4f}",
                      f"{_rel(r, base):+.2f}%", f"{_ood_rel(r, base):+.2f}%"))
    widths = [max(len(l[c]) for l in lines) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(l, widths)) for l in lines)


def goals(rows: list[dict]) -> str:
    """Issue 15's goal rows per model, each from the measured rows (best setting named)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        base = next((r for r in mine if r["family"] == "baseline"), None)
        if base is None:
            continue

        def best(pred):
            cands = [r for r in mine if pred(r)]
            return min(cands, key=lambda r: r["bits_per_byte"]) if cands else None

        def say(what, r):
            out.append(f"{model:13s} {what:48s} " + (f"{_rel(r, base):+.2f}% ({r['setting']}; untuned texts "
                                                     f"{_ood_rel(r, base):+.2f}%)" if r else "not measured"))

        say("25% fewer experts, best prune or merge", best(lambda r: r["setting"].startswith(("prune 75", "merge 75"))))
        say("50% fewer experts, best", best(lambda r: r["setting"].startswith(("prune 50", "merge 50"))))
        say("merge 75% refit + recal (best target)", best(lambda r: r["setting"].startswith("merge 75% refit + recal")))
        def repaired(r):  # router recalibration or distillation after compressing
            return "recal" in r["setting"] or "distill" in r["setting"]

        say("best prune 75% (no repair)", best(lambda r: r["setting"].startswith("prune 75") and not repaired(r)))
        say("best prune 75% + recal", best(lambda r: r["setting"].startswith("prune 75") and "recal" in r["setting"]))
        say("best prune 75% + distill", best(lambda r: r["setting"].startswith("prune 75")
                                              and "distill" in r["setting"]))
        say("best merge 75% + distill", best(lambda r: r["setting"].startswith("merge 75")
                                              and "distill" in r["setting"]))
        say("gating, active expert FLOPs <= -25%", best(lambda r: r["family"] == "gating" and
                                                        _rel(r, base, "active_expert_flops_per_token") <= -25))
        say("quantize uniform 3 bits", best(lambda r: r["setting"] == "quantize 3 bits"))
        say("quantize mixed, average <= 3 bits", best(lambda r: r["setting"] == "quantize mixed <= 3 bits"))
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"baseline": "black", "gating": "tab:blue", "merge": "tab:green", "prune": "tab:red",
              "quantize": "tab:purple"}
    for ax, key, xlabel in ((axes[0], "active_expert_flops_per_token", "active expert MFLOP / token"),
                            (axes[1], "expert_bytes", "expert weight MB")):
        for model, marker in zip(dict.fromkeys(r["model"] for r in rows), "os^"):
            mine = [r for r in rows if r["model"] == model]
            for r in mine:
                ax.scatter(r[key] / 1e6, r["bits_per_byte"], color=colors.get(r["family"], "gray"), marker=marker)
                ax.annotate(r["setting"], (r[key] / 1e6, r["bits_per_byte"]), fontsize=5, xytext=(3, 3),
                            textcoords="offset points")
            pts = sorted((r[key], r["bits_per_byte"]) for r in mine)
            front, best = [], float("inf")
            for x, y in pts:  # lower-left Pareto front: fewer FLOPs/bytes and lower bpb
                if y < best:
                    front.append((x / 1e6, y))
                    best = y
            ax.plot(*zip(*front), "--", lw=0.8, label=f"Pareto front, {model} ({marker})")
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
    ap.add_argument("--models", nargs="*", default=["default", "fine-grained"],
                    help="bundled models to measure (default: both)")
    ap.add_argument("--eval-bytes", type=int, default=32768, help="held-out bytes scored")
    ap.add_argument("--ood-bytes", type=int, default=8192, help="bytes of each untuned text scored (0: none)")
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
    from moejax.models.default_model import BUNDLED_MODELS, load_bundled_model

    unknown = [m for m in args.models if m not in BUNDLED_MODELS]
    if unknown:
        ap.error(f"--models {unknown[0]!r} is not a bundled model; choose from {', '.join(BUNDLED_MODELS)}")
    settings = [s for s in (SMOKE_SETTINGS if args.smoke else SETTINGS)
                if not args.only or s == "baseline" or any(o in s for o in args.only)]
    threads = set_threads_or_exit(ap, args.threads)  # before the first JAX computation: XLA sizes its pool then

    start = time.perf_counter()
    if args.smoke:
        models = {"smoke": (smoke_model(n_experts=8), {"smoke": "tiny random model (common.smoke_model)"})}
        args.ood_bytes = 0
    else:
        models = {m: (load_bundled_model(m), checkpoint_id(BUNDLED_MODELS[m])) for m in args.models}
    rows: list[dict[str, Any]] = []
    for name, (model, ckpt) in models.items():
        print(f"model {name}: checkpoint {ckpt}", file=sys.stderr)
        rows += run(model, name, ckpt, args.eval_bytes, args.ood_bytes, args.calib_bytes, args.seq_len, args.batch,
                    settings, partial=out.with_suffix(".partial.json"), done=rows)
    print(table(rows))
    print(goals(rows))
    path = write_json(out, result_payload("compression_quality", args, threads, rows, smoke=args.smoke,
                                          checkpoints={n: c for n, (_, c) in models.items()},
                                          elapsed_s=time.perf_counter() - start))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    if not args.no_plot:
        plot(rows, out.with_suffix(".png"))
        print(f"wrote {path} and {out.with_suffix('.png')}")
    else:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
