"""Re-measure what ``moejax tune`` chose on text it did not tune on.

``moejax tune`` picks its pipeline on the first 64 windows (16 KB) of the held-out
text. This script scores that pipeline and the float model on the whole held-out
text (``--eval-bytes``) and on the three untuned texts of
``benchmarks/compression_quality.py`` (third-party Python, C headers, English
prose), and writes the relative changes. Run::

    python benchmarks/tune_check.py --model default --pipeline "quantize(bits=3,mixed=true,group_size=64)"
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from compression_quality import ood_texts  # noqa: E402

import moejax  # noqa: E402
from moejax import data, evaluation  # noqa: E402
from moejax.models import default_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", choices=sorted(default_model.BUNDLED_MODELS))
    ap.add_argument("--pipeline", required=True, help="the pipeline tune printed, without its leading 'profile,'")
    ap.add_argument("--eval-bytes", type=int, default=None, help="held-out bytes scored (default: all)")
    ap.add_argument("--ood-bytes", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/tune_check_MODEL.json)")
    args = ap.parse_args(argv)
    model = default_model.load_bundled_model(args.model)
    example = jnp.zeros((args.batch, args.seq_len), jnp.int32)
    texts = {"held-out (all)" if args.eval_bytes is None else f"held-out ({args.eval_bytes} B)":
             data.heldout_bytes()[:args.eval_bytes], **ood_texts(args.ood_bytes)}
    rows = []
    for spec in ("profile", "profile," + args.pipeline):
        t0 = time.perf_counter()
        opt = moejax.optimize(model, (example,), spec, check_exact=False)
        bpb = {name: evaluation.bits_per_byte(opt, t, seq_len=args.seq_len, batch=args.batch)
               for name, t in texts.items()}
        rows.append({"pipeline": spec, "expert_bytes": opt.stages[-1].stats["expert_bytes"], "bits_per_byte": bpb,
                     "seconds": time.perf_counter() - t0})
    base, tuned = rows
    for name in texts:
        rel = 100 * (tuned["bits_per_byte"][name] / base["bits_per_byte"][name] - 1)
        print(f"{name:32s} float {base['bits_per_byte'][name]:.4f}  tuned {tuned['bits_per_byte'][name]:.4f}  "
              f"{rel:+.2f}%")
    print(f"expert bytes: {tuned['expert_bytes']:.4g} ({tuned['expert_bytes'] / base['expert_bytes']:.3f}x of float)")
    out = Path(args.out or Path(__file__).parent / "results" / f"tune_check_{args.model.replace('-', '_')}.json")
    out.write_text(json.dumps({"machine": common.machine_info(), "date": time.strftime("%Y-%m-%d"),
                               "model": args.model, "argv": sys.argv[1:], "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
