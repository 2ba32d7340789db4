"""End-to-end speed of the bundled default model: moejax pipelines vs transformers' PyTorch Mixtral.

Run::

    python benchmarks/end_to_end.py                                   # the committed rows
    python benchmarks/end_to_end.py --pipeline select-impl --pipeline 'quantize(bits=8),select-impl'
    python benchmarks/end_to_end.py --smoke                           # a tiny random model, seconds

The default model is exported to a Hugging Face Mixtral checkpoint, loaded by
transformers (PyTorch, CPU, float32), and timed in the same run as each moejax
pipeline (``moejax.optimize`` of the model with a prefill-into-cache and a decode-step
signature, then called as the optimised model): prefill (``--batch`` prompts of
``--seq-len`` held-out bytes into an empty KV cache) and greedy KV-cache decoding of
``--decode-tokens`` tokens. Every contender runs once per round, rounds interleaved,
so machine load drifts over all of them alike; medians of ``--repeats`` rounds (at
least 3 by default; the JSON keeps every round).

Rows (one per contender):

* ``contender="torch"``: transformers' ``MixtralForCausalLM``, float32, with
  ``torch.set_num_threads(--threads)``; XLA:CPU and moejax's native kernel get the same count.
* ``contender="moejax"``, one per ``--pipeline``: labelled with the full pipeline
  string. Default: the exact ``select-impl`` (float experts; the headline against
  PyTorch) and the lossy ``quantize(bits=4,group_size=64),select-impl``. A pipeline is
  ``exact`` when every pass is (``moejax passes``).

Exact rows get ``prefill_x_torch``/``decode_x_torch`` (tokens/s over PyTorch's) and
``max_abs_logit_diff_vs_torch``. Lossy rows compute another function than float
PyTorch: they are printed in their own table, and their ratios are named
``*_x_torch_float`` (vs float PyTorch) and ``*_x_exact`` (vs the first exact moejax
pipeline of the run); their logit deviation is ``max_abs_logit_dev_vs_torch_float``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEFAULT_REPEATS, add_threads_argument, default_out, format_table,  # noqa: E402
                    pipeline_is_exact, result_payload, set_threads_or_exit, set_torch_threads, smoke_model, write_json)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import moejax  # noqa: E402
from moejax import data, evaluation  # noqa: E402

DEFAULT_PIPELINES = ("select-impl", "quantize(bits=4,group_size=64),select-impl")
Runner = tuple[Callable[[], Any], Callable[[], float]]  # (prefill, decode -> its own seconds)


def torch_runner(model_dir: str, prompt: np.ndarray, decode_tokens: int) -> tuple[Any, Runner]:
    """transformers' Mixtral on ``model_dir``: (model, (prefill, decode)); raises ImportError without torch."""
    import torch
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.from_numpy(prompt.astype(np.int64))

    @torch.inference_mode()
    def prefill():
        return hf(ids, use_cache=True)

    @torch.inference_mode()
    def decode() -> float:
        out = hf(ids, use_cache=True)  # the prefill is not part of the decode time
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            out = hf(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - t0

    return hf, (prefill, decode)


def moejax_runner(opt: moejax.OptimizedModel, prompt: np.ndarray, decode_tokens: int) -> tuple[Runner, np.ndarray]:
    """Prefill and greedy decode through the optimised model's own call (routed by signature), and the
    prompt's logits from the prefill signature (the parity check; the forward signature is never compiled)."""
    calls = evaluation.jitted_calls(opt)
    b, s = prompt.shape
    tokens = jnp.asarray(prompt)
    zero = jnp.asarray(0, jnp.int32)

    def prefill():
        return jax.block_until_ready(calls.step(tokens, calls.init_cache(b, s + decode_tokens), zero))

    logits, cache = calls.step(tokens, calls.init_cache(b, s + decode_tokens), zero)
    first = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
    indices = [jnp.asarray(s + i, jnp.int32) for i in range(decode_tokens)]

    def decode() -> float:
        tok, c = first, cache
        t0 = time.perf_counter()
        for idx in indices:
            lg, c = calls.step(tok, c, idx)
            tok = jnp.argmax(lg[:, -1:], axis=-1).astype(jnp.int32)
        jax.block_until_ready(tok)
        return time.perf_counter() - t0

    return (prefill, decode), np.asarray(logits)


def optimize_pipeline(model: Any, prompt: np.ndarray, decode_tokens: int, pipeline: str, check_exact: bool,
                      log: Callable[[str], None]) -> moejax.OptimizedModel:
    """``moejax.optimize`` with the forward, prefill-into-cache and decode-step signatures.

    ``check_exact``: optimize's stage checks (exact passes unchanged, no NaN/Inf); they
    compile and run every stage of every signature twice, so ``--smoke`` skips them.
    """
    b, s = prompt.shape
    example = jnp.asarray(prompt)
    cache = model.init_cache(b, s + decode_tokens)
    return moejax.optimize(model, (example,), pipeline,
                           decode_example=((example[:, :1],), {"cache": cache, "cache_index": jnp.int32(s)}),
                           extra_examples={"prefill": ((example,), {"cache": cache, "cache_index": jnp.int32(0)})},
                           check_exact=check_exact, verbose=lambda m: log("  " + m))


def interleaved(runners: dict[str, Runner], repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """name -> (prefill seconds, decode seconds), one of each per round; one untimed round first (compile)."""
    for prefill, decode in runners.values():
        prefill(), decode()
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runners}
    for _ in range(repeats):
        for name, (prefill, decode) in runners.items():
            t0 = time.perf_counter()
            prefill()
            times[name][0].append(time.perf_counter() - t0)
            times[name][1].append(decode())
    return times


def make_rows(times: dict[str, tuple[list[float], list[float]]], info: dict[str, dict[str, Any]], batch: int,
              seq_len: int, decode_tokens: int, threads: int) -> list[dict[str, Any]]:
    """One row per contender with tokens/s, every round's time and the ratios its exactness allows."""
    med = {n: (statistics.median(p), statistics.median(d)) for n, (p, d) in times.items()}
    torch_med = med.get("torch")
    exact_name = next((n for n in times if n != "torch" and info[n]["exact"]), None)
    rows = []
    for name, (pt, dt) in times.items():
        p, d = med[name]
        row = {"contender": info[name]["contender"], "pipeline": info[name]["pipeline"], "exact": info[name]["exact"],
               "label": name, "threads": threads, "batch": batch, "seq_len": seq_len, "decode_tokens": decode_tokens,
               "prefill_tokens_per_s": batch * seq_len / p, "decode_tokens_per_s": batch * decode_tokens / d,
               "prefill_median_s": p, "decode_median_s": d, "repeats": len(pt),
               "prefill_times_s": pt, "decode_times_s": dt, **info[name].get("extra", {})}
        suffix = "_x_torch" if info[name]["exact"] else "_x_torch_float"  # lossy: another function than torch's
        if torch_med is not None:
            row["prefill" + suffix], row["decode" + suffix] = torch_med[0] / p, torch_med[1] / d
        if not info[name]["exact"] and exact_name is not None:
            row["prefill_x_exact"], row["decode_x_exact"] = med[exact_name][0] / p, med[exact_name][1] / d
        rows.append(row)
    return rows


def tables(rows: list[dict[str, Any]]) -> str:
    exact = [r for r in rows if r["exact"]]
    lossy = [r for r in rows if not r["exact"]]
    text = ["exact (float; x_torch: tokens/s over PyTorch's):",
            format_table(exact, ["label", "prefill_tokens_per_s", "prefill_x_torch", "decode_tokens_per_s",
                                 "decode_x_torch", "max_abs_logit_diff_vs_torch"])]
    if lossy:
        text += ["", "lossy (another function than float PyTorch; x_exact: over the exact moejax pipeline):",
                 format_table(lossy, ["label", "prefill_tokens_per_s", "prefill_x_exact", "prefill_x_torch_float",
                                      "decode_tokens_per_s", "decode_x_exact", "decode_x_torch_float",
                                      "max_abs_logit_dev_vs_torch_float"])]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", action="append", default=None,
                    help="a moejax pipeline to time (repeatable; default: " + " and ".join(DEFAULT_PIPELINES) + ")")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help=f"timed rounds (default 5; at least {DEFAULT_REPEATS} "
                    "for committed results)")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers PyTorch row")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny random model instead of the bundled one (tests; use small --seq-len etc.)")
    add_threads_argument(ap)
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/end_to_end.json; --smoke: a temp file)")
    args = ap.parse_args(argv)
    args.out = args.out or default_out("end_to_end", args.smoke)
    for flag in ("batch", "seq_len", "decode_tokens", "repeats"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    pipelines = args.pipeline or list(DEFAULT_PIPELINES)
    try:
        exact = {p: pipeline_is_exact(p) for p in pipelines}
    except moejax.PassError as err:
        ap.error(f"--pipeline: {err}")
    if len(set(pipelines)) != len(pipelines):
        ap.error("--pipeline: each pipeline once")
    threads = set_threads_or_exit(ap, args.threads)  # before the first JAX computation: XLA sizes its pool then

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    start = time.perf_counter()
    if args.smoke:
        model = smoke_model()
    else:
        from moejax.models.default_model import load_default_model

        model = load_default_model()
    b, s, d = args.batch, args.seq_len, args.decode_tokens
    text = data.heldout_bytes(b * s)
    if len(text) < b * s:
        ap.error(f"--batch x --seq-len = {b * s} bytes exceeds the held-out text ({len(text)} bytes)")
    prompt = np.frombuffer(text[: b * s], np.uint8).astype(np.int32).reshape(b, s)

    runners: dict[str, Runner] = {}
    info: dict[str, dict[str, Any]] = {}
    torch_logits = None
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_torch and set_torch_threads(threads):
            import torch

            from moejax.models import save_pretrained_hf

            save_pretrained_hf(model, tmp)
            hf, runners["torch"] = torch_runner(tmp, prompt, d)
            info["torch"] = {"contender": "torch", "pipeline": None, "exact": True,
                             "extra": {"impl": "transformers MixtralForCausalLM (float32)"}}
            with torch.inference_mode():
                torch_logits = hf(torch.from_numpy(prompt.astype(np.int64))).logits.numpy()
        elif not args.no_torch:
            log("transformers/torch not installed: PyTorch row skipped")
        for pipeline in pipelines:
            t0 = time.perf_counter()
            opt = optimize_pipeline(model, prompt, d, pipeline, not args.smoke, log)
            name = f"moejax: {pipeline}"
            st = opt.stages_of("decode")[-1].stats
            extra = {"optimize_s": time.perf_counter() - t0, "expert_bytes": st["expert_bytes"],
                     "total_bytes": st["total_bytes"], "ffn_impls": st["ffn_impls"]}
            runners[name], logits = moejax_runner(opt, prompt, d)
            if torch_logits is not None:  # the prompt's logits
                dev = float(np.max(np.abs(logits - torch_logits)))
                extra["max_abs_logit_diff_vs_torch" if exact[pipeline] else "max_abs_logit_dev_vs_torch_float"] = dev
            info[name] = {"contender": "moejax", "pipeline": pipeline, "exact": exact[pipeline], "extra": extra}
        times = interleaved(runners, args.repeats)

    rows = make_rows(times, info, b, s, d, threads["threads"])
    print(tables(rows))
    path = write_json(args.out, result_payload("end_to_end", args, threads, rows, smoke=args.smoke,
                                               check_exact=not args.smoke,
                                               pipelines=pipelines, elapsed_s=time.perf_counter() - start))
    print(f"wrote {path} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
