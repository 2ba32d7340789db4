"""Optimized models back out as Hugging Face checkpoints (``moejax export-hf``).

:func:`export_hf` writes what moejax made of a checkpoint (a pruned, merged or
FP8 model) in the layout it was loaded from, so transformers (or any stack that
reads that architecture) loads it: the checkpoint's own ``config.json`` with
the new expert count, and the weights through the inverse of the loading rules.

* **prune** drops experts and their router columns: the config's expert count
  becomes the surviving count (every MoE layer must keep the same number; a
  Hugging Face config has one count).
* **merge** keeps every router column and maps several to one merged expert
  (``Routing.expert_map``); transformers has no such map, so each column gets
  its own copy of its merged expert: exact, but no smaller on disk. A merge with
  ``distinct=true`` (``Routing.distinct_merged``) is refused: transformers' top-k
  would pick columns, not distinct merged experts.
* **gating** (top-p, threshold, skipping) is refused: it is routing, not weights,
  and transformers routes a fixed top-k.
* **quantized experts**: FP8 block-scaled experts of a DeepSeek-V3-family model are
  written as FP8 with ``weight_scale_inv`` and ``quantization_config``, as released;
  MXFP4 experts of a gpt-oss model are written as ``*_blocks`` / ``*_scales`` with
  ``quantization_config: {"quant_method": "mxfp4", ...}``, as released (the stored
  bytes, sliced by prune); other formats (int8/int4, ...) have no standard Hugging
  Face layout and are written dequantized, with a warning.
* **expert counts**: the count fields of :data:`EXPERT_COUNT_FIELDS` (DBRX's inside
  ``ffn_config``). JetMoE's one ``num_local_experts`` also sizes its attention experts,
  so a JetMoE model whose FFN expert count changed is refused.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax import weight_formats as wf
from moejax.models.fp8_checkpoint import scale_name
from moejax.models.mxfp4_checkpoint import is_mxfp4

__all__ = ["export_hf", "ExportError", "EXPERT_COUNT_FIELDS"]

# Where each family's config.json keeps its routed expert count.
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
FP8_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
MXFP4_ARCHITECTURES = ("GptOssForCausalLM",)
# gpt-oss's released quantization_config (written when the loaded config.json had none, e.g. quantize_mxfp4 experts)
MXFP4_QUANTIZATION_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


class ExportError(ValueError):
    """The model cannot be written in its checkpoint's layout (one line saying why and what to do)."""


def hf_config_of(model: Any) -> dict[str, Any] | None:
    """The Hugging Face ``config.json`` a model was loaded from (recorded by ``from_pretrained``)."""
    text = getattr(model, "hf_config_json", None)
    return json.loads(text) if text else None


def export_hf(source: Any, path: str, *, dtype: Any = None) -> None:
    """Write ``source`` to folder ``path`` as a checkpoint of the architecture it was loaded from.

    Args:
      source: an :class:`~moejax.OptimizedModel` (its last stage is written), or a
        ``MoEDecoder`` that :func:`~moejax.models.from_pretrained` loaded.
      path: output folder (created); gets ``config.json`` and ``model.safetensors``.
      dtype: float dtype of the written float tensors (default: as they are).

    Raises:
      ExportError: the model was not loaded from a Hugging Face checkpoint, its MoE
        layers kept different expert counts, or a pass left weights the layout cannot
        hold (e.g. expert-parallel slots).
    """
    from moejax.models import hf

    model, program = (source.model, source.program) if hasattr(source, "stages") else (source, None)
    config = hf_config_of(model)
    if config is None:
        raise ExportError("export_hf: this model was not loaded from a Hugging Face checkpoint, so its layout is "
                          "unknown; load it with moejax.models.from_pretrained (a Mixtral-family model built in "
                          "code can be written with save_pretrained_hf)")
    arch = hf._architecture(config)
    cfg = model.config
    if program is None:
        state = hf.parameter_values(model)
    else:
        state, n_experts = _program_weights(program)
        if n_experts is not None and n_experts != cfg.n_experts:
            cfg = cfg.replace(n_experts=n_experts)
            _set_expert_count(config, n_experts)
    fp8 = arch in FP8_ARCHITECTURES
    mxfp4 = arch in MXFP4_ARCHITECTURES and _all_experts_mxfp4(state)
    lossy = sorted({wf.format_of(v) for v in state.values()
                    if wf.is_structured(v) and not (fp8 and isinstance(v, wf.Fp8BlockTensor))
                    and not (mxfp4 and isinstance(v, wf.Mxfp4Tensor))})
    if lossy:
        warnings.warn(f"export_hf: {arch} has no standard layout for {', '.join(lossy)} experts; they are written "
                      "dequantized to float (same values, float size)", stacklevel=2)
    if arch == "JetMoeForCausalLM" and cfg.n_experts != model.config.n_experts:
        raise ExportError("export_hf: JetMoE's num_local_experts sizes both its attention and its FFN experts; "
                          "a model with a different FFN expert count has no JetMoE config; export it as loaded")
    tensors = hf.export_tensors_from(state, cfg, arch, keep_fp8=fp8, keep_mxfp4=mxfp4)
    if dtype is not None:  # float tensors only: FP8 values and their f32 scales stay as they are
        tensors = {k: v.astype(dtype) if _wide_float(v.dtype) and not k.endswith("_scale_inv") else v
                   for k, v in tensors.items()}
    if any(k.endswith("_scale_inv") for k in tensors):
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": list(_fp8_blocks(state))}
    elif mxfp4:
        if not is_mxfp4(config):
            config["quantization_config"] = dict(MXFP4_QUANTIZATION_CONFIG)
    else:
        config.pop("quantization_config", None)
    floats = [v.dtype for k, v in tensors.items() if _wide_float(v.dtype) and not k.endswith("_scale_inv")]
    if floats:
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = np.dtype(floats[0]).name
    os.makedirs(path, exist_ok=True)
    hf.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _wide_float(dtype: Any) -> bool:
    """float16/bfloat16/float32/float64 (numpy calls bfloat16 kind 'V'); not FP8."""
    return bool(jnp.issubdtype(dtype, jnp.floating)) and np.dtype(dtype).itemsize > 1


def _set_expert_count(config: dict[str, Any], n: int) -> None:
    # DBRX keeps its expert count and top-k in the nested ffn_config
    ffn = config["ffn_config"] if isinstance(config.get("ffn_config"), dict) else {}
    fields = [(config, f) for f in EXPERT_COUNT_FIELDS if f in config] + [
        (ffn, f) for f in EXPERT_COUNT_FIELDS if f in ffn]
    if not fields:
        raise ExportError(f"export_hf: config.json names its expert count in none of {EXPERT_COUNT_FIELDS}")
    groups = config.get("n_group") or 1
    if n % groups:
        raise ExportError(f"export_hf: {n} experts do not split into the config's n_group={groups} routing "
                          f"groups; prune or merge to a multiple of {groups} experts")
    k = config.get("num_experts_per_tok") or ffn.get("moe_top_k") or 0
    if k > n:
        raise ExportError(f"export_hf: {n} experts are fewer than the {k} experts each token is routed to "
                          "(num_experts_per_tok)")
    for where, f in fields:
        where[f] = n


def _all_experts_mxfp4(state: dict[str, Any]) -> bool:
    """Whether every routed expert matrix (``.../mlp/experts/w_gate|w_up|w_down``) is MXFP4."""
    mats = [v for k, v in state.items() if k.rsplit("/", 1)[-1] in ("w_gate", "w_up", "w_down")
            and "/mlp/experts/" in f"/{k}"]
    return bool(mats) and all(isinstance(v, wf.Mxfp4Tensor) for v in mats)


def _program_weights(program: Any) -> tuple[dict[str, Any], int | None]:
    """``(parameter path -> value, routed expert count)`` of a program, merged experts expanded per router column."""
    from moejax.expert_layout import PerExpertWeights
    from moejax.passes.prune import find_moe_layers
    from moejax.pipeline import PassError

    try:
        layers = find_moe_layers(program, "export_hf")
    except PassError as e:  # e.g. an ep or fused region: the layer's ops are no longer visible
        raise ExportError(f"{str(e).split('; run export_hf')[0]}; export the stage before that pass: "
                          "export_hf(opt.at_stage(i), ...)") from None
    state = {}
    for path, w in program.weights.items():
        if isinstance(w, PerExpertWeights):  # select-impl's layout: back to one stacked weight
            kept = any(all(isinstance(p, t) for p in w.experts) for t in (wf.Fp8BlockTensor, wf.Mxfp4Tensor))
            w = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *w.experts) if kept else w.dequantize()
        state[path] = w
    counts = {}
    for layer in layers.values():
        counts[layer.name] = layer.num_router
        if layer.routing.distinct_merged:
            raise ExportError(f"export_hf: layer {layer.name!r} was merged with distinct=true, which routes each "
                              "token to k distinct merged experts; transformers' top-k picks router columns, so the "
                              "export would not compute the same model. Merge without distinct=true to export")
        if layer.routing.gating != "topk":
            raise ExportError(f"export_hf: layer {layer.name!r} routes with adaptive gating "
                              f"({layer.routing.gating!r}); transformers routes every token to a fixed top-k, so "
                              "the export would not compute the same model. Export the stage before 'gating'")
        if layer.routing.expert_map is not None:  # merged: one copy of its expert per router column
            index = np.asarray(layer.routing.expert_map)
            for p in layer.experts:
                state[p] = _take_experts(state[p], index, axis=1 if layer.stacked else 0)
    if len(set(counts.values())) > 1:
        raise ExportError(f"export_hf: MoE layers keep different expert counts ({counts}); a Hugging Face config has "
                          "one count: prune or merge every layer to the same number")
    return state, next(iter(counts.values()), None)


def _take_experts(w: Any, index: np.ndarray, axis: int) -> Any:
    if isinstance(w, (wf.Fp8BlockTensor, wf.Mxfp4Tensor)):  # stays FP8 / MXFP4: each leaf is expert-major
        return jax.tree_util.tree_map(lambda a: np.take(np.asarray(a), index, axis), w)
    return np.take(np.asarray(wf.dequantize(w) if wf.is_structured(w) else w), index, axis)


def _fp8_blocks(state: dict[str, Any]) -> tuple[int, int]:
    w = next(v for v in state.values() if isinstance(v, wf.Fp8BlockTensor))
    return w.block_n, w.block_k


def fp8_expert_tensors(value: wf.Fp8BlockTensor, srcs: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per-expert FP8 tensors and scales of a stacked ``Fp8BlockTensor`` (the checkpoint's orientation)."""
    weight, scale = np.asarray(value.weight), np.asarray(value.scale_inv)
    out = {}
    for e, src in enumerate(srcs):
        out[src], out[scale_name(src)] = weight[e], scale[e]
    return out


def mxfp4_expert_tensors(tensors: dict[str, np.ndarray], value: wf.Mxfp4Tensor, srcs: tuple[str, ...],
                         which: str) -> None:
    """Put a stacked gpt-oss ``Mxfp4Tensor`` back into ``tensors`` as its checkpoint ``*_blocks`` / ``*_scales``.

    ``which``: ``w_gate`` / ``w_up`` (rows ``0::2`` / ``1::2`` of the fused ``gate_up_proj``) or ``w_down``.
    The stored bytes are written unchanged.
    """
    rows = {"w_gate": slice(0, None, 2), "w_up": slice(1, None, 2)}.get(which)
    for src, leaf in zip(srcs, (np.asarray(value.blocks), np.asarray(value.scales))):
        if rows is None:
            tensors[src] = leaf
            continue
        out = tensors.setdefault(src, np.zeros((leaf.shape[0], 2 * leaf.shape[1], *leaf.shape[2:]), leaf.dtype))
        out[:, rows] = leaf
