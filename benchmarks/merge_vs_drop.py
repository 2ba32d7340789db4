"""Per MoE layer: for how many experts is folding them into a neighbour cheaper than dropping them?

    python benchmarks/merge_vs_drop.py [--models default fine-grained] [--calib-bytes 65536]

Profiles each bundled model as ``benchmarks/compression_quality.py`` does
(``select-impl(layout=stacked),profile`` on the first ``--calib-bytes`` of the
training text) and compares, per expert, the cheapest REAP-style absorption cost
(``merge(method=reap)``'s :func:`~moejax.passes.merge.absorption_costs`: mean over
its tokens of gate x |its output - the other expert's output|) with its REAP
saliency (the same without the other expert: what pruning it loses before the
router renormalises). A ratio above 1 means the nearest other expert is further
from this one's output than zero is, so merging it away adds more error than
dropping it. Prints one line per layer; no JSON (a diagnostic behind README's
explanation of why merging trails pruning on the fine-grained model).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import smoke_model  # noqa: E402

import moejax  # noqa: E402
from moejax import data  # noqa: E402
from moejax.passes.merge import absorption_costs  # noqa: E402
from moejax.passes.prune import (expert_outputs, find_moe_layers, layer_gates, layer_profile,  # noqa: E402
                                 reap_saliency)
from moejax.pipeline import PassContext, PassManager  # noqa: E402


def absorb_to_drop_ratios(program: moejax.Program) -> dict[str, np.ndarray]:
    """Per layer (first stack row), each routed expert's cheapest absorption cost over its REAP saliency."""
    out = {}
    for name, layer in find_moe_layers(program, "merge_vs_drop").items():
        x = np.asarray(layer_profile(program, layer, "merge_vs_drop", ("inputs",)).inputs[0], np.float32)
        gates, picked = layer_gates(program, layer, 0, x)
        outputs = expert_outputs(program, layer, 0, x)
        cost = absorption_costs(gates, picked, outputs)
        np.fill_diagonal(cost, np.inf)
        routed = picked.any(0)
        out[name] = cost.min(1)[routed] / reap_saliency(program, layer, 0, x)[routed]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["default", "fine-grained"], help="bundled models")
    ap.add_argument("--calib-bytes", type=int, default=65536, help="training-text bytes profiled")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--smoke", action="store_true", help="a tiny random model instead (tests)")
    args = ap.parse_args(argv)
    from moejax.models.default_model import BUNDLED_MODELS, load_bundled_model

    unknown = [m for m in args.models if m not in BUNDLED_MODELS]
    if unknown and not args.smoke:
        ap.error(f"--models {unknown[0]!r} is not a bundled model; choose from {', '.join(BUNDLED_MODELS)}")
    if args.calib_bytes < args.seq_len:
        ap.error(f"--calib-bytes ({args.calib_bytes}) must hold one window of --seq-len ({args.seq_len})")
    models = {"smoke": smoke_model(n_experts=8)} if args.smoke else {m: load_bundled_model(m) for m in args.models}
    for model_name, model in models.items():
        program = moejax.trace(model, jnp.zeros((args.batch, args.seq_len), jnp.int32))
        ctx = PassContext(calibration=[data.calibration_tokens(args.calib_bytes, args.seq_len)])
        program = PassManager(["select-impl(layout=stacked)", "profile"], check_exact=False).run(
            program, ctx)[-1].program
        for layer, ratio in absorb_to_drop_ratios(program).items():
            print(f"{model_name:13s} {layer:16s} absorbing is cheaper than dropping for {int((ratio < 1).sum()):3d} "
                  f"of {ratio.size} experts; cheapest absorption / REAP saliency: median {np.median(ratio):.3f}, "
                  f"min {ratio.min():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
