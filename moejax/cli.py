"""The ``moejax`` command line: optimize, generate, passes, inspect."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "DEFAULT_PIPELINE"]

# The pipeline `moejax optimize` runs when --passes is not given: measure routing, skip
# weak second experts, 4-bit experts, then the fastest expert implementation here.
DEFAULT_PIPELINE = "profile,gating(skip_ratio=0.3),quantize(bits=4,group_size=64),select-impl"


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Loading models.
# --------------------------------------------------------------------------
def load_model(spec: str):
    """``default`` -> the bundled model; otherwise a Hugging Face checkpoint folder."""
    if spec == "default":
        from moejax.models.default_model import CheckpointError, load_default_model

        try:
            return load_default_model()
        except CheckpointError as e:
            raise CLIError(f"the bundled default model cannot be loaded ({e}); reinstall moejax") from e
    path = Path(spec)
    if not path.exists():
        raise CLIError(f"model path {spec!r} does not exist; pass --model default or a folder with config.json "
                       "and *.safetensors")
    if not (path / "config.json").exists():
        raise CLIError(f"{spec!r} has no config.json; pass a Hugging Face checkpoint folder (config.json + "
                       "*.safetensors) or --model default")
    from moejax import models

    try:
        return models.from_pretrained(str(path))
    except (models.CheckpointError, NotImplementedError, ValueError, KeyError, FileNotFoundError) as e:
        raise CLIError(f"cannot load {spec!r}: {e}") from e


# --------------------------------------------------------------------------
# optimize
# --------------------------------------------------------------------------
def _stage_rows(opt, text: bytes | None, prompt, args) -> list[dict[str, Any]]:
    import numpy as np

    from moejax import evaluation, offload

    rows = []
    for i, stage in enumerate(opt.stages):
        view = opt.at_stage(i)
        row = {
            "pass": stage.name,
            "expert_bytes": stage.stats["expert_bytes"],
            "total_bytes": stage.stats["total_bytes"],
            "active_expert_flops_per_token": stage.stats["active_expert_flops_per_token"],
            "bits_per_byte": None,
            "prefill_tokens_per_s": None,
            "decode_tokens_per_s": None,
            "pass_seconds": stage.seconds,
            "max_deviation": stage.max_deviation,
        }
        _log(f"  evaluating stage {i} ({stage.name}) ...")
        offload.reset_counters(view)
        if text is not None:
            res = evaluation.evaluate(view, text, eval_bytes=args.eval_bytes, seq_len=args.seq_len,
                                      batch=args.batch, decode_tokens=args.decode_tokens,
                                      decode_batch=args.batch)
            row.update(bits_per_byte=res.bits_per_byte, prefill_tokens_per_s=res.prefill_tokens_per_s,
                       decode_tokens_per_s=res.decode_tokens_per_s)
        else:  # no held-out text for this vocabulary: speed only, on the example prompt
            t_prefill, t_decode = evaluation._prefill_and_decode(
                evaluation.jitted_calls(view), np.asarray(prompt), args.decode_tokens, args.batch, 3)
            row.update(prefill_tokens_per_s=prompt.size / t_prefill,
                       decode_tokens_per_s=args.batch * args.decode_tokens / t_decode)
        row.update(offload.report_fields(view))  # the decode steps' cache hits, prefetch and bytes moved
        rows.append(row)
    return rows


def _fmt_table(rows: list[dict[str, Any]]) -> str:
    head = ["pass", "expert MB", "total MB", "active expert GFLOP/tok", "bits/byte", "prefill tok/s",
            "decode tok/s"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    body = [[r["pass"], f(r["expert_bytes"] / 1e6, ".3f"), f(r["total_bytes"] / 1e6, ".3f"),
             f(r["active_expert_flops_per_token"] / 1e9, ".5f"), f(r["bits_per_byte"], ".4f"),
             f(r["prefill_tokens_per_s"], ".0f"), f(r["decode_tokens_per_s"], ".1f")] for r in rows]
    if any("expert_cache_hit_rate" in r for r in rows):  # an offload stage: its decode-step figures
        head += ["resident MB", "hit rate", "prefetch recall", "MB moved/tok"]
        for r, line in zip(rows, body):
            moved = r.get("bytes_moved_per_token")
            line += [f(r.get("resident_expert_bytes") and r["resident_expert_bytes"] / 1e6, ".3f"),
                     f(r.get("expert_cache_hit_rate"), ".3f"), f(r.get("prefetch_recall"), ".3f"),
                     f(moved and moved / 1e6, ".3f")]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def cmd_optimize(args) -> int:
    import jax.numpy as jnp

    import moejax
    from moejax import data

    passes = moejax.parse_pipeline(args.passes)  # fail fast on a bad spec, before loading anything
    t0 = time.perf_counter()
    model = load_model(args.model)
    cfg = getattr(model, "config", None)
    byte_level = cfg is not None and cfg.vocab_size >= 256 and args.model == "default"
    text = data.heldout_bytes() if byte_level and args.eval_bytes > 0 else None
    if text is None and args.eval_bytes > 0:
        _log("note: bits per byte is measured for byte-level models only (the bundled default); skipped")
    b, s = args.batch, args.seq_len
    vocab = cfg.vocab_size if cfg is not None else 256
    source = text if text is not None else bytes(range(256)) * (b * s // 256 + 1)
    example = jnp.asarray(list(source[: b * s]), jnp.int32).reshape(b, s) % vocab
    # The signatures evaluation calls: forward, prefill into a cache, one-token decode step.
    cache = model.init_cache(b, s + args.decode_tokens)
    decode_example = ((example[:, :1],), {"cache": cache, "cache_index": jnp.int32(s)})
    prefill_example = ((example,), {"cache": cache, "cache_index": jnp.int32(0)})
    _log(f"moejax optimize: model={args.model} passes={moejax.pipeline_to_str(passes) or '(none)'}")
    opt = moejax.optimize(model, (example,), passes, decode_example=decode_example,
                          extra_examples=[prefill_example], dump_dir=args.dump, verbose=lambda m: _log("  " + m))
    _log(f"  pipeline done in {time.perf_counter() - t0:.1f}s")
    if args.dump:
        _dump_extras(opt, Path(args.dump))
    rows = _stage_rows(opt, text, example, args)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_fmt_table(rows))
    return 0


def _dump_extras(opt, directory: Path) -> None:
    profile = opt.program.metadata.get("routing_profile")
    if profile is None:
        return
    try:
        from moejax.passes.profile import save_load_heatmap
    except ImportError:
        return
    try:
        save_load_heatmap(profile, directory / "expert_load.png")
    except ImportError:
        _log("note: matplotlib is not installed; expert load heatmap skipped")


# --------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------
def cmd_generate(args) -> int:
    import jax
    import jax.numpy as jnp

    from moejax import models

    model = load_model(args.model)
    prompt = jnp.asarray([list(args.prompt.encode("utf-8"))], jnp.int32)
    if prompt.shape[1] == 0:
        raise CLIError("--prompt is empty; give some text to continue")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and int(prompt.max()) >= vocab:
        raise CLIError(f"the prompt holds byte {int(prompt.max())}, but the model's vocabulary has only {vocab} "
                       f"tokens (generate feeds UTF-8 bytes as token ids); use a byte-level model such as "
                       f"--model default, or a prompt of bytes below {vocab}")
    out = models.generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          key=jax.random.PRNGKey(args.seed))
    new = bytes(int(t) % 256 for t in out[0, prompt.shape[1]:])
    sys.stdout.write(args.prompt + new.decode("utf-8", errors="replace") + "\n")
    return 0


# --------------------------------------------------------------------------
# passes / inspect
# --------------------------------------------------------------------------
def cmd_passes(args) -> int:
    import moejax

    from moejax.pipeline import exactness_label

    for name, cls in moejax.registered_passes().items():
        kind = exactness_label(cls)  # reads class-level declarations (`exact` may be a property on ep)
        needs = f", needs {', '.join(cls.needs)}" if cls.needs else ""
        print(f"{name}  ({kind}{needs})")
        doc = (cls.__doc__ or "").strip().splitlines()
        if doc:
            print(f"    {doc[0]}")
        if cls.tolerance is not None and kind != "lossy":
            t = cls.tolerance
            print(f"    not bit-exact: |difference| <= {t.atol:g} + {t.rtol:g} * max|output| ({t.reason})")
        for f in dataclasses.fields(cls):
            if f.repr:
                default = f.default if f.default is not dataclasses.MISSING else "(required)"
                print(f"    {f.name} = {default!r}")
    return 0


def cmd_inspect(args) -> int:
    directory = Path(args.dir)
    metas = sorted(directory.glob("*.json")) if directory.is_dir() else []
    metas = [m for m in metas if m.stem[:2].isdigit()]
    if not metas:
        raise CLIError(f"{args.dir!r} holds no dumped stages; create one with `moejax optimize --dump DIR`")
    stages = [(m, json.loads(m.read_text())) for m in metas]
    if args.stage is not None:
        match = [m for m, meta in stages if str(meta["index"]) == args.stage or meta["pass"] == args.stage
                 or m.stem == args.stage]
        if not match:
            raise CLIError(f"no stage {args.stage!r}; stages: {', '.join(m.stem for m, _ in stages)}")
        print(match[0].with_suffix(".txt").read_text())
        return 0
    if args.diff:
        import difflib

        a, b = (directory / f"{s}.txt" for s in args.diff)
        for p in (a, b):
            if not p.exists():
                raise CLIError(f"no stage file {p.name}; stages: {', '.join(m.stem for m, _ in stages)}")
        sys.stdout.writelines(difflib.unified_diff(a.read_text().splitlines(True), b.read_text().splitlines(True),
                                                   fromfile=a.stem, tofile=b.stem))
        return 0
    print(f"{'file':32} {'pass':34} {'expert MB':>9} {'total MB':>9} {'GFLOP/tok':>10} {'max dev':>8}  ops")
    for m, meta in stages:
        st = meta["stats"]
        dev = "-" if meta["max_deviation"] is None else f"{meta['max_deviation']:.1e}"
        ops = " ".join(f"{k[4:]}:{v}" for k, v in st["op_counts"].items())
        print(f"{m.stem:32} {meta['pass']:34} {st['expert_bytes'] / 1e6:9.3f} {st['total_bytes'] / 1e6:9.3f} "
              f"{st['active_expert_flops_per_token'] / 1e9:10.5f} {dev:>8}  {ops}")
    return 0


# --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moejax", description="Compiler passes for Mixture-of-Experts inference in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("optimize", help="run a pass pipeline on a model and measure every stage")
    o.add_argument("--model", default="default", help="'default' (bundled model) or a Hugging Face checkpoint folder")
    o.add_argument("--passes", default=DEFAULT_PIPELINE, help=f"pipeline string (default: {DEFAULT_PIPELINE!r})")
    o.add_argument("--eval-bytes", type=int, default=16384, help="held-out bytes for bits per byte (0 to skip)")
    o.add_argument("--batch", type=int, default=4, help="sequences per batch for tracing and timing")
    o.add_argument("--seq-len", type=int, default=256, help="tokens per sequence for prefill")
    o.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded when timing decode")
    o.add_argument("--dump", default=None, help="write every stage's program (text, graph, stats) to this folder")
    o.add_argument("--json", action="store_true", help="print the table as JSON")
    o.set_defaults(func=cmd_optimize)

    g = sub.add_parser("generate", help="continue a prompt with KV-cache decoding")
    g.add_argument("--model", default="default")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 for greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    ps = sub.add_parser("passes", help="list registered passes with their options")
    ps.set_defaults(func=cmd_passes)

    i = sub.add_parser("inspect", help="show the stages of a pipeline dumped with --dump")
    i.add_argument("dir")
    i.add_argument("--stage", default=None, help="print one stage's program (index, pass or file stem)")
    i.add_argument("--diff", nargs=2, metavar=("A", "B"), default=None, help="diff two stage files (stems)")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"moejax: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a pipeline/model error the user can act on
        from moejax.numerics import NonFiniteError
        from moejax.pipeline import PassError
        from moejax.program import InputSignatureError

        if isinstance(e, (PassError, InputSignatureError, NonFiniteError)):
            print(f"moejax: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
