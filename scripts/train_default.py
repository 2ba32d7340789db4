"""Train the bundled default model (models/default/) on the Python standard library's source.

The shipped checkpoint was trained in two stages (a time limit cut the first one short
on a heavily shared machine); models/default/TRAINING.md gives both commands, their
wall times and losses. ``--report`` writes the full held-out evaluation.

A Mixtral-style byte-level MoE decoder (moejax.models.MoEDecoder) is trained with
optax AdamW (linear warm-up + cosine decay) on next-byte cross-entropy plus the
Switch/Mixtral load-balancing loss (``E * sum_e f_e * P_e`` per layer) and a small
router z-loss.

Training uses its own forward pass built from the model's submodules: the same
attention, norms, router and expert weights, but the routed experts run as a
capacity-style batched matmul (tokens gathered into ``[E, C, d]``), which XLA:CPU
runs several times faster than the dialect's reference or ``ragged_dot`` paths.
With ``capacity_factor = E / k`` no slot can overflow, so the held-out loss printed
here is the exact loss of the dropless inference model (checked at the end against
``MoEDecoder.__call__``).

Writes models/default/{model.safetensors, config.json, heldout.txt, LICENSE-PSF.txt}
and a progress log (``--log``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax import data, dialect
from moejax.models.decoder import MoEConfig, MoEDecoder
from moejax.models.default_model import DEFAULT_MODEL_DIR, load_checkpoint, save_checkpoint

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


# ---------------------------------------------------------------------------
# Training forward pass
# ---------------------------------------------------------------------------
def capacity_moe(x: jax.Array, logits: jax.Array, weights, k: int, capacity_factor: float,
                 activation: str) -> tuple[jax.Array, jax.Array]:
    """Top-k MoE on ``x [T,d]`` with experts as a batched matmul over ``[E, C, d]``.

    Routing matches ``dialect.route_reference`` (softmax, top-k, renormalise).
    Slots are assigned first choices first; slots beyond capacity are dropped.
    Returns ``(y [T,d], dropped fraction)``.
    """
    t, d = x.shape
    e = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    top_w, ids = jax.lax.top_k(probs, k)
    top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
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
        logits = moe.router_logits(hn)  # [T, E]
        y, drop = capacity_moe(hn.reshape(-1, cfg.d_model), logits, moe.experts.weights(), cfg.routing.k,
                               capacity_factor, cfg.activation)
        x = x + y.reshape(b, s, cfg.d_model)
        probs = jax.nn.softmax(logits, axis=-1)
        _, ids = jax.lax.top_k(logits, cfg.routing.k)
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
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--aux-coef", type=float, default=0.02, help="load-balancing loss coefficient")
    ap.add_argument("--z-coef", type=float, default=1e-3, help="router z-loss coefficient")
    ap.add_argument("--capacity-factor", type=float, default=1.5)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=None,
                    help="stop (and save) after this many seconds even if steps remain")
    ap.add_argument("--log", type=Path, default=None, help="progress log (default: OUT/train_log.txt)")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from this checkpoint folder's weights (a continuation stage; fresh optimizer)")
    ap.add_argument("--report", action="store_true",
                    help="only evaluate the checkpoint in --out on the full held-out text; write eval_report.json")
    ap.add_argument("--report-bytes", type=int, default=None, help="with --report: only this much held-out text")
    ap.add_argument("--bench", type=int, default=0, help="only time this many steps, write nothing")
    args = ap.parse_args(argv)

    out: Path = args.out
    if args.report:
        return report(out, args.seq_len, max_bytes=args.report_bytes)
    out.mkdir(parents=True, exist_ok=True)
    log_path = args.log or out / "train_log.txt"
    log_file = None if args.bench else open(log_path, "w")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if log_file:
            log_file.write(line + "\n")
            log_file.flush()

    t_start = time.time()
    log(f"command: python {' '.join(sys.argv)}")
    train = data.train_bytes()
    heldout = data.heldout_files_bytes()
    log(f"train text {len(train):,} bytes, held-out text {len(heldout):,} bytes")
    if not args.bench:
        (out / "heldout.txt").write_bytes(heldout)
        (out / "LICENSE-PSF.txt").write_text(PSF_NOTE.format(version=sys.version.split()[0]))

    cfg = default_config()
    model = MoEDecoder(cfg, rngs=nnx.Rngs(args.seed))
    if args.init is not None:
        model = load_checkpoint(args.init)
        if model.config != cfg:
            raise SystemExit(f"--init {args.init}: its config differs from default_config(); cannot continue")
        log(f"initialised from {args.init}")
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    log(f"config: {json.dumps({k: str(v) for k, v in vars(cfg).items()})}")
    log(f"parameters: {n_params:,} ({n_params * 4 / 1e6:.2f} MB float32)")

    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps, end_value=args.lr * 0.05)
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)  # no decay on norms
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask))
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)

    def loss_fn(p, batch, cf):
        m = nnx.merge(graphdef, p)
        logits, aux, z, drop, _ = train_forward(m, batch[:, :-1], cf)
        ce = cross_entropy(logits, batch[:, 1:])
        total = ce + args.aux_coef * jnp.mean(aux) + args.z_coef * jnp.mean(z)
        return total, (ce, jnp.mean(aux), jnp.mean(drop))

    @jax.jit
    def step(p, o, batch):
        (_, (ce, aux, drop)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, args.capacity_factor)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, ce, aux, drop

    exact_cf = cfg.n_experts / cfg.routing.k  # no slot can overflow: exact dropless forward

    @jax.jit
    def eval_step(p, batch):
        m = nnx.merge(graphdef, p)
        logits, _, _, _, loads = train_forward(m, batch[:, :-1], exact_cf)
        return cross_entropy(logits, batch[:, 1:]), loads

    ho_arr = data.encode(heldout)
    n_eval = min(64, len(ho_arr) // (args.seq_len + 1))
    stride = len(ho_arr) // n_eval
    ho_batches = np.stack([ho_arr[i * stride: i * stride + args.seq_len + 1] for i in range(n_eval)])

    def evaluate_heldout(p):
        ces, loads = [], []
        for i in range(0, n_eval, 16):
            ce, ld = eval_step(p, jnp.asarray(ho_batches[i:i + 16]))
            ces.append(float(ce))
            loads.append(np.asarray(ld))
        return float(np.mean(ces)), np.mean(loads, axis=0)

    it = data.batches(train, args.batch, args.seq_len, seed=args.seed)
    n_steps = args.bench or args.steps
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
        if i % 10 == 0 or args.bench:
            el = time.time() - t_loop
            log(f"step {i}/{n_steps} train_ce {ce_f:.4f} (ema {ema:.4f}, {ema / math.log(2):.3f} bpb) aux {float(aux):.3f} "
                f"dropped {float(drop) * 100:.2f}% lr {float(schedule(i)):.2e} {el / max(i - 1, 1):.2f}s/step")
        if args.bench:
            continue
        if i % args.eval_every == 0 or i == n_steps:
            ho_ce, loads = evaluate_heldout(params)
            log(f"  heldout_ce {ho_ce:.4f} ({ho_ce / math.log(2):.3f} bpb) min expert load per layer "
                f"{[round(float(l.min()) * 100, 2) for l in loads]}%")
        if i % args.save_every == 0:
            save_checkpoint(nnx.merge(graphdef, params), out)
            log(f"  saved checkpoint at step {i}")
        if args.time_limit and time.time() - t_start > args.time_limit:
            log(f"time limit {args.time_limit}s reached at step {i}; stopping")
            break
    if args.bench:
        return 0

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
        f"{n_eval} windows of {args.seq_len}); max |logit diff| train-forward vs model {gap:.2e}")
    log("expert load per layer (% of slots): " + "; ".join(
        f"L{j}: " + " ".join(f"{float(v) * 100:.1f}" for v in l) for j, l in enumerate(loads)))
    return 0


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
    result = {
        "heldout_bytes": len(heldout), "scored_bytes": int(mask.sum()), "seq_len": seq_len,
        "bits_per_byte": bpb, "batches_recomputed_dropless": redone,
        # Consistency: the first batch scored here vs moejax.evaluation on the same bytes.
        "check_first_batch_bits_per_byte": {"this_script": first_batch_bpb, "moejax.evaluation": check},
        "check_first_4097_bytes_min_expert_load_percent": round(float(check_load.min()) * 100, 2),
        "ngram_kneser_ney_bits_per_byte": {f"order_{o}": v for o, v in ngram.items()},
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
