"""Saving and restoring Programs: weights with orbax, structure as a restricted pickle.

A saved program is a directory::

    manifest.json   format version, input signature, weight leaf paths/shapes/dtypes
    structure.pkl   the jaxpr, weight pytree structure, signature and metadata
    weights/        an orbax checkpoint of every weight leaf, by leaf path

The structure pickle refers to JAX primitives by name and is read back with an
unpickler that only accepts classes from jax, numpy, ml_dtypes and moejax, so
loading a program cannot run arbitrary code from other modules. Still, load
programs only from sources you trust: the jaxpr itself is executed.
"""
from __future__ import annotations

import io
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax._src import core as _core
from jax._src import literals as _literals
from jax._src import source_info_util as _siu

from moejax.program import Program

__all__ = ["save_program", "restore_program", "load_weights", "ProgramFormatError", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_ALLOWED_MODULE_PREFIXES = ("jax.", "jaxlib.", "numpy", "ml_dtypes", "moejax.", "collections", "copyreg",
                            "flax.", "_operator")
_ALLOWED_BUILTINS = {"tuple", "list", "dict", "set", "frozenset", "slice", "complex", "float", "int", "bool",
                     "str", "bytes", "bytearray", "range", "object"}


class ProgramFormatError(ValueError):
    """A saved program is missing, corrupt, or does not fit the program it is loaded into."""


def _primitive_table() -> dict[str, Any]:
    """Every Primitive reachable as a module attribute of jax or moejax, by name."""
    table: dict[str, Any] = {}
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name.startswith("jax") or mod_name.startswith("moejax")):
            continue
        for val in list(getattr(mod, "__dict__", {}).values()):
            if isinstance(val, _core.Primitive):
                table.setdefault(val.name, val)
    return table


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _core.Primitive):
            return ("primitive", obj.name)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _siu.SourceInfo):
            return (_siu.new_source_info, ())
        if isinstance(obj, _core.DebugInfo):
            # result_paths may be an unpicklable thunk; keep only plain data
            paths = obj.result_paths if isinstance(obj.result_paths, tuple) else None
            args = tuple(obj.arg_names) if obj.arg_names is not None else None
            return (_core.DebugInfo, (obj.traced_for, obj.func_src_info, args, paths))
        if isinstance(obj, _literals.TypedNdArray):
            # JAX's own __reduce__ passes weak_type where the aval belongs
            return (_literals.TypedNdArray, (np.asarray(obj), obj.aval))
        return NotImplemented


class _Unpickler(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self._prims = _primitive_table()

    def persistent_load(self, pid: Any) -> Any:
        kind, name = pid
        if kind != "primitive" or name not in self._prims:
            raise ProgramFormatError(f"saved program uses primitive {name!r}, unknown in this JAX/moejax "
                                     "installation; import the module that defines it before restoring")
        return self._prims[name]

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _ALLOWED_BUILTINS:
            return super().find_class(module, name)
        if module.startswith(_ALLOWED_MODULE_PREFIXES) or module in ("jax", "numpy", "moejax"):
            return super().find_class(module, name)
        raise ProgramFormatError(f"saved program refers to {module}.{name}, which a program file may not contain")


def _leaf_table(program: Program) -> dict[str, Any]:
    return dict(zip(program.weight_leaf_paths(), program.weight_leaves))


def save_program(program: Program, directory: str | Path) -> None:
    """Write ``program`` to ``directory`` (created; must not exist or be empty)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; choose a new directory to save the program in")
    directory.mkdir(parents=True, exist_ok=True)
    leaves = _leaf_table(program)
    weight_struct = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                           list(program.weights.values()))
    structure = {
        "jaxpr": program.jaxpr,
        "weight_paths": list(program.weights),
        "weight_struct": weight_struct,
        "in_tree": program.in_tree,
        "in_avals": program.in_avals,
        "out_tree": program.out_tree,
        "input_names": program.input_names,
        "metadata": program.metadata,
    }
    buf = io.BytesIO()
    try:
        _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(structure)
    except Exception as e:
        raise ProgramFormatError(f"cannot save this program's structure ({type(e).__name__}: {e}); programs "
                                 "holding live device objects (e.g. a sharded mesh) are saved before sharding") from e
    (directory / "structure.pkl").write_bytes(buf.getvalue())
    arrays = {_key(p): np.asarray(x) for p, x in leaves.items()}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(directory / "weights", arrays)
    ckpt.wait_until_finished()
    manifest = {
        "format": "moejax-program",
        "version": FORMAT_VERSION,
        "signature": program.signature(),
        "weights": {p: {"shape": list(x.shape), "dtype": str(np.dtype(x.dtype))} for p, x in leaves.items()},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _key(path: str) -> str:
    # orbax keys are dict keys; '/' and '.' are fine but keep them unambiguous
    return path.replace("/", "|")


def _read_manifest(directory: Path) -> dict[str, Any]:
    mf = directory / "manifest.json"
    if not mf.exists():
        raise ProgramFormatError(f"{directory} holds no saved moejax program (manifest.json missing)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ProgramFormatError(f"{mf} is corrupt: {e}") from e
    if manifest.get("format") != "moejax-program" or manifest.get("version") != FORMAT_VERSION:
        raise ProgramFormatError(f"{mf}: not a moejax program of format version {FORMAT_VERSION}")
    return manifest


def _read_weights(directory: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    target = {_key(p): jax.ShapeDtypeStruct(tuple(m["shape"]), np.dtype(m["dtype"]))
              for p, m in manifest["weights"].items()}
    try:
        restored = ocp.StandardCheckpointer().restore(directory / "weights", target)
    except Exception as e:
        raise ProgramFormatError(f"cannot read the weights checkpoint in {directory / 'weights'}: "
                                 f"{type(e).__name__}: {e}") from e
    return {p: restored[_key(p)] for p in manifest["weights"]}


def restore_program(directory: str | Path) -> Program:
    """Read a program written by :func:`save_program` (weights bit for bit)."""
    directory = Path(directory).absolute()
    manifest = _read_manifest(directory)
    try:
        structure = _Unpickler(io.BytesIO((directory / "structure.pkl").read_bytes())).load()
    except ProgramFormatError:
        raise
    except Exception as e:
        raise ProgramFormatError(f"{directory / 'structure.pkl'} is corrupt or missing: {type(e).__name__}: {e}") from e
    leaves = _read_weights(directory, manifest)
    flat_struct, treedef = jax.tree_util.tree_flatten(structure["weight_struct"])
    if len(flat_struct) != len(leaves):
        raise ProgramFormatError(f"{directory}: structure has {len(flat_struct)} weight leaves, manifest "
                                 f"{len(leaves)}; the save is incomplete")
    values = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(v) for v in leaves.values()])
    return Program(jaxpr=structure["jaxpr"], weights=dict(zip(structure["weight_paths"], values)),
                   in_tree=structure["in_tree"], in_avals=structure["in_avals"], out_tree=structure["out_tree"],
                   input_names=structure["input_names"], metadata=structure["metadata"])


def load_weights(program: Program, directory: str | Path) -> Program:
    """``program`` with the weights saved in ``directory`` (which must match it exactly).

    Fails with the list of mismatching tensors when the saved program came from
    another model or another pipeline (e.g. quantized weights onto a float program).
    """
    directory = Path(directory).absolute()
    manifest = _read_manifest(directory)
    mine = {p: (list(x.shape), str(np.dtype(x.dtype))) for p, x in _leaf_table(program).items()}
    theirs = {p: (m["shape"], m["dtype"]) for p, m in manifest["weights"].items()}
    problems = [f"missing in the checkpoint: {p}" for p in mine if p not in theirs]
    problems += [f"not in this program: {p}" for p in theirs if p not in mine]
    problems += [f"{p}: program has {mine[p][1]}{mine[p][0]}, checkpoint {theirs[p][1]}{theirs[p][0]}"
                 for p in mine if p in theirs and mine[p] != theirs[p]]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ProgramFormatError(f"the weights in {directory} do not fit this program ({shown}); load them into "
                                 "the program they were saved from (same model and pipeline)")
    leaves = _read_weights(directory, manifest)
    treedef = jax.tree_util.tree_structure(list(program.weights.values()))
    values = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(leaves[p]) for p in mine])
    return program.replace(weights=dict(zip(program.weights, values)))
