"""The ``moejax`` command line: optimize, generate, passes, inspect.

Every argument is checked before any model work; a mistake ends with one line
``moejax: error: ...`` that names the fix and exit code 2. Ctrl-C ends with one
line and exit code 130. A traceback is shown only for a bug in moejax, with a line
that says so (exit code 70).
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import os
import platform
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "DEFAULT_PIPELINE", "CLIError"]

# The pipeline `moejax optimize` runs when --passes is not given: measure routing, skip
# weak second experts, 4-bit experts, then the fastest expert implementation here.
DEFAULT_PIPELINE = "profile,gating(skip_ratio=0.3),quantize(bits=4,group_size=64),select-impl"

EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 2, 70, 130
MAX_NEW_TOKENS = 1_000_000  # the KV cache is allocated up front: a typo of 10**9 should not try
CALIBRATION_WINDOW = 256  # tokens per window when `generate --passes` profiles routing


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


# --------------------------------------------------------------------------
# Argument types: each rejects a bad value with a message argparse prints as one line.
# --------------------------------------------------------------------------
def _int_in(low: int, high: float, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give {what}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is too {'small' if value < low else 'large'}; give {what}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _float_in(low: float, high: float, low_open: bool, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {what}") from None
        if not (value > low if low_open else value >= low) or not value <= high:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{value:g} is out of range; give {what}")
        return value
    parse.__name__ = what
    return parse


def _eval_bytes(text: str) -> int:
    value = _int_in(0, float("inf"), "0 (skip quality) or at least 2 bytes")(text)
    if value == 1:
        raise argparse.ArgumentTypeError("1 byte has no next byte to predict; give 0 (skip quality) or at least 2")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (no usage block) and goes through main's error path."""

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(f"{message} (see `{self.prog} --help`)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moejax")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


# --------------------------------------------------------------------------
# Loading models.
# --------------------------------------------------------------------------
def load_model(spec: str, mesh_text: str | None = None):
    """``default`` -> the bundled model; otherwise a checkpoint folder (Hugging Face, or the bundled format).

    Commands run :func:`check_model` first, before any slow work; loading maps what is
    left (a tensor missing or mis-shaped) to the same one-line error. ``mesh_text``
    (``"expert=8"``) loads the parameters straight onto that device mesh.
    """
    from moejax import models

    mesh = None
    if mesh_text is not None:
        from moejax.sharding.mesh import mesh_from_text

        try:
            mesh = mesh_from_text(mesh_text)
        except ValueError as e:
            raise CLIError(f"--mesh: {e}") from None
    if spec in models.BUNDLED_MODELS:
        try:
            model = models.load_bundled_model(spec)
        except models.CheckpointError as e:
            raise CLIError(f"the bundled {spec} model cannot be loaded ({e}); reinstall moejax") from e
        if mesh is None:
            return model
        from moejax.models.sharded_load import shard_model

        return shard_model(model, mesh)
    with _checkpoint_errors(spec):
        return models.from_pretrained(spec, mesh=mesh)


MAX_TEXT_BYTES = 256 * 2**20


def _read_text(path: str | None, flag: str) -> bytes | None:
    """The bytes of a user's text file (for ``--eval-text``/``--calib-text``), or None."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{flag} {path!r} is not a file; give a UTF-8 text file")
    if p.stat().st_size > MAX_TEXT_BYTES:
        raise CLIError(f"{flag} {path!r} is {p.stat().st_size} bytes, over the {MAX_TEXT_BYTES} byte limit; "
                       "give a shorter sample")
    data = p.read_bytes()
    if len(data) < 2:
        raise CLIError(f"{flag} {path!r} holds {len(data)} bytes; give at least a sentence of text")
    return data


def _token_ids(text: bytes, tokenizer) -> Any:
    """Token ids of ``text``: its tokenizer's, or its UTF-8 bytes for byte-level models."""
    import numpy as np

    if tokenizer is None:
        return np.frombuffer(text, np.uint8).astype(np.int32)
    return np.asarray(tokenizer.encode(text.decode("utf-8", "ignore")) or [0], np.int32)


def _tokenizer(spec: str):
    """The checkpoint's tokenizer.json as a TextTokenizer, or None (the bundled models and byte-level folders)."""
    from moejax.models import BUNDLED_MODELS

    if spec in BUNDLED_MODELS:
        return None
    from moejax.models import CheckpointError
    from moejax.models.tokenizer import load_tokenizer

    try:
        return load_tokenizer(spec)
    except CheckpointError as e:
        raise CLIError(str(e)) from None


def check_model(spec: str) -> None:
    """Refuse a bad ``--model`` before any slow work: the folder, its config.json and safetensors headers."""
    from moejax import models

    if spec in models.BUNDLED_MODELS:
        return
    path = Path(spec)
    if not path.exists():
        raise CLIError(f"model path {spec!r} does not exist; pass --model default, --model fine-grained or a "
                       "folder with config.json and *.safetensors")
    if not (path / "config.json").is_file():
        raise CLIError(f"{spec!r} has no config.json; pass a Hugging Face checkpoint folder (config.json + "
                       "*.safetensors) or --model default")
    with _checkpoint_errors(spec):
        models.check_checkpoint(spec)


@contextlib.contextmanager
def _checkpoint_errors(spec: str) -> Iterator[None]:
    from moejax import models

    try:
        yield
    except (models.CheckpointError, NotImplementedError, ValueError, KeyError, FileNotFoundError) as e:
        raise CLIError(f"cannot load {spec!r}: {e}") from e


def _progress(args) -> Any:
    from moejax.progress import Progress

    return Progress(enabled=not args.quiet)


# --------------------------------------------------------------------------
# optimize
# --------------------------------------------------------------------------
def _stage_rows(opt, text: bytes | None, prompt, args, progress, tokenizer=None) -> list[dict[str, Any]]:
    """Every stage measured: bytes, FLOPs, quality on ``text`` (bits per byte; with ``tokenizer``
    also per-token cross-entropy) and speed."""
    import numpy as np

    from moejax import evaluation, offload

    rows = []
    n = len(opt.stages)
    for i, stage in enumerate(opt.stages):
        view = opt.at_stage(i)
        row = {
            "pass": stage.name,
            "exact": stage.exact,
            "expert_bytes": stage.stats["expert_bytes"],
            "total_bytes": stage.stats["total_bytes"],
            "active_expert_flops_per_token": stage.stats["active_expert_flops_per_token"],
            "bits_per_byte": None,
            "prefill_tokens_per_s": None,
            "decode_tokens_per_s": None,
            "pass_seconds": stage.seconds,
            "max_deviation": stage.max_deviation,
        }
        what = f"evaluating stage {i}/{n - 1} ({stage.name})"

        def step(part: str) -> None:
            progress.update(f"{what}: {part}", i, n)

        offload.reset_counters(view)
        if text is not None and tokenizer is None:  # byte-level: quality and speed over the text
            res = evaluation.evaluate(view, text, eval_bytes=args.eval_bytes, seq_len=args.seq_len,
                                      batch=args.batch, decode_tokens=args.decode_tokens,
                                      decode_batch=args.batch, progress=step)
            row.update(bits_per_byte=res.bits_per_byte, prefill_tokens_per_s=res.prefill_tokens_per_s,
                       decode_tokens_per_s=res.decode_tokens_per_s)
        else:
            if text is not None:  # a tokenizer: quality on the text's tokens
                step("quality on the text's tokens")
                q = evaluation.token_quality(view, tokenizer, text.decode("utf-8", "ignore"), seq_len=args.seq_len,
                                             batch=args.batch)
                row.update(bits_per_byte=q["bits_per_byte"], cross_entropy=q["cross_entropy_nats_per_token"])
            # speed on the example prompt
            t_prefill, t_decode = evaluation.prefill_and_decode_seconds(
                evaluation.jitted_calls(view), np.asarray(prompt), args.decode_tokens, args.batch, 3, step)
            row.update(prefill_tokens_per_s=prompt.size / t_prefill,
                       decode_tokens_per_s=args.batch * args.decode_tokens / t_decode)
        row.update(offload.report_fields(view))  # the decode steps' cache hits, prefetch and bytes moved
        rows.append(row)
    progress.update("evaluation done", n, n)
    return rows


def _fmt_table(rows: list[dict[str, Any]]) -> str:
    head = ["pass", "expert MB", "total MB", "active expert GFLOP/tok", "bits/byte", "prefill tok/s",
            "decode tok/s"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    body = [[r["pass"], f(r["expert_bytes"] / 1e6, ".3f"), f(r["total_bytes"] / 1e6, ".3f"),
             f(r["active_expert_flops_per_token"] / 1e9, ".5f"), f(r["bits_per_byte"], ".4f"),
             f(r["prefill_tokens_per_s"], ".0f"), f(r["decode_tokens_per_s"], ".1f")] for r in rows]
    if any(r.get("cross_entropy") is not None for r in rows):  # a checkpoint with a tokenizer
        head.insert(4, "nats/token")
        for r, line in zip(rows, body):
            line.insert(4, f(r.get("cross_entropy"), ".4f"))
    if any("expert_cache_hit_rate" in r for r in rows):  # an offload stage: its decode-step figures
        head += ["resident MB", "hit rate", "prefetch recall", "MB moved/tok"]
        for r, line in zip(rows, body):
            moved = r.get("bytes_moved_per_token")
            line += [f(r.get("resident_expert_bytes") and r["resident_expert_bytes"] / 1e6, ".3f"),
                     f(r.get("expert_cache_hit_rate"), ".3f"), f(r.get("prefetch_recall"), ".3f"),
                     f(moved and moved / 1e6, ".3f")]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    return "\n".join(lines)


def _check_optimize_args(args) -> list[Any]:
    """Everything about the arguments that can be known before loading a model; returns the passes."""
    import moejax
    from moejax import dump

    passes = moejax.parse_pipeline(args.passes)  # a bad spec fails here, with "did you mean"
    check_model(args.model)
    if args.mesh is not None:
        from moejax.sharding.mesh import parse_mesh_text

        try:
            parse_mesh_text(args.mesh)
        except ValueError as e:
            raise CLIError(f"--mesh: {e}") from None
    if args.dump is not None:
        dump.check_dump_target(args.dump, args.overwrite)
    elif args.overwrite:
        raise CLIError("--overwrite only applies to --dump DIR; give --dump or drop --overwrite")
    if args.report is not None:
        report = Path(args.report)
        if report.is_dir():
            raise CLIError(f"--report {args.report!r} is a folder; give a file name such as report.html")
        if not report.parent.is_dir():
            raise CLIError(f"--report: folder {str(report.parent)!r} does not exist; create it or write elsewhere")
    return passes


def cmd_optimize(args) -> int:
    import jax.numpy as jnp
    import numpy as np

    import moejax
    from moejax import data, models

    passes = _check_optimize_args(args)
    eval_text, calib_text = _read_text(args.eval_text, "--eval-text"), _read_text(args.calib_text, "--calib-text")
    t0 = time.perf_counter()
    with _progress(args) as progress:
        progress.start(f"loading model {args.model!r}")
        model = load_model(args.model, args.mesh)
        cfg = getattr(model, "config", None)
        byte_level = models.is_byte_level(model)
        tokenizer = None if byte_level else _tokenizer(args.model)
        text = None
        if args.eval_bytes > 0 and (byte_level or tokenizer is not None):
            text = (eval_text if eval_text is not None else data.heldout_bytes())[:args.eval_bytes]
        elif args.eval_bytes > 0:
            progress.log("note: quality needs a byte-level model or a tokenizer.json; this checkpoint has neither, "
                         "so quality is skipped and speed is measured on a synthetic prompt")
        b, s = args.batch, args.seq_len
        vocab = cfg.vocab_size if cfg is not None else 256
        ids = _token_ids(text if text is not None else bytes(range(256)), tokenizer)
        example = jnp.asarray(np.resize(ids, (b, s)) % vocab)  # repeats when too short
        calibration = None
        if calib_text is not None:  # windows of the user's text for analysis passes (profile)
            cal = _token_ids(calib_text, tokenizer) % vocab
            calibration = [cal[i:i + b * s].reshape(b, s) for i in range(0, len(cal) - b * s + 1, b * s)][:8]
            if not calibration:
                raise CLIError(f"--calib-text: {len(cal)} tokens, fewer than one batch of {b} x {s}; give more "
                               "text or a smaller --batch/--seq-len")
        # The signatures evaluation calls: forward, prefill into a cache, one-token decode step.
        cache = model.init_cache(b, s + args.decode_tokens)
        decode_example = ((example[:, :1],), {"cache": cache, "cache_index": jnp.int32(s)})
        prefill_example = ((example,), {"cache": cache, "cache_index": jnp.int32(0)})
        progress.log(f"moejax optimize: model={args.model} passes={moejax.pipeline_to_str(passes) or '(none)'}; "
                     f"signatures forward [{b},{s}], prefill [{b},{s}] into a cache, decode [{b},1]")
        opt = moejax.optimize(model, (example,), passes, decode_example=decode_example,
                              extra_examples={"prefill": prefill_example}, calibration=calibration,
                              dump_dir=args.dump, overwrite_dump=args.overwrite, progress=progress.update)
        progress.log(f"pipeline done in {time.perf_counter() - t0:.1f}s; evaluating {len(opt.stages)} stages")
        t1 = time.perf_counter()
        rows = _stage_rows(opt, text, example, args, progress, tokenizer)
        progress.log(f"evaluation done in {time.perf_counter() - t1:.1f}s")
        if args.report:
            from moejax import report

            progress.update("writing the report (measuring expert load)", 0, 1)
            path = report.write_report(args.report, _report_data(opt, rows, args, example))
            progress.log(f"report written to {path}")
    if args.dump:
        print(f"stages dumped to {args.dump} (moejax inspect {args.dump})", file=sys.stderr)
    print(json.dumps(rows, indent=2) if args.json else _fmt_table(rows))
    return 0


def _report_data(opt, rows: list[dict[str, Any]], args, example) -> dict[str, Any]:
    """What :func:`moejax.report.write_report` draws: rows, diffs, structure and expert load per stage."""
    import jax

    from moejax import inspection
    from moejax.passes.profile import measure_routing

    structures = [inspection.structure(stage.program) for stage in opt.stages]
    diffs = [{"from": i - 1, "to": i, "lines": inspection.semantic_diff(structures[i - 1], structures[i])}
             for i in range(1, len(structures))]

    def changes(diff: dict[str, Any], *fields: str) -> bool:
        return any(line.split(": ", 1)[-1].startswith(fields) for line in diff["lines"])

    routing_changed = [0] + [d["to"] for d in diffs if changes(d, "routing", "num experts", "layer")]
    loads = []
    for i in routing_changed:
        try:
            profile = measure_routing(opt.stages[i].program, [example])
        except Exception as e:  # e.g. an offloaded or expert-parallel program the taps cannot reach
            loads.append({"stage": i, "label": opt.stages[i].name, "layers": {}, "note": f"not measured: {e}"})
            continue
        layers = {}
        for name, layer in profile.layers.items():
            for s, counts in enumerate(layer.counts):
                total = float(counts.sum()) or 1.0
                layers[name.replace("*", str(s)) if layer.counts.shape[0] > 1 else name] = [
                    float(c) / total for c in counts]
        loads.append({"stage": i, "label": opt.stages[i].name, "layers": layers})
    load_of = {entry["stage"]: entry["layers"] for entry in loads}
    shown = sorted({0, len(structures) - 1} | {
        d["to"] for d in diffs if changes(d, "num experts", "weight format", "expert bytes", "layer")})
    structure = []
    for i in shown:
        measured = load_of.get(max((j for j in load_of if j <= i), default=0), {})
        layers = []
        for layer in structures[i]:
            n_exp = max(int(layer.get("num_experts", 1)), 1)
            for s in range(layer.get("stacked", 1)):
                name = layer["name"].replace("*", str(s)) if layer.get("stacked", 1) > 1 else layer["name"]
                load = measured.get(name)
                per_expert = layer.get("expert_bytes", 0) / n_exp / max(layer.get("stacked", 1), 1)
                layers.append({"name": name, "experts": [
                    {"bytes": per_expert, "format": layer.get("weight_format", "?"),
                     "load": load[e] if load and e < len(load) else None} for e in range(n_exp)]})
        structure.append({"stage": i, "layers": layers})
    return {
        "title": "moejax optimize",
        "model": args.model,
        "pipeline": args.passes,
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} {jax.default_backend()}",
        "stages": [{"index": i, **row} for i, row in enumerate(rows)],
        "diffs": diffs,
        "structure": structure,
        "loads": loads,
    }


# --------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------
def cmd_generate(args) -> int:
    import jax
    import jax.numpy as jnp

    import moejax
    from moejax import models

    if not args.prompt:
        raise CLIError("--prompt is empty; give some text to continue")
    passes = moejax.parse_pipeline(args.passes) if args.passes else []
    check_model(args.model)
    tokenizer = _tokenizer(args.model)
    ids = tokenizer.encode(args.prompt) if tokenizer else list(args.prompt.encode("utf-8"))
    if not ids:
        raise CLIError("--prompt encodes to no tokens; give some text to continue")
    prompt = jnp.asarray([ids], jnp.int32)
    with _progress(args) as progress:
        progress.start(f"loading model {args.model!r}")
        model = load_model(args.model)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if isinstance(vocab, int) and int(prompt.max()) >= vocab:
            if tokenizer:
                raise CLIError(f"{tokenizer.path} gives token id {int(prompt.max())}, but the model's vocabulary "
                               f"has only {vocab} tokens: the tokenizer does not belong to this model")
            raise CLIError(f"the prompt holds byte {int(prompt.max())}, but the model's vocabulary has only {vocab} "
                           f"tokens (generate feeds UTF-8 bytes as token ids); use a byte-level model such as "
                           f"--model default, or a prompt of bytes below {vocab}")
        max_len = prompt.shape[1] + args.max_new_tokens
        if passes:
            # Generation calls the prefill and decode signatures; the forward one is what analysis
            # passes (profile) run calibration text through, so it gets a calibration-sized shape.
            calibration_shape = jnp.resize(prompt, (1, CALIBRATION_WINDOW))  # varied tokens: two check batches
            cache = model.init_cache(1, max_len)
            model = moejax.optimize(
                model, (calibration_shape,), passes,
                decode_example=((prompt[:, :1],), {"cache": cache, "cache_index": 0}),
                extra_examples={"prefill": ((prompt,), {"cache": cache, "cache_index": 0})},
                progress=progress.update)
        progress.update("compiling prefill and decode", 0, args.max_new_tokens)
        tokens = models.stream(model, prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                               key=jax.random.PRNGKey(args.seed), max_len=max_len)
        first = next(tokens)
    if tokenizer:
        push, flush = tokenizer.stream_decoder(ids)
    else:  # byte-level: token ids are UTF-8 bytes
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        push, flush = (lambda t: decoder.decode(bytes([t % 256]))), (lambda: decoder.decode(b"", final=True))
    sys.stdout.write(args.prompt + push(int(first[0])))
    sys.stdout.flush()
    count, t0, timed = 1, time.perf_counter(), 0
    for token in tokens:  # the text itself shows progress: it is written as it is decoded
        sys.stdout.write(push(int(token[0])))
        sys.stdout.flush()
        count += 1
        if count == 2:  # the first decode step compiled: time the steady state from here
            t0 = time.perf_counter()
        else:
            timed += 1
    sys.stdout.write(flush() + "\n")
    seconds = time.perf_counter() - t0
    if not args.quiet:
        speed = f", decode {timed / seconds:.0f} tok/s" if timed and seconds > 0 else ""
        print(f"[{count} tokens{speed}]", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------
# export-hf
# --------------------------------------------------------------------------
def cmd_export_hf(args) -> int:
    import jax.numpy as jnp
    import numpy as np

    import moejax
    from moejax import data
    from moejax.models.export_hf import ExportError, export_hf

    passes = moejax.parse_pipeline(args.passes) if args.passes else []
    check_model(args.model)
    if args.model in ("default", "fine-grained"):
        raise CLIError("export-hf writes a Hugging Face checkpoint back in its own layout; --model must be a "
                       "Hugging Face checkpoint folder")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"--out {args.out!r} exists and is not an empty folder; choose a new folder")
    with _progress(args) as progress:
        progress.start(f"loading model {args.model!r}")
        model = load_model(args.model)
        tokenizer = _tokenizer(args.model)
        # calibration for analysis passes (profile): held-out text, through the checkpoint's tokenizer if it has one
        text = data.heldout_bytes()[:CALIBRATION_WINDOW * 4].decode("utf-8", "replace")
        ids = tokenizer.encode(text) if tokenizer else list(text.encode("utf-8"))
        vocab = model.config.vocab_size
        example = jnp.asarray(np.resize(np.asarray(ids, np.int32) % vocab, (1, CALIBRATION_WINDOW)))
        opt = moejax.optimize(model, (example,), passes, progress=progress.update)
        progress.update("writing the checkpoint", 0, 1)
        try:
            export_hf(opt, str(out), dtype=args.dtype and jnp.dtype(args.dtype))
        except ExportError as e:
            raise CLIError(str(e)) from None
    print(f"wrote {out} ({', '.join(sorted(os.listdir(out)))}) after {moejax.pipeline_to_str(passes) or 'no passes'}")
    return 0


# --------------------------------------------------------------------------
# passes / inspect
# --------------------------------------------------------------------------
def cmd_tune(args) -> int:
    from moejax import data, models
    from moejax.tune import plot_front, tune

    check_model(args.model)
    if not 0 < args.max_loss < 100:
        raise CLIError(f"--max-loss must be a percentage in (0, 100), got {args.max_loss:g}")
    eval_text, calib_text = _read_text(args.eval_text, "--eval-text"), _read_text(args.calib_text, "--calib-text")
    with _progress(args) as progress:
        progress.start(f"loading model {args.model!r}")
        model = load_model(args.model, None)
        byte_level = models.is_byte_level(model)
        tokenizer = None if byte_level else _tokenizer(args.model)
        if not byte_level and tokenizer is None:
            raise CLIError(f"{args.model!r} has no tokenizer.json and is not byte-level: tune measures quality on "
                           "text; add the checkpoint's tokenizer.json")
        vocab = model.config.vocab_size
        text = eval_text if eval_text is not None else data.heldout_bytes()
        tokens = _token_ids(text, tokenizer) % vocab
        calibration = None
        if calib_text is not None:
            cal = _token_ids(calib_text, tokenizer) % vocab
            n = args.batch * args.seq_len
            calibration = [cal[i:i + n].reshape(args.batch, args.seq_len) for i in range(0, len(cal) - n + 1, n)][:8]
            if not calibration:
                raise CLIError(f"--calib-text holds fewer than {n} tokens (batch x seq-len); give more text")
        result = tune(model, tokens, target=args.target, max_loss=args.max_loss / 100, calibration=calibration,
                      seq_len=args.seq_len, batch=args.batch, progress=progress.log)
    print(result.table())
    print(result.summary())
    if args.plot:
        try:
            plot_front(result, args.plot)
            print(f"wrote {args.plot}")
        except ImportError:
            print("note: no plot written (needs matplotlib: pip install matplotlib)")
    return 0


def cmd_passes(args) -> int:
    import moejax
    from moejax.pass_options import format_pass_help

    blocks = [format_pass_help(cls) for name, cls in moejax.registered_passes().items()
              if args.name is None or name == args.name]
    if not blocks:
        names = ", ".join(moejax.registered_passes())
        raise CLIError(f"no pass {args.name!r}; passes: {names}")
    print("\n\n".join(blocks))
    return 0


def cmd_plan(args) -> int:
    """``moejax plan``: per-device memory of a model on a mesh (see :mod:`moejax.sharding.plan`)."""
    import jax.numpy as jnp

    from moejax.sharding import plan as planner

    try:
        mesh = planner.parse_mesh(args.mesh) if args.mesh else {"expert": args.device_count or 1, "data": 1}
        planner.device(args.device)  # an unknown device fails before any model work
        result = planner.plan_memory(args.model, mesh=mesh, device_name=args.device, batch=args.batch,
                                     context=args.context, pipeline=args.pipeline, dtype=jnp.dtype(args.dtype))
    except planner.PlanError as e:
        raise CLIError(str(e)) from None
    print(json.dumps(result.to_json(), indent=1) if args.json else planner.format_plan(result))
    return 0


def _select_stage(stages: list[dict[str, Any]], key: str, signature: str) -> dict[str, Any]:
    """A stage by index, by pass (full spelling or bare name when unique) or by file stem."""
    for how in (lambda m: str(m["index"]) == key, lambda m: m["pass"] == key, lambda m: m["_stem"] == key,
                lambda m: m["pass"].split("(")[0] == key):
        match = [m for m in stages if how(m)]
        if len(match) == 1:
            return match[0]
        if len(match) > 1:
            raise CLIError(f"stage {key!r} is ambiguous in {signature}: "
                           f"{', '.join(str(m['index']) for m in match)}; give its index")
    listing = ", ".join(f"{m['index']} ({m['pass']})" for m in stages)
    raise CLIError(f"no stage {key!r} in the {signature} signature; stages: {listing}")


def cmd_inspect(args) -> int:
    from moejax import dump, inspection

    contents = dump.read_dump(args.dir)
    if not contents.signatures:
        raise CLIError(f"{args.dir!r} holds no dumped stages yet; the run that started it wrote nothing")
    if not contents.complete:
        print(f"moejax: note: {args.dir} is an INCOMPLETE dump (no manifest: the run that wrote it was interrupted "
              f"or failed); only the stages written before that are shown", file=sys.stderr)
    signature = args.signature
    if signature not in contents.signatures:
        raise CLIError(f"no signature {signature!r} in {args.dir}; signatures: {', '.join(contents.signatures)}")
    stages = contents.signatures[signature]
    if args.stage is not None:
        meta = _select_stage(stages, args.stage, signature)
        print(contents.stage_text(meta))
        return 0
    if args.diff:
        a, b = (_select_stage(stages, key, signature) for key in args.diff)
        title = f"{signature}: stage {a['index']} ({a['pass']}) -> stage {b['index']} ({b['pass']})"
        if args.text:
            import difflib

            sys.stdout.writelines(difflib.unified_diff(
                contents.stage_text(a).splitlines(True),
                contents.stage_text(b).splitlines(True),
                fromfile=f"{a['index']}_{a['pass']}", tofile=f"{b['index']}_{b['pass']}"))
            return 0
        lines = inspection.semantic_diff(a["structure"], b["structure"])
        print(title)
        print("\n".join(f"  {line}" for line in lines) if lines else "  no structural change (ops, routing, "
              "expert counts, weight formats and shapes are the same; --text shows the program text diff)")
        return 0
    _print_stage_table(contents, signature)
    return 0


def _print_stage_table(contents, signature: str) -> None:
    stages = contents.signatures[signature]
    state = "complete" if contents.complete else "INCOMPLETE"
    print(f"{contents.directory}: {state} dump; signature {signature} {stages[0].get('inputs', '')}")
    print(f"{'#':>2}  {'pass':34} {'expert MB':>9} {'total MB':>9} {'GFLOP/tok':>10} {'max dev':>8}  ops")
    for meta in stages:
        st = meta["stats"]
        dev = "-" if meta["max_deviation"] is None else f"{meta['max_deviation']:.1e}"
        ops = " ".join(f"{k[4:]}:{v}" for k, v in st["op_counts"].items())
        print(f"{meta['index']:>2}  {meta['pass']:34} {st['expert_bytes'] / 1e6:9.3f} {st['total_bytes'] / 1e6:9.3f} "
              f"{st['active_expert_flops_per_token'] / 1e9:10.5f} {dev:>8}  {ops}")
    others = [name for name in contents.signatures if name != signature]
    if others:
        print(f"other traced signatures (same pipeline): {', '.join(others)}; show one with --signature NAME")


# --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every value checked as it is parsed)."""
    positive = _int_in(1, float("inf"), "an integer >= 1")
    p = _Parser(prog="moejax", description="Compiler passes for Mixture-of-Experts inference in JAX.")
    p.add_argument("--version", action="version", version=f"moejax {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    o = sub.add_parser("optimize", help="run a pass pipeline on a model and measure every stage",
                       description="Trace a model (forward, prefill and decode signatures), run a pass pipeline on "
                                   "it, and measure every stage: bytes, FLOPs, held-out bits per byte, speed.")
    o.add_argument("--model", default="default",
                   help="'default' (the bundled 8-expert model), 'fine-grained' (the bundled 32-expert "
                        "DeepSeek-style model) or a checkpoint folder (config.json + *.safetensors)")
    o.add_argument("--passes", default=DEFAULT_PIPELINE, help=f"pipeline string (default: {DEFAULT_PIPELINE!r}); "
                   "`moejax passes` lists the passes and their options")
    o.add_argument("--eval-bytes", type=_eval_bytes, default=16384,
                   help="held-out bytes scored for bits per byte (0 skips quality; default 16384)")
    o.add_argument("--eval-text", default=None, metavar="FILE",
                   help="measure every stage on this text instead of the bundled held-out text (bits per byte; "
                        "checkpoints with a tokenizer.json also get per-token cross-entropy)")
    o.add_argument("--calib-text", default=None, metavar="FILE",
                   help="calibration text for analysis passes (profile: routing statistics)")
    o.add_argument("--batch", type=positive, default=4, help="sequences per batch for tracing and timing (default 4)")
    o.add_argument("--seq-len", type=positive, default=256, help="tokens per sequence for prefill (default 256)")
    o.add_argument("--decode-tokens", type=positive, default=32, help="tokens decoded when timing decode (default 32)")
    o.add_argument("--mesh", default=None, metavar="AXES",
                   help="load the model straight onto a device mesh, e.g. expert=8 or expert=4,model=2 (experts "
                        "over 'expert', attention/dense matrices over 'model'; each process reads only its slices). "
                        "On CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N first")
    o.add_argument("--dump", default=None, metavar="DIR",
                   help="write every stage's program (text, structure, stats) to DIR, which must be empty or new")
    o.add_argument("--overwrite", action="store_true", help="replace an earlier moejax dump in --dump DIR")
    o.add_argument("--report", default=None, metavar="FILE.html",
                   help="write a self-contained HTML report (tables, diffs, expert-load heatmaps, structure)")
    o.add_argument("--json", action="store_true", help="print the table as JSON")
    o.add_argument("--quiet", action="store_true", help="no progress display on stderr")
    o.set_defaults(func=cmd_optimize)

    g = sub.add_parser("generate", help="continue a prompt with KV-cache decoding",
                       description="Continue a prompt with the bundled model or a checkpoint (encoded with its "
                                   "tokenizer.json, or as UTF-8 bytes for byte-level models), optionally optimized "
                                   "first; text is printed as it comes.")
    g.add_argument("--model", default="default",
                   help="'default' or 'fine-grained' (the bundled models) or a checkpoint folder")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=_int_in(1, MAX_NEW_TOKENS, f"an integer in [1, {MAX_NEW_TOKENS:,}]"),
                   default=64, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=_float_in(0.0, float("inf"), False, "a number >= 0 (0 is greedy)"), default=0.0,
                   help="sampling temperature; 0 (default) for greedy decoding")
    g.add_argument("--top-p", type=_float_in(0.0, 1.0, True, "a number in (0, 1]"), default=1.0,
                   help="nucleus sampling mass in (0, 1] (with --temperature > 0; default 1)")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    g.add_argument("--passes", default=None, help="optimize the model with this pipeline before generating "
                   f"(e.g. {DEFAULT_PIPELINE!r})")
    g.add_argument("--quiet", action="store_true", help="no progress or speed lines on stderr")
    g.set_defaults(func=cmd_generate)

    x = sub.add_parser("export-hf", help="optimize a checkpoint and write it back as a Hugging Face checkpoint",
                       description="Load a Hugging Face checkpoint folder, run a pipeline on it (prune, merge, ...) "
                                   "and write the result in the checkpoint's own layout (config.json with the new "
                                   "expert count, model.safetensors), loadable by transformers.")
    x.add_argument("--model", required=True, help="a Hugging Face checkpoint folder (config.json + *.safetensors)")
    x.add_argument("--passes", default="", help="pipeline to apply first (e.g. 'profile,prune(num_experts=6)'; "
                   "default: none)")
    x.add_argument("--out", required=True, metavar="DIR", help="output folder (must be new or empty)")
    x.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written float tensors (default: as loaded)")
    x.add_argument("--quiet", action="store_true", help="no progress display on stderr")
    x.set_defaults(func=cmd_export_hf)

    t = sub.add_parser("tune", help="search pass settings for the smallest model within a quality budget",
                       description="Search pruning, quantization (uniform and mixed) and gating settings with "
                                   "measured evaluations: a cheap proxy (a few windows) for every candidate, the "
                                   "full text for the Pareto front; print the front and the cheapest pipeline "
                                   "within --max-loss, and plot the front.")
    t.add_argument("--model", default="default", help="'default', 'fine-grained' or a checkpoint folder")
    t.add_argument("--max-loss", type=float, default=1.0,
                   help="largest bits-per-byte increase over the float model, in percent (default 1)")
    t.add_argument("--target", choices=("expert-bytes", "active-flops"), default="expert-bytes",
                   help="what to minimise (default expert-bytes)")
    t.add_argument("--eval-text", default=None, help="text to measure quality on (default: the held-out text)")
    t.add_argument("--calib-text", default=None, help="text to profile routing on (default: the training text)")
    t.add_argument("--batch", type=positive, default=8)
    t.add_argument("--seq-len", type=positive, default=256)
    t.add_argument("--plot", default="tune_pareto.png", help="PNG of the Pareto front ('' for none)")
    t.add_argument("--quiet", action="store_true", help="no progress display on stderr")
    t.set_defaults(func=cmd_tune)

    ps = sub.add_parser("passes", help="list the passes with every option's type, default and range")
    ps.add_argument("name", nargs="?", default=None, help="show only this pass")
    ps.set_defaults(func=cmd_passes)

    pl = sub.add_parser("plan", help="per-device memory of a model on a mesh, and the smallest mesh that fits",
                        description="Plan a model's memory per device: weights by format (after the pipeline, "
                                    "experts split over the expert axis), KV cache, activations and all-to-all "
                                    "buffers of a prefill of batch x context tokens; whether it fits the device "
                                    "and the smallest expert axis that does. Shapes only: nothing is allocated.")
    pl.add_argument("--model", required=True, help="a preset name (e.g. deepseek-v3) or a checkpoint folder")
    where = pl.add_mutually_exclusive_group()
    where.add_argument("--mesh", default=None, help="mesh axes, e.g. expert=64 or expert=32,data=2")
    where.add_argument("--device-count", type=positive, default=None, help="devices, all on the expert axis")
    pl.add_argument("--device", default="h200", help="h100, h200, b200, a100-80gb, a100-40gb, tpu-v4, tpu-v5e, "
                    "tpu-v5p, tpu-v6e (default h200)")
    pl.add_argument("--batch", type=positive, default=1, help="sequences (default 1)")
    pl.add_argument("--context", type=positive, default=4096, help="tokens per sequence (default 4096)")
    pl.add_argument("--pipeline", default="", help="pass pipeline, e.g. 'quantize(bits=4),ep' (ep is placed "
                    "on the mesh; added first when missing)")
    pl.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                    help="weight and activation dtype (default bfloat16)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=cmd_plan)

    i = sub.add_parser("inspect", help="show the stages of a pipeline dumped with --dump",
                       description="Show a dump written by `moejax optimize --dump DIR`: the stage table, one "
                                   "stage's program, or what changed between two stages.")
    i.add_argument("dir")
    i.add_argument("--signature", default="forward",
                   help="which traced program: forward (default), prefill or decode")
    i.add_argument("--stage", default=None, help="print one stage's program: its index, pass name or file stem")
    i.add_argument("--diff", nargs=2, metavar=("A", "B"), default=None,
                   help="what changed from stage A to stage B (index or pass name), per layer")
    i.add_argument("--text", action="store_true", help="with --diff: the line diff of the program text instead")
    i.set_defaults(func=cmd_inspect)
    return p


def _check_combinations(args) -> None:
    """Options that are valid alone but not together."""
    if getattr(args, "text", False) and not getattr(args, "diff", None):
        raise CLIError("--text only applies to --diff A B; add --diff or drop --text")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 user error, 130 interrupted, 70 bug)."""
    from moejax.dump import DumpError
    from moejax.models import CheckpointError
    from moejax.numerics import NonFiniteError
    from moejax.pipeline import PassError
    from moejax.program import InputSignatureError

    warnings.showwarning = _show_warning
    try:
        args = build_parser().parse_args(argv)
        _check_combinations(args)
        return args.func(args)
    except (CLIError, PassError, InputSignatureError, NonFiniteError, DumpError, CheckpointError) as e:
        print(f"moejax: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("moejax: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `moejax inspect DIR | head`: the reader has all it wanted
        _silence_stdout()
        return 0
    except Exception as e:
        import traceback

        traceback.print_exc()
        print(f"moejax: internal error: {type(e).__name__}: {_one_line(e)}. This is a bug in moejax; please report "
              f"it with the traceback above", file=sys.stderr)
        return EXIT_BUG


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings as one line each, without the source location a user cannot act on."""
    print(f"moejax: warning: {_one_line(message)}", file=file or sys.stderr, flush=True)


def _one_line(e: BaseException | Warning | str) -> str:
    return " ".join(str(e).split())


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so Python's exit-time flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file behind stdout: nothing to flush at exit
        pass


def console_main() -> None:
    """The ``moejax`` script: :func:`main`, with Ctrl-C ending the process at once.

    The handler exits from the signal itself rather than through a KeyboardInterrupt,
    which a destructor or a library's broad ``except`` may swallow, and skips interpreter
    teardown, which can crash while XLA threads are compiling (SIGSEGV observed). A dump
    left behind has no manifest, so ``moejax inspect`` reports it as incomplete.
    """
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when the shell ignores SIGINT
        signal.signal(signal.SIGINT, _exit_on_interrupt)
    sys.exit(main())


def _exit_on_interrupt(signum: int, frame: Any) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\x1b[?25h\n")  # a live progress display hides the cursor: show it again
    sys.stderr.write("moejax: interrupted\n")
    sys.stderr.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":  # pragma: no cover
    console_main()
