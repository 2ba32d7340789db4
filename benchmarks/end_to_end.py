"""End-to-end speed of the bundled default model: moejax stages vs transformers' PyTorch Mixtral.

The default model is exported to a Hugging Face Mixtral checkpoint, loaded by
transformers (PyTorch, CPU, float32), and timed in the same run as moejax's
program after every stage of a pipeline: prefill (``batch`` prompts of
``seq_len`` tokens into an empty KV cache) and greedy KV-cache decoding of
``decode_tokens`` tokens. Runs are interleaved round by round so machine load
drifts over all contenders alike; medians are reported with ratios to PyTorch.

    python benchmarks/end_to_end.py [--passes SPEC] [--batch 1] [--seq-len 256] [--out PATH]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, machine_info, write_json  # noqa: E402

import moejax  # noqa: E402
from moejax import cli, data, evaluation  # noqa: E402
from moejax.models import save_pretrained_hf  # noqa: E402
from moejax.models.default_model import load_default_model  # noqa: E402


def _torch_runner(model_dir: str, prompt: np.ndarray, decode_tokens: int, threads: int):
    import torch
    from transformers import MixtralForCausalLM

    torch.set_num_threads(threads)
    hf = MixtralForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids = torch.from_numpy(prompt.astype(np.int64))

    @torch.inference_mode()
    def prefill():
        return hf(ids, use_cache=True)

    @torch.inference_mode()
    def decode():
        out = hf(ids, use_cache=True)  # not timed separately: subtract prefill below
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            out = hf(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - t0

    return hf, prefill, decode


def _moejax_runner(view, prompt: np.ndarray, decode_tokens: int):
    calls = evaluation.jitted_calls(view)
    b, s = prompt.shape
    tokens = jnp.asarray(prompt)
    zero = jnp.asarray(0, jnp.int32)

    def prefill():
        return jax.block_until_ready(calls.step(tokens, calls.init_cache(b, s + decode_tokens), zero))

    logits, cache = calls.step(tokens, calls.init_cache(b, s + decode_tokens), zero)
    first = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
    indices = [jnp.asarray(s + i, jnp.int32) for i in range(decode_tokens)]

    def decode():
        tok, c = first, cache
        t0 = time.perf_counter()
        for idx in indices:
            lg, c = calls.step(tok, c, idx)
            tok = jnp.argmax(lg[:, -1:], axis=-1).astype(jnp.int32)
        jax.block_until_ready(tok)
        return time.perf_counter() - t0

    return prefill, decode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", default=cli.DEFAULT_PIPELINE)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (match the cores)")
    ap.add_argument("--out", default="benchmarks/results/end_to_end.json")
    args = ap.parse_args(argv)

    model = load_default_model()
    text = data.heldout_bytes()
    b, s, d = args.batch, args.seq_len, args.decode_tokens
    prompt = np.frombuffer(text[: b * s], np.uint8).astype(np.int32).reshape(b, s)
    example = jnp.asarray(prompt)
    cache = model.init_cache(b, s + d)
    opt = moejax.optimize(model, (example,), args.passes,
                          decode_example=((example[:, :1],), {"cache": cache, "cache_index": jnp.int32(s)}),
                          extra_examples=[((example,), {"cache": cache, "cache_index": jnp.int32(0)})],
                          verbose=lambda m: print("  " + m, file=sys.stderr))

    contenders = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained_hf(model, tmp)
        try:
            hf, t_prefill, t_decode = _torch_runner(tmp, prompt, d, args.threads)
        except ImportError:
            hf = None
            print("transformers/torch not installed: PyTorch row skipped", file=sys.stderr)
        if hf is not None:
            import torch

            with torch.inference_mode():
                ref = hf(torch.from_numpy(prompt.astype(np.int64))).logits.numpy()
            parity = float(np.max(np.abs(ref - np.asarray(opt.at_stage(0)(example)))))
            contenders["transformers (PyTorch)"] = (t_prefill, t_decode)
        for i, stage in enumerate(opt.stages):
            contenders[f"moejax: {stage.name}"] = _moejax_runner(opt.at_stage(i), prompt, d)

        # warm up (compile), then interleave rounds
        for pf, dc in contenders.values():
            pf(), dc()
        prefill_times = {k: [] for k in contenders}
        decode_times = {k: [] for k in contenders}
        for _ in range(args.repeats):
            for name, (pf, dc) in contenders.items():
                t0 = time.perf_counter()
                pf()
                prefill_times[name].append(time.perf_counter() - t0)
                decode_times[name].append(dc())

    base = "transformers (PyTorch)" if hf is not None else next(iter(contenders))
    rows, records = [], []
    for name in contenders:
        p = statistics.median(prefill_times[name])
        dd = statistics.median(decode_times[name])
        rp = statistics.median(prefill_times[base]) / p
        rd = statistics.median(decode_times[base]) / dd
        rows.append({"contender": name, "prefill tok/s": b * s / p, f"prefill vs {base}": rp,
                     "decode tok/s": b * d / dd, f"decode vs {base}": rd})
        records.append({"contender": name, "prefill_tokens_per_s": b * s / p, "decode_tokens_per_s": b * d / dd,
                        "prefill_speedup_vs_base": rp, "decode_speedup_vs_base": rd,
                        "prefill_times_s": prefill_times[name], "decode_times_s": decode_times[name]})
    print(format_table(rows, ["contender", "prefill tok/s", f"prefill vs {base}", "decode tok/s",
                              f"decode vs {base}"]))
    if hf is not None:
        print(f"logit parity moejax (as traced) vs PyTorch: max |diff| = {parity:.2e}")
    write_json(args.out, {"benchmark": "end_to_end", "machine": machine_info(), "args": vars(args),
                          "baseline": base, "results": records,
                          "parity_max_abs_diff": parity if hf is not None else None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
