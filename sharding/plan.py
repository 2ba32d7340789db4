"""``moejax plan``: per-device memory of a model on a mesh, whether it fits a device, the smallest mesh that does.

For a model (a preset name, a config, or a checkpoint folder's ``config.json``), a
mesh (``expert=64`` or ``expert=32,data=2``), a batch, a context length and a pass
pipeline, :func:`plan_memory` gives the bytes one device holds while running a
prefill forward of ``batch x context`` tokens into a KV cache of ``context`` slots:

* **weights, by format**: counted on the *abstract optimized program* (the model
  built shapes-only, :mod:`moejax.abstract`, traced and run through the pipeline's
  real passes), so ``quantize(bits=4)`` counts packed int4 codes and scales,
  ``ep`` shards the expert weights over the expert axis exactly as it does on a
  real mesh, and ``offload(resident=...)`` (one device) keeps only its cache's
  share of the experts on the device. Every other weight is replicated on every
  device (what the program does today: no tensor parallelism of attention or
  dense layers).
* **KV cache**: ``config.cache_shapes()`` per token and layer, times batch x
  context, in the cache dtype, split over every device (XLA shards it like the
  tokens of the MoE region: measured).
* **activations**: the peak of one layer's intermediates plus the logits (see
  :func:`activation_bytes`). With ``ep``, XLA propagates the MoE region's token
  sharding to the whole layer, so token-wise activations are split over all
  devices (measured; keys and values stay whole per sequence).
* **all-to-all buffers**: the send and receive buffers of one layer's exchange
  (dense ``[n, C, d + id columns]`` forward and ``[n, C, d]`` back, with ``C`` from
  :func:`moejax.sharding.exchange.capacity_for`; or the ragged exchange ``ep``
  picks on GPU/TPU), as the ``ep`` pass sizes them.

The total is weights + KV cache + the activation peak, where the all-to-all buffers
are live only in the MoE phase (so the total is below the sum of the parts when a
layer's attention is its larger phase). Validated against
``compiled.memory_analysis()`` of scaled-down models on 8 simulated CPU devices
(``tests/test_plan.py``; numbers in ``sharding/README.md``).

Device memory (vendor figures, decimal GB as published unless noted; the JAX
runtime reserves part of it, e.g. on GPU ``XLA_PYTHON_CLIENT_MEM_FRACTION``
defaults to 75% of it, so keep headroom):

* NVIDIA H100 SXM 80 GB, H200 141 GB (HBM3e), B200 180 GB (DGX B200: 1,440 GB
  for 8 GPUs), A100 80 GB / 40 GB — NVIDIA data sheets.
* Google Cloud TPU, per chip: v4 32 GiB, v5e 16 GB, v5p 95 GB, v6e (Trillium)
  32 GB — cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax import dialect

__all__ = ["Device", "DEVICES", "MemoryPlan", "plan_memory", "parse_mesh", "activation_bytes", "kv_cache_bytes",
           "all_to_all_bytes", "format_plan", "PlanError"]

GB, GIB = 10**9, 2**30


class PlanError(ValueError):
    """A planning input is wrong (unknown device or preset, bad mesh, mesh not dividing the experts)."""


@dataclasses.dataclass(frozen=True)
class Device:
    """An accelerator's memory and the platform its programs are optimized for."""

    name: str
    bytes: int
    platform: str  # "cuda" or "tpu": what select-impl / ep optimize for


DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("h100", 80 * GB, "cuda"), Device("h200", 141 * GB, "cuda"), Device("b200", 180 * GB, "cuda"),
    Device("a100-80gb", 80 * GB, "cuda"), Device("a100-40gb", 40 * GB, "cuda"),
    Device("tpu-v4", 32 * GIB, "tpu"), Device("tpu-v5e", 16 * GB, "tpu"), Device("tpu-v5p", 95 * GB, "tpu"),
    Device("tpu-v6e", 32 * GB, "tpu"),
)}
_ALIASES = {"a100": "a100-80gb", "v4": "tpu-v4", "v5e": "tpu-v5e", "v5p": "tpu-v5p", "v6e": "tpu-v6e"}


def device(name: str) -> Device:
    """The :class:`Device` called ``name`` (``h200``, ``v5p`` / ``tpu-v5p`` ...)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DEVICES:
        raise PlanError(f"unknown device {name!r}; known: {', '.join(DEVICES)} (aliases: {', '.join(_ALIASES)})")
    return DEVICES[key]


def parse_mesh(text: str) -> dict[str, int]:
    """``"expert=64,data=2"`` -> ``{"expert": 64, "data": 2}``; axes ``expert`` (required) and ``data``."""
    from moejax.sharding.mesh import parse_mesh_text

    try:
        mesh = parse_mesh_text(text, axes=("data", "expert"))
    except ValueError as e:
        raise PlanError(str(e)) from None
    if "expert" not in mesh:
        raise PlanError(f"mesh {text!r} has no expert axis; write e.g. expert=64 or expert=32,data=2")
    mesh.setdefault("data", 1)
    return mesh


# --------------------------------------------------------------------------
# Analytic parts: KV cache, activations, all-to-all buffers.
# --------------------------------------------------------------------------
def kv_cache_bytes(cfg: Any, batch: int, context: int, itemsize: int, devices: int = 1) -> int:
    """Per-device KV-cache bytes: ``cache_shapes`` per token and layer x batch x context, split over ``devices``.

    Measured: XLA shards the cache like the tokens of the MoE region, over every
    device of the mesh (along the batch, then the sequence), not only over ``data``.
    """
    per_token = sum(math.prod(s) for s in cfg.cache_shapes().values())
    return -(-cfg.n_layers * batch * context * per_token * itemsize // devices)


def _exchange_rows(cfg: Any, tokens_per_device: int, n: int, chunks: int, capacity_factor: float | None) -> int:
    """Rows of one chunk's per-destination buffers on one device: ``n * C`` (the ep pass's capacity)."""
    from moejax.sharding.exchange import capacity_for

    spd = cfg.n_experts // n
    tc = -(-tokens_per_device // chunks)
    return n * capacity_for(tc, cfg.routing.k, n, spd, capacity_factor)


def all_to_all_bytes(cfg: Any, batch: int, context: int, n: int, data: int, itemsize: int, *, chunks: int = 1,
                     capacity_factor: float | None = None, exchange: str = "dense") -> int:
    """One layer's exchange buffers on one device (prefill, layout ``shard``), sized as the exchange sizes them.

    ``dense``: send and receive ``[n, C, d + c]`` forward (``c`` columns carry the
    local expert id bit-cast into the rows' dtype) and ``[n, C, d]`` back.
    ``ragged`` (what ``ep`` picks on GPU/TPU): the forward sends the chunk's
    ``tc * K`` slots and receives up to ``n * dropless C`` rows, and back again.
    With ``chunks`` > 1 two chunks are in flight (the software pipeline).
    """
    from moejax.sharding.exchange import dropless_capacity

    if n == 1:
        return 0
    tokens = -(-batch * context // (n * data))
    if exchange == "dense":
        send = recv = _exchange_rows(cfg, tokens, n, chunks, capacity_factor)
    else:
        tc = -(-tokens // chunks)
        send, recv = tc * cfg.routing.k, n * dropless_capacity(tc, cfg.routing.k, cfg.n_experts // n)
    id_cols = {4: 1, 2: 2, 8: 1}.get(itemsize, 1)
    one_chunk = (send + recv) * (cfg.d_model + id_cols) * itemsize + (send + recv) * cfg.d_model * itemsize
    return one_chunk * min(chunks, 2)


def activation_bytes(cfg: Any, batch: int, context: int, n: int, data: int, itemsize: int, *, chunks: int = 1,
                     capacity_factor: float | None = None) -> dict[str, int]:
    """Peak activation bytes of a prefill forward on one device, by part (see the module doc).

    ``t = batch * context / (n * data)`` tokens per device. Parts:

    * ``logits``: the device's share ``[t, V]`` of the float32 output (XLA shards
      it like the tokens);
    * ``residual``: the stream ``x`` and the layer's branch output ``[t, d]``;
    * the phases, of which the largest is live at the peak: ``attention`` (queries,
      the sequence's keys and values after the GQA repeat, three float32 ``[t, H, L]``
      buffers for the scores, their exponentials and the probabilities, the output),
      ``moe`` (router logits ``[t, E]`` float32, the exchanged rows' expert
      intermediates ``[n*C, f]`` x3, shared experts; the all-to-all buffers come on
      top, see :func:`all_to_all_bytes`),
      ``dense_ffn`` (a dense layer's intermediates) and ``lm_head`` (the logits in
      the model dtype before the float32 cast).
    """
    d_total = n * data
    t = -(-batch * context // d_total)
    b_local = -(-batch // math.gcd(batch, d_total))  # sequences whose keys one device holds
    h, L = cfg.n_heads, context
    if cfg.attention == "mla":
        dq, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        # the cached latent and rotary key, their expansion [L, H, nope + v] and the keys [L, H, nope + rope]
        keys = b_local * L * (h * (cfg.qk_nope_head_dim + dv + dq) + cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        q, out = t * h * dq, t * h * dv
    else:
        hq = h if cfg.attention != "moa" else cfg.routing.k * cfg.n_kv_heads
        dq = dv = cfg.hd
        keys = 2 * b_local * L * hq * dq
        q, out = t * hq * dq, t * hq * dv
        h = hq
    # The scores, their masked exponentials and the probabilities: three float32 [t, H, L] buffers.
    # Measured on 8 CPU devices, XLA holds one to three and a half of them at the attention peak
    # (by shape and scheduler, sharding/README.md); three errs on the safe side.
    attention = (q + keys + out) * itemsize + 3 * t * h * L * 4
    mats = 3 if dialect.is_gated(cfg.activation) else 2  # gate, up, activated product
    rows = _exchange_rows(cfg, t, n, chunks, capacity_factor) if n > 1 else t * cfg.routing.k
    shared = t * (cfg.d_ff_shared or cfg.d_ff_expert) * cfg.n_shared_experts * mats
    moe = t * cfg.n_experts * 4 + (rows * cfg.d_ff_expert * mats + shared) * itemsize
    dense_layers = cfg.first_dense_layers or cfg.dense_layers
    dense = t * (cfg.d_ff_dense or cfg.d_ff_expert) * mats * itemsize if dense_layers else 0
    return {"logits": t * cfg.vocab_size * 4, "residual": 2 * t * cfg.d_model * itemsize,
            "attention": attention, "moe": moe, "dense_ffn": dense,
            "lm_head": t * cfg.vocab_size * itemsize if itemsize != 4 else 0}


def peak_bytes(activations: Mapping[str, int], exchange: int) -> int:
    """Activations live at the peak: logits and residual plus the largest phase (MoE with ``exchange`` buffers)."""
    a = activations
    return a["logits"] + a["residual"] + max(a["attention"], a["moe"] + exchange, a["dense_ffn"], a["lm_head"])


# --------------------------------------------------------------------------
# Weights from the abstract optimized program.
# --------------------------------------------------------------------------
def _per_device_bytes(leaf: Any) -> int:
    """Bytes of one device's shard of ``leaf`` (whole when it has no sharding: replicated)."""
    shape = list(leaf.shape)
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        sizes = dict(sharding.mesh.shape)
        for i, axes in enumerate(tuple(sharding.spec)):
            for a in (axes if isinstance(axes, tuple) else (axes,)):
                if a is not None:
                    shape[i] = -(-shape[i] // sizes[a])
    return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize


def _format_name(w: Any) -> str:
    from moejax import weight_formats as wf

    if wf.is_structured(w):
        return w.format
    return jnp.dtype(jax.tree_util.tree_leaves(w)[0].dtype).name


def weight_bytes_by_format(program: Any) -> dict[str, dict[str, int]]:
    """``{"experts"|"other": {format: bytes per device}}`` of a (typically abstract) program's weights."""
    from moejax import stats

    experts = set(stats.expert_weight_sites(program))
    out: dict[str, dict[str, int]] = {"experts": {}, "other": {}}
    for path, w in program.weights.items():
        kind = "experts" if path in experts else "other"
        fmt = _format_name(w)
        out[kind][fmt] = out[kind].get(fmt, 0) + sum(_per_device_bytes(x) for x in jax.tree_util.tree_leaves(w))
    offload = program.metadata.get("offload")
    if offload and offload["expert_bytes"]:  # only the resident cache's share of the experts is on the device
        share = offload["resident_expert_bytes"] / offload["expert_bytes"]
        out["experts"] = {f"{fmt}, resident cache {share:.0%}": int(b * share) for fmt, b in out["experts"].items()}
    return out


# --------------------------------------------------------------------------
# The plan.
# --------------------------------------------------------------------------
@dataclasses.dataclass
class MemoryPlan:
    """Per-device bytes of one model on one mesh (see the module doc); ``to_json()`` for ``--json``."""

    model: str
    mesh: dict[str, int]
    device: str
    device_bytes: int
    batch: int
    context: int
    pipeline: str
    weights_by_format: dict[str, dict[str, int]]
    kv_cache_bytes_per_device: int
    activations: dict[str, int]
    all_to_all_bytes_per_device: int
    smallest_fitting_mesh: str | None
    notes: list[str]

    @property
    def weights_bytes_per_device(self) -> int:
        return sum(sum(v.values()) for v in self.weights_by_format.values())

    @property
    def activation_bytes_per_device(self) -> int:
        """Peak activations without the all-to-all buffers."""
        return peak_bytes(self.activations, 0)

    @property
    def total_bytes_per_device(self) -> int:
        """Weights + KV cache + the activation peak, where the MoE phase carries the all-to-all buffers.

        Less than the sum of the parts when attention (or the LM head) is the larger
        phase: the exchange buffers of a layer are not live during its attention.
        """
        return (self.weights_bytes_per_device + self.kv_cache_bytes_per_device
                + peak_bytes(self.activations, self.all_to_all_bytes_per_device))

    @property
    def fits(self) -> bool:
        return self.total_bytes_per_device <= self.device_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.device_bytes - self.total_bytes_per_device

    def to_json(self) -> dict[str, Any]:
        """Plain data: every field, plus the totals and ``fits``."""
        return {
            "model": self.model, "mesh": self.mesh, "device": self.device, "device_bytes": self.device_bytes,
            "batch": self.batch, "context": self.context, "pipeline": self.pipeline,
            "weights_bytes_per_device": self.weights_bytes_per_device,
            "weights_by_format": self.weights_by_format,
            "kv_cache_bytes_per_device": self.kv_cache_bytes_per_device,
            "activation_bytes_per_device": self.activation_bytes_per_device,
            "activations": self.activations,
            "all_to_all_bytes_per_device": self.all_to_all_bytes_per_device,
            "total_bytes_per_device": self.total_bytes_per_device, "fits": self.fits,
            "headroom_bytes": self.headroom_bytes, "smallest_fitting_mesh": self.smallest_fitting_mesh,
            "notes": self.notes,
        }


def mesh_text(mesh: Mapping[str, int]) -> str:
    """``expert=64`` or ``expert=32,data=2``."""
    return f"expert={mesh['expert']}" + (f",data={mesh['data']}" if mesh.get("data", 1) > 1 else "")


def load_config(model: Any) -> tuple[str, Any]:
    """``(name, MoEConfig)`` of a preset name, a checkpoint folder (its ``config.json``) or a config."""
    from moejax.models.decoder import MoEConfig
    from moejax.models.presets import PRESETS, preset

    if isinstance(model, MoEConfig):
        return model.family, model
    path = Path(str(model))
    if path.is_dir():
        from moejax.models.hf import config_from_hf

        config = path / "config.json"
        if not config.is_file():
            raise PlanError(f"{path} has no config.json; give a preset name or a Hugging Face checkpoint folder")
        return path.name, config_from_hf(json.loads(config.read_text()))
    if str(model) not in PRESETS:
        raise PlanError(f"unknown model {model!r}: not a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint "
                        "folder")
    return str(model), preset(str(model))


def _with_mesh(passes: list[Any], mesh: Mapping[str, int], notes: list[str]) -> list[Any]:
    """The pipeline with every ``ep`` on an abstract mesh of ``mesh``'s shape (``ep`` added first if missing)."""
    from moejax.sharding.expert_parallel import ExpertParallel
    from moejax.sharding.mesh import abstract_expert_mesh

    data = mesh.get("data", 1)
    abstract = abstract_expert_mesh(mesh["expert"], data=data)
    out = [dataclasses.replace(p, mesh=abstract, data_axis="data" if data > 1 else None, num_devices=None)
           if isinstance(p, ExpertParallel) else p for p in passes]
    if not any(isinstance(p, ExpertParallel) for p in passes) and mesh["expert"] * data > 1:
        out.insert(0, ExpertParallel(mesh=abstract, data_axis="data" if data > 1 else None))
        notes.append("the pipeline has no ep pass: experts are sharded as `ep` (added first) does")
    return out


def _ep_options(passes: list[Any], platform: str) -> tuple[int, float | None, str]:
    """``(overlap_chunks, capacity_factor, exchange)`` of the pipeline's ``ep`` (exchange as on ``platform``)."""
    from moejax.sharding.expert_parallel import ExpertParallel

    ep = next((p for p in passes if isinstance(p, ExpertParallel)), None)
    if ep is None:
        return 1, None, "dense"
    exchange = ep.resolve_exchange(platform)
    return ep.overlap_chunks, ep.capacity_factor, "dense" if exchange == "dense" else "ragged"


def plan_memory(model: Any, *, mesh: Mapping[str, int] | str | None = None, device_count: int | None = None,
                device_name: str = "h200", batch: int = 1, context: int = 4096, pipeline: str = "",
                dtype: Any = jnp.bfloat16, kv_dtype: Any = None, platform: str | None = None) -> MemoryPlan:
    """The per-device memory plan of ``model`` (preset name, checkpoint folder or ``MoEConfig``).

    ``mesh`` (``{"expert": 64, "data": 2}`` or its text) or ``device_count`` (all on
    the expert axis) gives the mesh; ``pipeline`` is a pass pipeline string whose
    ``ep`` is placed on that mesh (an abstract one: no devices needed). Weights are
    ``dtype`` (a checkpoint's own storage format is not read: ``quantize`` in the
    pipeline models a quantized deployment); the KV cache is ``kv_dtype`` (default ``dtype``).
    ``platform`` overrides the device's (``cuda``/``tpu``) for what the passes pick, e.g.
    ``cpu`` for the dense exchange XLA:CPU runs (the validation against XLA uses it).

    Raises:
      PlanError: an unknown model or device, a bad mesh, or an expert axis that does
        not divide the model's experts.
      moejax.PassError: the pipeline does not parse or a pass refuses the model.
    """
    from moejax.pipeline import parse_pipeline

    name, cfg = load_config(model)
    if isinstance(mesh, str):
        mesh = parse_mesh(mesh)
    elif mesh is None:
        mesh = {"expert": device_count or 1, "data": 1}
    mesh = {"expert": int(mesh["expert"]), "data": int(mesh.get("data", 1))}
    dev = device(device_name)
    n, data = mesh["expert"], mesh["data"]
    if cfg.n_experts % n:
        raise PlanError(f"mesh {mesh_text(mesh)}: the expert axis ({n}) does not divide {name}'s {cfg.n_experts} "
                        f"experts; use one of {', '.join(map(str, _expert_axes(cfg.n_experts)))}")
    if batch < 1 or context < 1:
        raise PlanError(f"batch and context must be >= 1, got batch={batch}, context={context}")
    notes = ["non-expert weights are replicated on every device (the program has no tensor parallelism)"]
    passes = _with_mesh(parse_pipeline(pipeline) if pipeline.strip() else [], mesh, notes)
    platform = platform or dev.platform
    weights = _weights(cfg, tuple(sorted(mesh.items())), pipeline, jnp.dtype(dtype).name, platform)
    itemsize = jnp.dtype(dtype).itemsize
    kv_item = jnp.dtype(kv_dtype or dtype).itemsize
    chunks, cf, exchange = _ep_options(passes, platform)
    plan = MemoryPlan(
        model=name, mesh=mesh, device=dev.name, device_bytes=dev.bytes, batch=batch, context=context,
        pipeline=",".join("ep" if p.name == "ep" else str(p) for p in passes),
        weights_by_format=copy.deepcopy(weights),
        kv_cache_bytes_per_device=kv_cache_bytes(cfg, batch, context, kv_item, n * data),
        activations=activation_bytes(cfg, batch, context, n, data, itemsize, chunks=chunks, capacity_factor=cf),
        all_to_all_bytes_per_device=all_to_all_bytes(cfg, batch, context, n, data, itemsize, chunks=chunks,
                                                     capacity_factor=cf, exchange=exchange),
        smallest_fitting_mesh=None,
        notes=notes + ([f"all-to-all: the {exchange} exchange ep uses on {platform}"] if n * data > 1 else []))
    plan.smallest_fitting_mesh = _smallest_fitting(plan, cfg, itemsize, chunks, cf, exchange)
    return plan


@functools.lru_cache(maxsize=16)
def _weights(cfg: Any, mesh_items: tuple[tuple[str, int], ...], pipeline: str, dtype: str,
             platform: str) -> dict[str, dict[str, int]]:
    """Per-device weight bytes by format of the abstract model optimized by ``pipeline`` on the mesh.

    Cached: the program does not depend on batch, context or device memory, and tracing a
    61-layer model through a pipeline takes seconds (plans over many shapes reuse it).
    """
    import moejax
    from moejax.models.abstract import abstract_model, abstract_tokens
    from moejax.pipeline import parse_pipeline

    mesh = dict(mesh_items)
    if not (cfg.first_dense_layers or cfg.dense_layers):
        # Identical layers: trace them stacked under one scan (same stored bytes and shardings,
        # tested; Qwen3-235B's 94 layers: 0.1 s instead of 12 s).
        cfg = cfg.replace(scan_layers=True)
    passes = _with_mesh(parse_pipeline(pipeline) if pipeline.strip() else [], mesh, [])
    tokens = abstract_tokens(1, 4 * mesh["expert"] * mesh["data"])  # enough tokens per device for the shard layout
    opt = moejax.optimize(abstract_model(cfg, dtype=jnp.dtype(dtype)), (tokens,), passes, platform=platform)
    return weight_bytes_by_format(opt.program)


def _expert_axes(n_experts: int) -> list[int]:
    """Powers of two dividing ``n_experts``: the expert-axis sizes the search tries."""
    return [2**i for i in range(int(math.log2(n_experts)) + 1) if n_experts % 2**i == 0]


def _smallest_fitting(plan: MemoryPlan, cfg: Any, itemsize: int, chunks: int, cf: float | None,
                      exchange: str) -> str | None:
    """The smallest expert axis (powers of two dividing the experts, same data axis) whose plan fits.

    Expert weights scale as 1/n from the planned program's (``ep`` places whole
    experts, no replicas); the rest is recomputed for each n.
    """
    n0, data = plan.mesh["expert"], plan.mesh["data"]
    experts_total = sum(plan.weights_by_format["experts"].values()) * n0
    other = sum(plan.weights_by_format["other"].values())
    kv_total = plan.kv_cache_bytes_per_device * n0 * data
    for n in _expert_axes(cfg.n_experts):
        acts = activation_bytes(cfg, plan.batch, plan.context, n, data, itemsize, chunks=chunks, capacity_factor=cf)
        buffers = all_to_all_bytes(cfg, plan.batch, plan.context, n, data, itemsize, chunks=chunks,
                                   capacity_factor=cf, exchange=exchange)
        total = other + experts_total // n + kv_total // (n * data) + peak_bytes(acts, buffers)
        if total <= plan.device_bytes:
            return mesh_text({"expert": n, "data": data})
    return None


def _gb(x: int) -> str:
    """Bytes as GB (decimal, like the device table), or MB below 1 GB."""
    return f"{x / GB:,.2f} GB" if abs(x) >= GB else f"{x / 10**6:,.1f} MB"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a text table (what ``moejax plan`` prints)."""
    rows = [("part", "per device")]
    for kind, label in (("experts", "expert weights (split over the expert axis)"),
                        ("other", "other weights (replicated)")):
        for fmt, b in sorted(plan.weights_by_format[kind].items()):
            rows.append((f"{label}, {fmt}", _gb(b)))
    a = plan.activations
    rows += [("weights", _gb(plan.weights_bytes_per_device)),
             (f"KV cache ({plan.batch} x {plan.context} tokens)", _gb(plan.kv_cache_bytes_per_device)),
             (f"activations (attention {_gb(a['attention'])}, MoE {_gb(a['moe'])}, logits {_gb(a['logits'])})",
              _gb(plan.activation_bytes_per_device)),
             ("all-to-all buffers (one layer, live in its MoE phase)", _gb(plan.all_to_all_bytes_per_device)),
             ("total (peak phase)", _gb(plan.total_bytes_per_device)),
             (f"{plan.device} memory", _gb(plan.device_bytes)),
             ("headroom" if plan.fits else "over by", _gb(abs(plan.headroom_bytes)))]
    width = max(len(r[0]) for r in rows)
    head = (f"{plan.model} on {mesh_text(plan.mesh)} x {plan.device}, batch {plan.batch} x context {plan.context}, "
            f"pipeline {plan.pipeline or '(none)'}")
    lines = [head] + [f"  {k.ljust(width)}  {v:>14}" for k, v in rows]
    lines.append(f"  fits: {'yes' if plan.fits else 'no'}; smallest fitting mesh: "
                 f"{plan.smallest_fitting_mesh or 'none (not even one expert per device)'}")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
