"""Train a bundled model on the Python standard library's source: one command per model.

    python scripts/train_default.py                         # the default model (models/default/)
    python scripts/train_default.py --preset fine-grained   # the fine-grained model (models/fine_grained/)
    python scripts/train_default.py --preset fine-grained --report   # full held-out evaluation

Each preset is an architecture, a folder and the training stages that made the shipped
checkpoint (``PRESETS``): the default model's two recorded stages (a time limit cut the
first one short on a heavily shared machine; ``--stop-at`` replays that cut), the
fine-grained model's single stage. Each folder's TRAINING.md gives the commands, wall
times and losses. ``--report`` writes the full held-out evaluation (``eval_report.json``).

A byte-level MoE decoder (moejax.models.MoEDecoder) is trained with optax AdamW
(linear warm-up + cosine decay) on next-byte cross-entropy plus a load-balancing loss
(``E * sum_e f_e * P_e`` per layer) and a small router z-loss; a preset with a
selection-bias router (DeepSeek-V3's) also balances by moving that bias towards
under-loaded experts every step (auxiliary-loss-free balancing).

Training uses its own forward pass built from the model's submodules: the same
attention, norms, router (the model's own ``Routing``), shared and routed expert
weights, but the routed experts run as a capacity-style batched matmul (tokens
gathered into ``[E, C, d]``), which XLA:CPU runs several times faster than the
dialect's reference or ``ragged_dot`` paths. With ``capacity_factor = E / k`` no slot
can overflow, so the held-out loss printed here is the exact loss of the dropless
inference model (checked at the end against ``MoEDecoder.__call__``).

Writes OUT/{model.safetensors, config.json, train_log.txt} (the default model's folder
also gets heldout.txt and LICENSE-PSF.txt, which both models are evaluated on).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax import data, dialect
from moejax.models.decoder import MoEConfig, MoEDecoder
from moejax.models.default_model import (DEFAULT_MODEL_DIR, FINE_GRAINED_MODEL_DIR, load_checkpoint,
                                         save_checkpoint)

PSF_NOTE = """\
heldout.txt (the held-out evaluation text of moejax's default model) is a
concatenation of source files of the CPython {version} standard library, joined by
the byte 0x1C, selected by moejax.data (a hash of each file's relative path).

That text is Copyright (c) 2001-2024 Python Software Foundation; All Rights
Reserved, and is distributed under the Python Software Foundation License
Version 2 (PSF-2.0), https://docs.python.org/3/license.html . The model weights in
model.safetensors were trained by moejax on other files of the same standard
library (see TRAINING.md).
"""


def default_config() -> MoEConfig:
    """The shipped model's architecture (about 3.4 M parameters, 13.6 MB in float32)."""
    return MoEConfig(vocab_size=data.VOCAB_SIZE, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                     d_ff_expert=256, n_experts=8, routing=dialect.Routing(k=2), rope_theta=10000.0,
                     norm_eps=1e-5, scan_layers=False, family="mixtral")


def fine_grained_config() -> MoEConfig:
    """The fine-grained bundled model: DeepSeek-V3-style routing over 32 small experts.

    Same trunk as the default model (d_model 128, 4 layers, GQA 4/2 heads); each MoE block
    has 32 SwiGLU experts of width 64, top-4, plus one always-on shared expert of width
    128. The router is DeepSeek-V3's: sigmoid scores, a float32 correction bias used only
    for selection, the selected scores renormalised and scaled by 2.5.
    """
    return MoEConfig(vocab_size=data.VOCAB_SIZE, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
                     d_ff_expert=64, n_experts=32, n_shared_experts=1, d_ff_shared=128, selection_bias=True,
                     routing=dialect.Routing(k=4, score="sigmoid", norm_topk=True, scale=2.5),
                     rope_theta=10000.0, norm_eps=1e-5, scan_layers=False, family="deepseek_v3")


@dataclasses.dataclass(frozen=True)
class Preset:
    """One bundled model: its architecture, folder, and the training stages that made it."""

    config: Callable[[], MoEConfig]
    out: Path
    # Each stage overrides the argparse defaults; a later stage starts from the previous weights.
    stages: tuple[dict[str, Any], ...]


PRESETS = {
    # The default model's two recorded stages (TRAINING.md): stage 1 was cut at step 292 of a
    # 700-step cosine by a time limit on a shared machine; --stop-at replays that cut exactly.
    "default": Preset(default_config, DEFAULT_MODEL_DIR, (
        dict(steps=700, warmup=50, stop_at=292, seed=0),
        dict(steps=300, warmup=20, lr=2e-3, seed=1, log="train_log_stage2.txt"))),
    # DeepSeek-V3's auxiliary-loss-free balancing: a per-expert selection bias nudged towards
    # under-loaded experts every step, plus a small balance loss.
    "fine-grained": Preset(fine_grained_config, FINE_GRAINED_MODEL_DIR, (
        dict(steps=2400, warmup=60, lr=3e-3, aux_coef=1e-2, bias_rate=1e-2, capacity_factor=2.0, seed=0),)),
}


# ---------------------------------------------------------------------------
# Training forward pass
# ---------------------------------------------------------------------------
def capacity_moe(x: jax.Array, top_w: jax.Array, ids: jax.Array, n_experts: int, weights,
                 capacity_factor: float, activation: str) -> tuple[jax.Array, jax.Array]:
    """Top-k MoE on ``x [T,d]`` with experts as a batched matmul over ``[E, C, d]``.

    ``top_w, ids [T,k]`` come from ``dialect.route_reference`` (the model's own routing).
    Slots are assigned first choices first; slots beyond capacity are dropped.
    Returns ``(y [T,d], dropped fraction)``.
    """
    t, d = x.shape
    e, k = n_experts, ids.shape[1]
    cap = int(math.ceil(capacity_factor * t * k / e))
    cap = min(cap, t)
    flat_ids = ids.T.reshape(-1)  # choice-major: every token's first choice gets priority
    onehot = jax.nn.one_hot(flat_ids, e, dtype=jnp.int32)
    pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
    keep = pos < cap
    dest = jnp.where(keep, flat_ids * cap + pos, e * cap)  # overflow row e*cap is discarded
    token = jnp.tile(jnp.arange(t), k)
    table = jnp.full((e * cap + 1,), t, jnp.int32).at[dest].set(token)[: e * cap]
    xe = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[table].reshape(e, cap, d)
    act = dialect.activation_fn(activation)
    if activation in dialect.GATED_ACTIVATIONS:
        h = act(jnp.einsum("ecd,edf->ecf", xe, weights[0]), jnp.einsum("ecd,edf->ecf", xe, weights[1]))
    else:
        h = act(jnp.einsum("ecd,edf->ecf", xe, weights[0]))
    ye = jnp.einsum("ecf,efd->ecd", h, weights[-1]).reshape(e * cap, d)
    ye = jnp.concatenate([ye, jnp.zeros((1, d), ye.dtype)])
    w_slot = jnp.where(keep, top_w.T.reshape(-1), 0.0)
    y = (ye[dest] * w_slot[:, None]).reshape(k, t, d).sum(0)
    return y, 1.0 - jnp.mean(keep.astype(jnp.float32))


def train_forward(model: MoEDecoder, tokens: jax.Array, capacity_factor: float, valid: jax.Array | None = None):
    """Logits plus per-layer router statistics, using the model's own submodules.

    ``valid [B,S]`` (optional) restricts the expert-load fractions to those tokens.
    """
    cfg = model.config
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    x = model.embed_tokens(tokens)
    aux, zloss, dropped, loads = [], [], [], []
    for layer in model.layers:
        h, _ = layer.self_attn(layer.input_layernorm(x), positions)
        x = x + h
        hn = layer.post_attention_layernorm(x)
        moe = layer.mlp
        flat = hn.reshape(-1, cfg.d_model)
        logits = moe.router_logits(hn)  # [T, E]
        bias = () if moe.selection_bias is None else (moe.selection_bias[...],)
        top_w, ids = dialect.route_reference(flat, moe.gate.kernel[...], *bias, routing=cfg.routing)
        y, drop = capacity_moe(flat, top_w, ids, cfg.n_experts, moe.experts.weights(), capacity_factor,
                               cfg.activation)
        if moe.shared is not None:
            y = y + moe.shared(flat)
        x = x + y.reshape(b, s, cfg.d_model)
        # Balance loss: Switch's E * sum_e f_e * P_e, with P_e the mean normalised score (softmax
        # probabilities, or sigmoid scores over their sum as in DeepSeek-V3's sequence-wise loss).
        scores = jax.nn.softmax(logits, axis=-1) if cfg.routing.score == "softmax" else jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
        per_token = jax.nn.one_hot(ids, cfg.n_experts).sum(1)  # [T, E]
        if valid is None:
            frac = jnp.mean(per_token, axis=0) / cfg.routing.k  # f_e
        else:
            v = valid.reshape(-1, 1).astype(per_token.dtype)
            frac = jnp.sum(per_token * v, axis=0) / (jnp.maximum(jnp.sum(v), 1.0) * cfg.routing.k)
        aux.append(cfg.n_experts * jnp.sum(frac * jnp.mean(probs, axis=0)))
        zloss.append(jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2))
        dropped.append(drop)
        loads.append(frac)
    x = model.norm(x)
    out = model.lm_head(x).astype(jnp.float32)
    return out, jnp.stack(aux), jnp.stack(zloss), jnp.stack(dropped), jnp.stack(loads)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-byte negative log-likelihood in nats."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


# ---------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------
# Hyper-parameters a preset stage may set; None on the command line means "the stage's value,
# else this default".
STAGE_DEFAULTS: dict[str, Any] = dict(
    steps=1200, batch=16, seq_len=256, lr=3e-3, warmup=60, weight_decay=0.05, aux_coef=0.02, z_coef=1e-3,
    capacity_factor=1.5, bias_rate=0.0, eval_every=100, save_every=200, seed=0, stop_at=None, time_limit=None,
    log=None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default",
                    help="which bundled model: its architecture, folder and training stages")
    ap.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: the preset's)")
    ap.add_argument("--steps", type=int, help="length of the cosine schedule")
    ap.add_argument("--stop-at", type=int, help="stop after this step (the schedule still spans --steps)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--aux-coef", type=float, help="load-balancing loss coefficient")
    ap.add_argument("--z-coef", type=float, help="router z-loss coefficient")
    ap.add_argument("--bias-rate", type=float,
                    help="auxiliary-loss-free balancing: per-step update of the selection bias (0: off)")
    ap.add_argument("--capacity-factor", type=float)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--save-every", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--time-limit", type=float, help="stop (and save) after this many seconds even if steps remain")
    ap.add_argument("--log", type=Path, default=None, help="progress log (default: OUT/train_log.txt)")
    ap.add_argument("--stage", type=int, default=None, help="run only this stage of the preset (1-based)")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from this checkpoint folder's weights (a continuation stage; fresh optimizer)")
    ap.add_argument("--report", action="store_true",
                    help="only evaluate the checkpoint in --out on the full held-out text; write eval_report.json")
    ap.add_argument("--report-bytes", type=int, default=None, help="with --report: only this much held-out text")
    ap.add_argument("--bench", type=int, default=0, help="only time this many steps, write nothing")
    args = ap.parse_args(argv)

    preset = PRESETS[args.preset]
    out: Path = args.out or preset.out
    if args.report:
        return report(out, args.seq_len or STAGE_DEFAULTS["seq_len"], max_bytes=args.report_bytes)
    stages = list(enumerate(preset.stages, 1))
    if args.stage is not None:
        stages = [stages[args.stage - 1]]
    given = {k: v for k, v in vars(args).items() if k in STAGE_DEFAULTS and v is not None}
    for number, stage in stages:
        hp = argparse.Namespace(**{**STAGE_DEFAULTS, **stage, **given})
        init = args.init if number == stages[0][0] else out
        train(preset.config(), out, hp, init=init, bench=args.bench)
        if args.bench:
            break
    return 0


def train(cfg: MoEConfig, out: Path, hp: argparse.Namespace, *, init: Path | None, bench: int = 0) -> None:
    """One training stage: fresh AdamW on ``cfg`` (or ``init``'s weights), checkpoint to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / hp.log if isinstance(hp.log, str) else (hp.log or out / "train_log.txt")
    log_file = None if bench else open(log_path, "w")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if log_file:
            log_file.write(line + "\n")
            log_file.flush()

    t_start = time.time()
    log(f"command: python {' '.join(sys.argv)}")
    log(f"stage hyper-parameters: {json.dumps({k: str(v) for k, v in vars(hp).items()})}")
    train_text = data.train_bytes()
    heldout = data.heldout_files_bytes()
    log(f"train text {len(train_text):,} bytes, held-out text {len(heldout):,} bytes")
    if not bench and out == DEFAULT_MODEL_DIR:
        (out / "heldout.txt").write_bytes(heldout)
        (out / "LICENSE-PSF.txt").write_text(PSF_NOTE.format(version=sys.version.split()[0]))

    model = MoEDecoder(cfg, rngs=nnx.Rngs(hp.seed))
    if init is not None:
        model = load_checkpoint(init)
        if model.config != cfg:
            raise SystemExit(f"--init {init}: its config differs from the preset's; cannot continue")
        log(f"initialised from {init}")
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    log(f"config: {json.dumps({k: str(v) for k, v in vars(cfg).items()})}")
    log(f"parameters: {n_params:,} ({n_params * 4 / 1e6:.2f} MB float32)")

    schedule = optax.warmup_cosine_decay_schedule(0.0, hp.lr, hp.warmup, hp.steps, end_value=hp.lr * 0.05)
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)  # no decay on norms
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=hp.weight_decay, mask=decay_mask))
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)

    def loss_fn(p, batch, cf):
        m = nnx.merge(graphdef, p)
        logits, aux, z, drop, loads = train_forward(m, batch[:, :-1], cf)
        ce = cross_entropy(logits, batch[:, 1:])
        total = ce + hp.aux_coef * jnp.mean(aux) + hp.z_coef * jnp.mean(z)
        return total, (ce, jnp.mean(aux), jnp.mean(drop), loads)

    def balance_biases(p, loads):
        """Auxiliary-loss-free balancing (DeepSeek-V3): raise the selection bias of experts
        loaded below the mean, lower it above. The bias gets no gradient (it only selects)."""
        if not hp.bias_rate or not cfg.selection_bias:
            return p
        moe_layers = [i for i in range(cfg.n_layers) if not cfg.is_dense(i)]
        for row, i in enumerate(moe_layers):
            bias = p["layers"][i]["mlp"]["selection_bias"]
            bias[...] = bias[...] + hp.bias_rate * jnp.sign(jnp.mean(loads[row]) - loads[row])
        return p

    @jax.jit
    def step(p, o, batch):
        (_, (ce, aux, drop, loads)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch,
                                                                                      hp.capacity_factor)
        updates, o = tx.update(grads, o, p)
        return balance_biases(optax.apply_updates(p, updates), loads), o, ce, aux, drop

    exact_cf = cfg.n_experts / cfg.routing.k  # no slot can overflow: exact dropless forward

    @jax.jit
    def eval_step(p, batch):
        m = nnx.merge(graphdef, p)
        logits, _, _, _, loads = train_forward(m, batch[:, :-1], exact_cf)
        return cross_entropy(logits, batch[:, 1:]), loads

    ho_arr = data.encode(heldout)
    n_eval = min(64, len(ho_arr) // (hp.seq_len + 1))
    stride = len(ho_arr) // n_eval
    ho_batches = np.stack([ho_arr[i * stride: i * stride + hp.seq_len + 1] for i in range(n_eval)])

    def evaluate_heldout(p):
        ces, loads = [], []
        for i in range(0, n_eval, 16):
            ce, ld = eval_step(p, jnp.asarray(ho_batches[i:i + 16]))
            ces.append(float(ce))
            loads.append(np.asarray(ld))
        return float(np.mean(ces)), np.mean(loads, axis=0)

    it = data.batches(train_text, hp.batch, hp.seq_len, seed=hp.seed)
    n_steps = bench or min(hp.steps, hp.stop_at or hp.steps)
    t_loop = time.time()
    ema = None
    last_step = 0
    for i in range(1, n_steps + 1):
        params, opt_state, ce, aux, drop = step(params, opt_state, jnp.asarray(next(it)))
        last_step = i
        if i == 1:
            ce.block_until_ready()
            log(f"compiled + first step in {time.time() - t_loop:.1f}s")
            t_loop = time.time()
        ce_f = float(ce)
        ema = ce_f if ema is None else 0.95 * ema + 0.05 * ce_f
        if i % 10 == 0 or bench:
            el = time.time() - t_loop
            log(f"step {i}/{hp.steps} train_ce {ce_f:.4f} (ema {ema:.4f}, {ema / math.log(2):.3f} bpb) "
                f"aux {float(aux):.3f} dropped {float(drop) * 100:.2f}% lr {float(schedule(i)):.2e} "
                f"{el / max(i - 1, 1):.2f}s/step")
        if bench:
            continue
        if i % hp.eval_every == 0 or i == n_steps:
            ho_ce, loads = evaluate_heldout(params)
            log(f"  heldout_ce {ho_ce:.4f} ({ho_ce / math.log(2):.3f} bpb) min expert load per layer "
                f"{[round(float(l.min()) * 100, 2) for l in loads]}%")
        if i % hp.save_every == 0:
            save_checkpoint(nnx.merge(graphdef, params), out)
            log(f"  saved checkpoint at step {i}")
        if hp.time_limit and time.time() - t_start > hp.time_limit:
            log(f"time limit {hp.time_limit}s reached at step {i}; stopping")
            break
    if bench:
        return

    model = nnx.merge(graphdef, params)
    save_checkpoint(model, out)
    ho_ce, loads = evaluate_heldout(params)
    # The training forward must equal the dialect model's own forward (dropless).
    probe = jnp.asarray(ho_batches[:2, :-1])
    ref = model(probe)
    mine = train_forward(model, probe, exact_cf)[0]
    gap = float(jnp.max(jnp.abs(ref - mine)))
    wall = time.time() - t_start
    log(f"done: {last_step} steps, wall time {wall:.0f}s; final train_ce(ema) {ema:.4f} "
        f"({ema / math.log(2):.3f} bpb); heldout_ce {ho_ce:.4f} ({ho_ce / math.log(2):.3f} bpb, "
        f"{n_eval} windows of {hp.seq_len}); max |logit diff| train-forward vs model {gap:.2e}")
    log("expert load per layer (% of slots): " + "; ".join(
        f"L{j}: " + " ".join(f"{float(v) * 100:.1f}" for v in l) for j, l in enumerate(loads)))


def report(out: Path, seq_len: int, batch: int = 16, max_bytes: int | None = None) -> int:
    """Full held-out figures for the checkpoint in ``out``: bpb, expert load, n-gram baselines.

    Scores exactly the windows of :func:`moejax.evaluation.bits_per_byte`, with the
    capacity forward at capacity factor 2; a batch in which any slot overflowed is
    recomputed dropless (capacity factor E/k), so the figures are exact.
    """
    from moejax import evaluation

    t0 = time.time()
    model = load_checkpoint(out)
    cfg = model.config
    heldout = data.heldout_bytes(max_bytes)
    inputs, targets, mask = evaluation._windows(heldout, seq_len)
    graphdef, params = nnx.split(model, nnx.Param)
    e, k = cfg.n_experts, cfg.routing.k

    def scores(p, x, y, m, cf):
        logits, _, _, drop, loads = train_forward(nnx.merge(graphdef, p), x, cf, valid=m)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(m, nll, 0.0)), jnp.max(drop), loads * jnp.sum(m)

    fast = jax.jit(lambda p, x, y, m: scores(p, x, y, m, 2.0))
    exact = jax.jit(lambda p, x, y, m: scores(p, x, y, m, e / k))
    total, redone, slots = 0.0, 0, 0.0
    for i in range(0, len(inputs), batch):
        x, y, m = (np.zeros((batch, seq_len), a.dtype) for a in (inputs, targets, mask))
        n = min(batch, len(inputs) - i)
        x[:n], y[:n], m[:n] = inputs[i:i + n], targets[i:i + n], mask[i:i + n]
        nll, drop, counts = fast(params, x, y, m)
        if float(drop) > 0:
            nll, _, counts = exact(params, x, y, m)
            redone += 1
        total += float(nll)
        if i == 0:
            first_batch_bpb = float(nll) / math.log(2) / int(m.sum())
        slots = slots + np.asarray(counts, np.float64)
    bpb = total / math.log(2) / int(mask.sum())
    first_bytes = batch * seq_len + 1
    check = evaluation.bits_per_byte(model, heldout[:first_bytes], seq_len=seq_len, batch=8)
    load = slots / slots.sum(axis=1, keepdims=True)
    check_load = evaluation.expert_load(model, heldout[:4097], seq_len=seq_len, batch=8)
    train = data.train_bytes(max_bytes=None if max_bytes is None else 20 * max_bytes)
    ngram = {o: evaluation.ngram_bits_per_byte(train, heldout, order=o) for o in (1, 2, 3)}
    zlib_bpb = 8 * len(zlib.compress(heldout, 9)) / len(heldout)
    result = {
        "heldout_bytes": len(heldout), "scored_bytes": int(mask.sum()), "seq_len": seq_len,
        "bits_per_byte": bpb, "batches_recomputed_dropless": redone,
        # Consistency: the first batch scored here vs moejax.evaluation on the same bytes.
        "check_first_batch_bits_per_byte": {"this_script": first_batch_bpb, "moejax.evaluation": check},
        "check_first_4097_bytes_min_expert_load_percent": round(float(check_load.min()) * 100, 2),
        "ngram_kneser_ney_bits_per_byte": {f"order_{o}": v for o, v in ngram.items()},
        "zlib_level9_bits_per_byte": zlib_bpb,
        "expert_load_percent": [[round(float(v) * 100, 2) for v in row] for row in load],
        "min_expert_load_percent_per_layer": [round(float(row.min()) * 100, 2) for row in load],
        "parameters": int(sum(np.prod(v.shape) for v in jax.tree_util.tree_leaves(params))),
        "checkpoint_bytes": (out / "model.safetensors").stat().st_size,
        "report_seconds": round(time.time() - t0, 1),
    }
    if max_bytes is None:  # only the full evaluation is recorded next to the checkpoint
        (out / "eval_report.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
