"""The bundled default model: a small Mixtral-style byte-level MoE trained on stdlib source.

Files in ``models/default/`` (shipped as package data):

* ``config.json`` -- the :class:`~moejax.models.MoEConfig` fields (routing as a dict);
* ``model.safetensors`` -- float32 weights, one tensor per NNX parameter, named by
  its state path joined with dots (``layers.0.mlp.experts.w_up``), unrolled layers;
* ``heldout.txt`` -- held-out evaluation text (see :mod:`moejax.data`);
* ``LICENSE-PSF.txt`` -- licence note for that text;
* ``TRAINING.md`` -- how the checkpoint was trained (command, time, losses).

``scripts/train_default.py`` reproduces the checkpoint. A folder in this format
(a copy of ``models/default/``, say) also loads through
:func:`moejax.models.from_pretrained`, which recognises it with :func:`is_moejax_config`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import dialect, numerics
from moejax.models import validation
from moejax.models.byte_level import mark_byte_level
from moejax.models.decoder import ATTENTIONS, MoEConfig, MoEDecoder
from moejax.models.layers import NORMS, Llama3Rope, LongRope, Yarn
from moejax.models.safetensors_io import SafetensorsFile
from moejax.models.validation import CheckpointError

__all__ = [
    "DEFAULT_MODEL_DIR",
    "CheckpointError",
    "config_to_dict",
    "config_from_dict",
    "is_moejax_config",
    "flat_params",
    "save_checkpoint",
    "load_checkpoint",
    "load_default_model",
    "load_bundled_model",
    "BUNDLED_MODELS",
    "FINE_GRAINED_MODEL_DIR",
]

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"
# The fine-grained bundled model (32 small experts, DeepSeek-V3 routing); same held-out text.
FINE_GRAINED_MODEL_DIR = Path(__file__).resolve().parent / "fine_grained"
_FAMILY = "mixtral"
_CONFIG_FIX = "fix the checkpoint's config.json (it holds moejax MoEConfig fields)"

# What each config.json field may hold: the annotations give the types, these overrides the ranges.
_CONFIG_KINDS = validation.dataclass_kinds(MoEConfig, {
    **dict.fromkeys(("n_shared_experts", "first_dense_layers", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim"), validation.NON_NEGATIVE_INT),
    "n_layers": validation.LAYER_COUNT, "n_experts": validation.EXPERT_COUNT,
    "norm_eps": validation.POSITIVE_NUMBER, "rope_theta": validation.POSITIVE_NUMBER,
    "clip_qkv": validation.POSITIVE_NUMBER, "softmax_scale": validation.POSITIVE_NUMBER,
    "activation": validation.one_of("swiglu", "geglu", "gelu", "relu", "silu"),  # dialect.activation_fn's
    "norm": validation.one_of(*NORMS), "attention": validation.one_of(*ATTENTIONS),
})
# Fields holding a dataclass: JSON objects checked against that dataclass's own table.
_NESTED: dict[str, tuple[type, dict[str, validation.Kind]]] = {
    "routing": (dialect.Routing, validation.dataclass_kinds(dialect.Routing)),
    "rope_scaling": (Yarn, validation.dataclass_kinds(Yarn)),
}
# rope_scaling holds one of these; the fields written tell which (Yarn when none fits).
_ROPE_CLASSES = (Yarn, Llama3Rope, LongRope)


def _nested_class(name: str, value: Any) -> tuple[type, dict[str, validation.Kind]]:
    if name == "rope_scaling" and isinstance(value, dict):
        for cls in _ROPE_CLASSES:
            names = {f.name for f in dataclasses.fields(cls)}
            required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
            if required <= set(value) <= names:
                return cls, validation.dataclass_kinds(cls)
    return _NESTED[name]


def config_to_dict(cfg: MoEConfig) -> dict[str, Any]:
    """JSON-able dict of a config (``routing`` as a dict; ``scan_layers`` dropped: storage is unrolled)."""
    d = dataclasses.asdict(cfg)  # nested dataclasses (routing, rope_scaling) become dicts
    if d["routing"].get("expert_map") is not None:
        d["routing"]["expert_map"] = list(d["routing"]["expert_map"])
    d.pop("scan_layers")
    return d


def is_moejax_config(d: dict[str, Any]) -> bool:
    """Whether a ``config.json`` dict is in this module's format rather than a Hugging Face config.

    Hugging Face configs name their ``architectures``; ours never do, and always hold ``routing``.
    """
    return "routing" in d and "architectures" not in d


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with lists turned back into tuples (JSON has no tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def config_from_dict(d: dict[str, Any], *, scan_layers: bool = False) -> MoEConfig:
    """Inverse of :func:`config_to_dict`; unknown, missing or ill-typed fields raise :class:`CheckpointError`."""
    fields = [f for f in dataclasses.fields(MoEConfig) if f.name != "scan_layers"]
    unknown = sorted(set(d) - {f.name for f in fields})
    if unknown:
        raise CheckpointError(f"config.json has unknown fields {unknown}; it was written by a different "
                              "moejax version or is not a moejax MoEConfig")
    if missing := [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in d]:
        raise CheckpointError(f"config.json lacks fields {missing}; {_CONFIG_FIX}")
    validation.check_fields(d, _CONFIG_KINDS, file="config.json", fix=_CONFIG_FIX)
    raw = {}  # nested objects, checked
    classes = {}
    for name in _NESTED:
        if d.get(name) is None:
            continue
        cls, kinds = classes[name] = _nested_class(name, d[name])
        if unknown := sorted(set(d[name]) - set(kinds)):
            raise CheckpointError(f"config.json: field {name!r} has unknown fields {unknown}; {_CONFIG_FIX}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        if missing := [f for f in required if f not in d[name]]:
            raise CheckpointError(f"config.json: field {name!r} lacks {missing}; {_CONFIG_FIX}")
        validation.check_fields(d, {f"{name}.{k}": v for k, v in kinds.items()}, file="config.json",
                                fix=_CONFIG_FIX)
        raw[name] = d[name]
    try:
        nested = {name: classes[name][0](**_tuples(value)) for name, value in raw.items()}
        return MoEConfig(**{**_tuples(d), **nested, "scan_layers": scan_layers})
    except ValueError as e:  # the cross-field checks of MoEConfig and Routing
        raise CheckpointError(f"config.json: {e}; {_CONFIG_FIX}") from None


def _path_name(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def flat_params(model: MoEDecoder) -> dict[str, np.ndarray]:
    """``{dotted state path: float32 array}`` of an unrolled model's parameters."""
    if model.config.scan_layers:
        raise ValueError("flat_params expects an unrolled model (scan_layers=False)")
    state = nnx.state(model, nnx.Param)
    return {_path_name(p): np.asarray(v[...] if hasattr(v, "__getitem__") else v)
            for p, v in nnx.to_flat_state(state)}


def save_checkpoint(model: MoEDecoder, folder: Path | str) -> None:
    """Write ``config.json`` and ``model.safetensors`` for an unrolled model."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flat_params(model).items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "moejax", "family": _FAMILY})
    tmp.chmod(0o644)  # safetensors creates the file owner-only; package data must be world-readable
    tmp.replace(folder / "model.safetensors")  # atomic: a reader never sees half a file
    (folder / "config.json").write_text(json.dumps(config_to_dict(model.config), indent=2) + "\n")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} is missing; a moejax checkpoint folder needs config.json and "
                              "model.safetensors (run scripts/train_default.py to rebuild the default model)")
    return validation.read_json_object(path, fix="restore it from the package or from the folder it was copied from")


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of ``model.safetensors``, as views of the memory-mapped file (its header is validated)."""
    path = folder / "model.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path} is missing; run scripts/train_default.py or reinstall moejax")
    f = SafetensorsFile(str(path))
    return {k: f.get(k) for k in f.keys()}


def load_checkpoint(folder: Path | str, *, scan_layers: bool = False) -> MoEDecoder:
    """Build an :class:`MoEDecoder` from a moejax checkpoint folder.

    Every parameter is checked by name and shape; a missing, extra or mis-shaped
    tensor raises :class:`CheckpointError` naming it. ``scan_layers=True`` stacks
    the stored per-layer tensors for the scanned form.
    """
    folder = Path(folder)
    cfg = config_from_dict(_read_config(folder), scan_layers=False)
    tensors = _read_tensors(folder)
    # Shapes only: no random initialisation (slow, eager) for weights that are overwritten anyway.
    abstract = nnx.eval_shape(lambda: MoEDecoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    flat = list(nnx.to_flat_state(params))
    expected = {_path_name(p): tuple(v.get_value().shape) for p, v in flat}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{folder / 'model.safetensors'} does not match config.json: missing tensors "
                              f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected tensors "
                              f"{extra[:5]}{'...' if len(extra) > 5 else ''}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, config.json "
                                  f"implies {shape}; the checkpoint and config do not belong together")
        if numerics.count_nonfinite(tensors[name]):  # handles bfloat16, which np.isfinite rejects
            raise CheckpointError(f"tensor {name!r} contains NaN or inf; the checkpoint is corrupt")
    if jax.tree_util.tree_leaves(rest):
        raise CheckpointError(f"MoEDecoder({cfg.family}) holds non-parameter state; this loader cannot restore it")
    model = _materialise(cfg, lambda path: tensors[_path_name(path)])
    if scan_layers:
        model = to_scanned(model)
    return mark_byte_level(model, folder)


def _materialise(cfg: MoEConfig, value_of) -> MoEDecoder:
    """A model of ``cfg`` whose parameter at each state path is ``value_of(path)``.

    Built from an abstract (``nnx.eval_shape``) model, so no random init runs.
    """
    abstract = nnx.eval_shape(lambda: MoEDecoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    values = nnx.from_flat_state([(path, var.replace(jnp.asarray(value_of(path), dtype=var.get_value().dtype)))
                                  for path, var in nnx.to_flat_state(params)])
    return nnx.merge(graphdef, values, rest)


def to_scanned(model: MoEDecoder) -> MoEDecoder:
    """The same weights in the stacked (``scan_layers=True``) form."""
    cfg = model.config.replace(scan_layers=True)
    src = flat_params(model)

    def value_of(path):
        if path[0] == "layers":
            rest = _path_name(path[1:])
            return np.stack([src[f"layers.{i}.{rest}"] for i in range(cfg.n_layers)])
        return src[_path_name(path)]

    return _materialise(cfg, value_of)


def load_default_model(scan_layers: bool = False) -> MoEDecoder:
    """The bundled default model (weights from ``DEFAULT_MODEL_DIR``)."""
    return load_checkpoint(DEFAULT_MODEL_DIR, scan_layers=scan_layers)


# The models shipped in the package, by the name ``--model`` takes.
BUNDLED_MODELS = {"default": DEFAULT_MODEL_DIR, "fine-grained": FINE_GRAINED_MODEL_DIR}


def load_bundled_model(name: str, scan_layers: bool = False) -> MoEDecoder:
    """A bundled model by name: ``default`` (8 experts, top-2) or ``fine-grained`` (32 experts, top-4 + shared)."""
    if name not in BUNDLED_MODELS:
        raise KeyError(f"no bundled model {name!r}; bundled: {', '.join(BUNDLED_MODELS)}")
    return load_checkpoint(BUNDLED_MODELS[name], scan_layers=scan_layers)

