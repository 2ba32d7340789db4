"""Saving, restoring and exporting Programs.

A saved program is a directory::

    manifest.json   format version, input signature, and per weight leaf (in jaxpr order):
                    path, shape, dtype and sha256 of its bytes
    structure.pkl   the jaxpr, weight pytree structure, signature and metadata (restricted pickle)
    weights/        an orbax checkpoint of every weight leaf, by leaf path

What :func:`restore_program` guarantees
---------------------------------------
* **Loading runs no code chosen by the file.** ``structure.pkl`` is read by a
  pure-Python unpickler with an explicit allow-list of ``(module, qualname)``
  pairs (no module prefixes, no ``builtins``/``_operator``/``copyreg``/
  ``functools`` callables, never a module). Allow-listed objects come in two
  kinds: *constructible* data classes (JAX's jaxpr classes and avals, pytree
  definitions, enums and named tuples used in primitive params, moejax's
  ``Routing`` and every registered weight-format class, and moejax-owned
  constructors that build numpy arrays/dtypes/scalars from bytes), which alone
  may be applied by ``REDUCE``/``NEWOBJ``/``BUILD``; and *referenced* values
  (JAX's pytree registry), which can only be placed in the structure, never
  called or mutated. Primitives are stored by name and looked up among the
  primitives defined by the installed jax/moejax; functions in primitive params
  that are not on the allow-list (e.g. ``custom_jvp`` rules, which are
  closures) are not stored: the restored program runs forward, and
  differentiating through such a rule raises a clear error.
* **A tampered or corrupt save fails at restore** with one-line
  :class:`ProgramFormatError` that names the problem: the jaxpr must
  type-check; the manifest's leaf paths must equal the structure's (same set,
  same order); every leaf's shape and dtype must agree between the manifest,
  the structure's weight pytree, the jaxpr's weight inputs, the checkpoint and
  the restored array; every restored leaf must match its sha256 in the manifest.
* An untampered save restores bit for bit (weights and outputs); ``jax.Array``
  values in metadata come back as numpy arrays. :func:`save_program` reads the
  structure back with the restricted reader before writing anything, so a
  program that saves also restores (an unsaveable one fails at save, naming
  the object that is not on the allow-list).

What it does not guarantee
--------------------------
* A file crafted to match all checks (a consistent manifest, structure and
  checksums) is simply a *different program*: restoring it runs whatever
  computation its jaxpr describes, with the restored weights. Restore programs
  only from sources you trust to give you the right model.
* Resource exhaustion (a huge or deeply nested structure file) is not guarded.
* Registered weight-format classes (``moejax.weight_formats.register_format``)
  are constructible by the file; a plugin that registers a format is trusted
  to keep its dataclass free of side effects.

Export for serving
------------------
:func:`export_program` writes a ``jax.export`` artifact (serialized StableHLO
with every dialect op inlined), the weights as safetensors and a JSON input
signature; :func:`load_exported` reads it back with only jax, numpy and
safetensors (no moejax code and no pickle involved).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import pickle
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax._src import core as _core
from jax._src import literals as _literals
from jax._src import source_info_util as _siu

from moejax.program import Program

__all__ = ["save_program", "restore_program", "load_weights", "ProgramFormatError", "FORMAT_VERSION",
           "export_program", "load_exported", "ExportedModel", "EXPORT_FORMAT_VERSION"]

FORMAT_VERSION = 2  # 2: arrays/dtypes stored as bytes, allow-list unpickler, checksummed manifest
EXPORT_FORMAT_VERSION = 1
_STRUCTURE_KEYS = ("jaxpr", "weight_paths", "weight_struct", "in_tree", "in_avals", "out_tree", "input_names",
                   "metadata")


class ProgramFormatError(ValueError):
    """A saved program is missing, corrupt, tampered with, or does not fit the program it is loaded into."""


def _one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (errors from JAX/orbax can span pages)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = msg if len(msg) <= limit else msg[:limit] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# --------------------------------------------------------------------------
# Values the structure pickle builds through moejax-owned constructors.
# --------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _dtype_table() -> dict[str, np.dtype]:
    """Every dtype a saved program may use, by name: numpy's numeric dtypes and ml_dtypes' (no object dtype)."""
    import ml_dtypes

    names = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
             "float32", "float64", "complex64", "complex128"]
    table = {n: np.dtype(n) for n in names}
    for n in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz",
              "float8_e3m4", "float8_e4m3", "float8_e8m0fnu", "float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn",
              "int2", "int4", "uint2", "uint4"):
        if hasattr(ml_dtypes, n):
            table[n] = np.dtype(getattr(ml_dtypes, n))
    return table


def _dtype_from_name(name: str) -> np.dtype:
    """A numpy dtype from its name; only the dtypes of :func:`_dtype_table`."""
    try:
        return _dtype_table()[name]
    except (KeyError, TypeError):
        raise ProgramFormatError(f"saved program uses dtype {name!r}, which a program file may not contain") from None


def _array_from_bytes(dtype: str, shape: tuple[int, ...], data: bytes) -> np.ndarray:
    """A fresh numpy array of ``dtype``/``shape`` from its C-order bytes."""
    dt = _dtype_from_name(dtype)
    if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape) and isinstance(data, bytes)):
        raise ProgramFormatError("saved program holds a malformed array")
    if int(np.prod(shape, dtype=np.int64)) * dt.itemsize != len(data):
        raise ProgramFormatError(f"saved program holds an array of shape {shape} with {len(data)} bytes of data")
    return np.frombuffer(data, dtype=dt).reshape(shape).copy()


def _scalar_from_bytes(dtype: str, data: bytes) -> np.generic:
    """A numpy scalar from its bytes."""
    return _array_from_bytes(dtype, (), data)[()]


def _empty_concrete_mesh() -> Any:
    """JAX's empty concrete mesh (the ``ctx_mesh`` of jit eqns traced outside any mesh)."""
    from jax._src import mesh as mesh_lib

    return mesh_lib.empty_concrete_mesh


class _UnavailableFunction:
    """Stands in for a function that a saved program does not store (e.g. a ``custom_jvp`` rule)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ProgramFormatError(f"function {self.name!r} is not stored in saved programs (restored programs run "
                                 "forward only); differentiate or transform the original model instead")

    def __repr__(self) -> str:
        return f"<not saved: {self.name}>"


# --------------------------------------------------------------------------
# The allow-list (derived by instrumenting saves of real programs; see tests/test_serialization.py).
# --------------------------------------------------------------------------
def _format_classes() -> list[type]:
    """Weight-format classes: every class registered with :func:`moejax.weight_formats.register_format`."""
    from moejax import expert_layout, weight_formats  # noqa: F401 - expert_layout registers PerExpertWeights

    return list(weight_formats.registered_formats().values())


def _jax_param_classes() -> list[type]:
    """Enums and named tuples that appear in primitive params (reviewed: plain data)."""
    import importlib

    found = []
    for mod, names in (("jax._src.lax.slicing", ("GatherDimensionNumbers", "ScatterDimensionNumbers",
                                                 "GatherScatterMode")),
                       ("jax._src.lax.lax", ("Precision", "RoundingMethod", "DotAlgorithmPreset", "AccuracyMode",
                                             "Tolerance", "FftType")),
                       ("jax._src.lax.convolution", ("ConvDimensionNumbers",)),
                       ("jax._src.lax.fft", ("FftType",)),
                       ("jax._src.lax.windowed_reductions", ()),
                       ("jax._src.mesh", ("AxisType",)),
                       ("jax._src.core", ("MemorySpace", "ManualAxisType"))):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        found += [getattr(m, n) for n in names if isinstance(getattr(m, n, None), type)]
    return found


@dataclasses.dataclass(frozen=True)
class _AllowList:
    constructible: dict[tuple[str, str], Any]  # may be called by REDUCE/NEWOBJ (and referenced)
    buildable: frozenset[type]  # instances of these (created during this load) may receive BUILD
    referenced: dict[tuple[str, str], Any]  # may only be placed in the structure

    def lookup(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in self.constructible:
            return self.constructible[key]
        if key in self.referenced:
            return self.referenced[key]
        raise KeyError(key)

    def objects(self) -> dict[int, Any]:
        return {id(o): o for o in (*self.constructible.values(), *self.referenced.values())}


def _key(obj: Any) -> tuple[str, str]:
    return obj.__module__, obj.__qualname__


def allow_list() -> _AllowList:
    """The objects a structure file may name, built from the objects themselves (never from names in a file)."""
    from jax._src import linear_util as lu
    from jax._src import mesh as mesh_lib
    from jax._src import named_sharding
    from jax._src import tree_util
    from jaxlib._jax import pytree as _pytree

    from moejax import dialect

    # Each is a side-effect-free data class or constructor (reviewed).
    data_classes = [
        _core.ClosedJaxpr, _core.Jaxpr, _core.JaxprEqn, _core.Var, _core.Literal, _core.ShapedArray,
        _core.JaxprEqnContext,  # NEWOBJ with no args: the current (empty) tracing context, interned
        lu.DebugInfo, jax.ShapeDtypeStruct, jax.sharding.PartitionSpec, mesh_lib.AbstractMesh,
        named_sharding.UnspecifiedValue, _pytree.PyTreeDef, dialect.Routing,
        *[getattr(_literals, n) for n in ("TypedInt", "TypedFloat", "TypedComplex", "TypedNdArray")
          if hasattr(_literals, n)],
        *_jax_param_classes(), *_format_classes(),
    ]
    constructors = [_siu.new_source_info, named_sharding._unpickle_named_sharding, _array_from_bytes,
                    _dtype_from_name, _scalar_from_bytes, _empty_concrete_mesh]
    constructible = {_key(o): o for o in [*data_classes, *constructors]}
    constructible[("jax", "P")] = jax.P  # PartitionSpec pickles under its public alias
    # BUILD sets fields; only classes whose pickles carry their state that way (as observed in real saves).
    buildable = frozenset([_core.ClosedJaxpr, _core.Jaxpr, _core.JaxprEqn, _core.Var, _core.Literal,
                           jax.ShapeDtypeStruct, _pytree.PyTreeDef, dialect.Routing,
                           *[getattr(_literals, n) for n in ("TypedInt", "TypedFloat", "TypedComplex")
                             if hasattr(_literals, n)], *_format_classes()])
    referenced = {("jax._src.tree_util", "default_registry"): tree_util.default_registry}
    return _AllowList(constructible, buildable, referenced)


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


from jax._src import linear_util as _lu  # noqa: E402

# Callables that may sit in primitive params; unless allow-listed they are not stored (see _UnavailableFunction).
_FUNCTION_TYPES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial, _lu.WrappedFun)


class _Pickler(pickle.Pickler):
    """Writes only what :class:`_SafeUnpickler` accepts; refuses anything else with the object's name."""

    def __init__(self, f: io.BytesIO, allowed: _AllowList):
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self._allowed_ids = allowed.objects()

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _core.Primitive):
            return ("primitive", obj.name)
        if isinstance(obj, _FUNCTION_TYPES) and id(obj) not in self._allowed_ids:
            # closures in primitive params (custom_jvp rules): forward evaluation never calls them
            kind = "unavailable-wrapped" if isinstance(obj, _lu.WrappedFun) else "unavailable"
            return (kind, str(getattr(obj, "__qualname__", None) or getattr(obj, "__name__", type(obj).__name__)))
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _siu.SourceInfo):
            return (_siu.new_source_info, ())
        if isinstance(obj, _core.DebugInfo):
            # result_paths may be an unpicklable thunk; keep only plain data
            paths = obj.result_paths if isinstance(obj.result_paths, tuple) else None
            args = tuple(obj.arg_names) if obj.arg_names is not None else None
            return (type(obj), (obj.traced_for, obj.func_src_info, args, paths))
        if isinstance(obj, _literals.TypedNdArray):
            # JAX's own __reduce__ passes weak_type where the aval belongs
            return (_literals.TypedNdArray, (obj.view(np.ndarray), obj.aval))
        if isinstance(obj, np.dtype):
            return (_dtype_from_name, (_saveable_dtype(obj),))
        if isinstance(obj, (np.ndarray, jax.Array)):
            arr = np.asarray(obj)
            return (_array_from_bytes, (_saveable_dtype(arr.dtype), tuple(int(d) for d in arr.shape),
                                        arr.tobytes()))
        if isinstance(obj, np.generic):
            return (_scalar_from_bytes, (_saveable_dtype(obj.dtype), obj.tobytes()))
        if isinstance(obj, jax.sharding.Mesh):
            if obj.empty:
                return (_empty_concrete_mesh, ())
            raise ProgramFormatError("cannot save a program that holds a device mesh; save it before sharding")
        if isinstance(obj, (type, *_FUNCTION_TYPES)) and id(obj) not in self._allowed_ids:
            name = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"
            raise ProgramFormatError(f"cannot save this program: it holds {name}, which is not on the saved-program "
                                     "allow-list (moejax.serialization.allow_list); keep metadata to plain data, or "
                                     "add the class to the allow-list after checking it is side-effect free")
        return NotImplemented


def _saveable_dtype(dt: np.dtype) -> str:
    name = np.dtype(dt).name
    if name not in _dtype_table() or _dtype_table()[name] != dt:
        raise ProgramFormatError(f"cannot save this program: it holds an array of dtype {dt}, which a program file "
                                 "may not contain (numeric numpy and ml_dtypes dtypes only)")
    return name


class _SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler: every opcode can be checked
    """Reads a structure file; only allow-listed objects are named, only constructible ones are applied."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, allowed: _AllowList):
        super().__init__(io.BytesIO(data))
        self._allowed = allowed
        self._constructible_ids = {id(o) for o in allowed.constructible.values()}
        self._fresh: dict[int, Any] = {}  # objects constructed by this load (kept alive so ids stay unique)
        self._prims = _primitive_table()

    def _refuse(self, what: str) -> ProgramFormatError:
        return ProgramFormatError(f"structure.pkl {what}; a program file may not do this, so it was not written by "
                                  "moejax's save_program: do not load it")

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed.lookup(module, name)
        except KeyError:
            raise self._refuse(f"names {module}.{name}, which is not on the saved-program allow-list") from None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 2 and all(isinstance(p, str) for p in pid)):
            raise self._refuse("holds a malformed persistent id")
        kind, name = pid
        if kind == "unavailable":
            return _UnavailableFunction(name)
        if kind == "unavailable-wrapped":  # JAX reads a WrappedFun's debug info even when it never calls it
            return _lu.wrap_init(_UnavailableFunction(name), debug_info=_lu.DebugInfo("restored", name, None, None))
        if kind != "primitive":
            raise self._refuse(f"holds a persistent id of unknown kind {kind!r}")
        if name not in self._prims:
            raise ProgramFormatError(f"saved program uses primitive {name!r}, unknown in this JAX/moejax "
                                     "installation; import the module that defines it before restoring")
        return self._prims[name]

    def _constructed(self, obj: Any) -> Any:
        self._fresh[id(obj)] = obj
        return obj

    def _check_constructor(self, func: Any, opcode: str) -> None:
        if id(func) not in self._constructible_ids:
            what = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', type(func).__name__)}"
            raise self._refuse(f"applies {opcode} to {what}, which may not be called while loading")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        self._check_constructor(func, "REDUCE")
        if type(args) is not tuple:
            raise self._refuse("applies REDUCE to non-tuple arguments")
        self.stack[-1] = self._constructed(func(*args))

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_constructor(cls, "NEWOBJ")
        if type(args) is not tuple or not isinstance(cls, type):
            raise self._refuse("applies NEWOBJ wrongly")
        self.append(self._constructed(cls.__new__(cls, *args)))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_constructor(cls, "NEWOBJ_EX")
        if type(args) is not tuple or type(kwargs) is not dict or not isinstance(cls, type):
            raise self._refuse("applies NEWOBJ_EX wrongly")
        self.append(self._constructed(cls.__new__(cls, *args, **kwargs)))

    def load_build(self) -> None:
        state = self.stack[-1]
        inst = self.stack[-2]
        if type(inst) not in self._allowed.buildable or id(inst) not in self._fresh:
            raise self._refuse(f"sets the state of a {type(inst).__module__}.{type(inst).__qualname__} "
                               "it did not construct (BUILD)")
        if getattr(type(inst), "__setstate__", None) is None:
            # field updates only: no dunder attributes (e.g. __class__), no non-str keys
            parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
            for part in parts:
                if part is None:
                    continue
                if type(part) is not dict or any(type(k) is not str or k.startswith("__") for k in part):
                    raise self._refuse(f"sets a {type(inst).__qualname__} from malformed state")
        super().load_build()
        post_init = getattr(type(inst), "__post_init__", None)
        if dataclasses.is_dataclass(inst) and post_init is not None:  # BUILD skips the constructor's checks
            try:
                post_init(inst)
            except (ValueError, TypeError) as e:
                raise self._refuse(f"holds an invalid {type(inst).__qualname__} ({e})") from None

    def _refuse_opcode(self, opcode: str) -> None:
        raise self._refuse(f"uses the {opcode} opcode (protocol 0/1 instantiation)")

    def load_append(self) -> None:
        self._check_container(self.stack[-2], list, "APPEND")
        super().load_append()

    def load_setitem(self) -> None:
        self._check_container(self.stack[-3], dict, "SETITEM")
        super().load_setitem()

    # APPENDS/SETITEMS/ADDITEMS: the items sit above the MARK; the target is the top of the stack below it
    def load_appends(self) -> None:
        self._check_container(self._below_mark(), list, "APPENDS")
        super().load_appends()

    def load_setitems(self) -> None:
        self._check_container(self._below_mark(), dict, "SETITEMS")
        super().load_setitems()

    def load_additems(self) -> None:
        self._check_container(self._below_mark(), set, "ADDITEMS")
        super().load_additems()

    def _below_mark(self) -> Any:
        return self.metastack[-1][-1] if self.metastack and self.metastack[-1] else None

    def _check_container(self, target: Any, want: type, opcode: str) -> None:
        # exact builtin containers only: a method call on anything else could be a side effect
        if type(target) is not want:
            raise self._refuse(f"applies {opcode} to a {type(target).__qualname__}")

    def get_extension(self, code: int) -> None:
        raise self._refuse("uses the copyreg extension registry (EXT opcodes)")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.ADDITEMS[0]] = load_additems
    dispatch[pickle.INST[0]] = lambda self: self._refuse_opcode("INST")
    dispatch[pickle.OBJ[0]] = lambda self: self._refuse_opcode("OBJ")


# Primitives whose function-valued params are derivative rules only: forward evaluation never calls them.
_DERIVATIVE_RULE_PRIMITIVES = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})


def _check_no_host_functions(program: Program) -> None:
    """Refuse programs whose forward pass calls a Python function (``pure_callback`` ...): it cannot be stored."""
    from moejax import rewrite  # local: rewrite imports the dialect, which serialization does not otherwise need

    allowed = allow_list().objects()
    for site in rewrite.iter_eqns(program.jaxpr):
        if site.eqn.primitive.name in _DERIVATIVE_RULE_PRIMITIVES:
            continue
        for key, val in site.eqn.params.items():
            if isinstance(val, _FUNCTION_TYPES) and id(val) not in allowed:
                raise ProgramFormatError(f"cannot save this program: {site} calls the Python function {key}="
                                         f"{getattr(val, '__qualname__', type(val).__name__)}, which a saved program "
                                         "cannot hold; remove the callback from the model before saving")


def _dump_structure(program: Program) -> bytes:
    _check_no_host_functions(program)
    structure = {
        "jaxpr": program.jaxpr,
        "weight_paths": list(program.weights),
        "weight_struct": _weight_struct(program),
        "in_tree": program.in_tree,
        "in_avals": program.in_avals,
        "out_tree": program.out_tree,
        "input_names": program.input_names,
        "metadata": program.metadata,
    }
    buf = io.BytesIO()
    try:
        _Pickler(buf, allow_list()).dump(structure)
    except ProgramFormatError:
        raise
    except Exception as e:
        raise ProgramFormatError(f"cannot save this program's structure ({_one_line(e)}); keep metadata to plain "
                                 "data, and save programs before sharding them") from e
    return buf.getvalue()


def _weight_struct(program: Program) -> list[Any]:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), list(program.weights.values()))


def _load_structure(data: bytes, where: Path) -> Program:
    """The Program (weights as ShapeDtypeStructs) a structure file describes, checked for consistency."""
    try:
        structure = _SafeUnpickler(data, allow_list()).load()
    except ProgramFormatError:
        raise
    except RecursionError:
        raise ProgramFormatError(f"{where} is nested too deeply to read; save the program again") from None
    except Exception as e:
        raise ProgramFormatError(f"{where} is corrupt or truncated ({_one_line(e)}); save the program again") from e
    if type(structure) is not dict or set(structure) != set(_STRUCTURE_KEYS):
        raise ProgramFormatError(f"{where} does not hold a program structure; save the program again")
    s = structure
    ok = (isinstance(s["jaxpr"], _core.ClosedJaxpr) and type(s["weight_paths"]) is list
          and all(type(p) is str for p in s["weight_paths"]) and len(set(s["weight_paths"])) == len(s["weight_paths"])
          and type(s["weight_struct"]) is list and len(s["weight_struct"]) == len(s["weight_paths"])
          and all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(s["weight_struct"]))
          and isinstance(s["in_tree"], jax.tree_util.PyTreeDef) and isinstance(s["out_tree"], jax.tree_util.PyTreeDef)
          and type(s["in_avals"]) is tuple and all(isinstance(a, _core.ShapedArray) for a in s["in_avals"])
          and type(s["input_names"]) is tuple and all(type(n) is str for n in s["input_names"])
          and type(s["metadata"]) is dict)
    if not ok:
        raise ProgramFormatError(f"{where}: a field of the program structure has the wrong type; save the program "
                                 "again")
    program = Program(jaxpr=s["jaxpr"], weights=dict(zip(s["weight_paths"], s["weight_struct"])), in_tree=s["in_tree"],
                      in_avals=s["in_avals"], out_tree=s["out_tree"], input_names=s["input_names"],
                      metadata=s["metadata"])
    _check_jaxpr(program, where)
    return program


def _fmt(shape: Sequence[int], dtype: Any) -> str:
    return f"{np.dtype(dtype).name}[{','.join(map(str, shape))}]"


def _check_jaxpr(program: Program, where: Path) -> None:
    """The jaxpr type-checks and its inputs are the weight leaves then the inputs, with their avals."""
    jaxpr = program.jaxpr.jaxpr
    try:
        _core.check_jaxpr(jaxpr)
    except Exception as e:
        raise ProgramFormatError(f"{where}: the jaxpr does not type-check ({_one_line(e, 200)}); the file was edited "
                                 "or corrupted: save the program again") from e
    leaves = program.weight_leaves
    n_w, n_in = len(leaves), len(program.in_avals)
    if len(jaxpr.invars) != n_w + n_in or program.in_tree.num_leaves != n_in:
        raise ProgramFormatError(f"{where}: the jaxpr takes {len(jaxpr.invars)} inputs but the structure has {n_w} "
                                 f"weight leaves and {n_in} inputs; save the program again")
    if program.out_tree.num_leaves != len(jaxpr.outvars) or len(program.input_names) not in (0, n_in):
        raise ProgramFormatError(f"{where}: the output tree or input names do not fit the jaxpr's "
                                 f"{len(jaxpr.outvars)} outputs and {n_in} inputs; save the program again")
    for path, leaf, var in zip(program.weight_leaf_paths(), leaves, jaxpr.invars):
        if (tuple(leaf.shape), np.dtype(leaf.dtype)) != (tuple(var.aval.shape), np.dtype(var.aval.dtype)):
            raise ProgramFormatError(f"{where}: weight {path!r} is {_fmt(leaf.shape, leaf.dtype)} but the jaxpr reads "
                                     f"{_fmt(var.aval.shape, var.aval.dtype)}; the file was edited: save the "
                                     "program again")
    for i, (aval, var) in enumerate(zip(program.in_avals, jaxpr.invars[n_w:])):
        if (tuple(aval.shape), aval.dtype) != (tuple(var.aval.shape), var.aval.dtype):
            raise ProgramFormatError(f"{where}: input {i} is {_fmt(aval.shape, aval.dtype)} but the jaxpr reads "
                                     f"{_fmt(var.aval.shape, var.aval.dtype)}; the file was edited: save the "
                                     "program again")


# --------------------------------------------------------------------------
# Save / restore.
# --------------------------------------------------------------------------
def _ckpt_key(path: str) -> str:
    # orbax keys are dict keys; '/' would nest, so keep paths flat and unambiguous
    return path.replace("/", "|")


def _sha256(x: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(x).tobytes(order="C")).hexdigest()


def save_program(program: Program, directory: str | Path) -> None:
    """Write ``program`` to ``directory`` (created; must not exist or be empty)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; choose a new directory to save the program in")
    data = _dump_structure(program)  # before touching the directory: an unsaveable program leaves nothing behind
    # A save must restore: read the structure back with the restricted reader now, not at restore time.
    _load_structure(data, directory / "structure.pkl")
    arrays = {p: np.asarray(x) for p, x in zip(program.weight_leaf_paths(), program.weight_leaves)}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "structure.pkl").write_bytes(data)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(directory / "weights", {_ckpt_key(p): x for p, x in arrays.items()})
    ckpt.wait_until_finished()
    manifest = {
        "format": "moejax-program",
        "version": FORMAT_VERSION,
        "signature": program.signature(),
        "weights": [{"path": p, "shape": list(x.shape), "dtype": np.dtype(x.dtype).name, "sha256": _sha256(x)}
                    for p, x in arrays.items()],
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _read_manifest(directory: Path) -> dict[str, Any]:
    mf = directory / "manifest.json"
    if not mf.exists():
        raise ProgramFormatError(f"{directory} holds no saved moejax program (manifest.json missing)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProgramFormatError(f"{mf} is corrupt ({_one_line(e)}); save the program again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != "moejax-program":
        raise ProgramFormatError(f"{mf} does not describe a moejax program")
    if manifest.get("version") != FORMAT_VERSION:
        raise ProgramFormatError(f"{mf}: format version {manifest.get('version')!r}, this moejax reads version "
                                 f"{FORMAT_VERSION}; save the program again with this moejax")
    entries = manifest.get("weights")
    keys = {"path", "shape", "dtype", "sha256"}
    if not (isinstance(entries, list) and all(isinstance(w, dict) and set(w) == keys and isinstance(w["path"], str)
                                              and isinstance(w["shape"], list) and isinstance(w["dtype"], str)
                                              for w in entries)):
        raise ProgramFormatError(f"{mf}: the weights table is malformed; save the program again")
    return manifest


def _check_manifest(manifest: dict[str, Any], program: Program, directory: Path) -> None:
    """Manifest paths, order, shapes and dtypes equal the structure's weight leaves."""
    mine = program.weight_leaf_paths()
    theirs = [w["path"] for w in manifest["weights"]]
    fix = "the manifest or weights were edited or come from another save: save the program again"
    if set(mine) != set(theirs) or len(theirs) != len(mine):
        missing = [p for p in mine if p not in theirs]
        extra = [p for p in theirs if p not in mine]
        what = (f"lacks weight {missing[0]!r}" if missing else
                f"lists weight {extra[0]!r}, which the program does not have" if extra else "lists a weight twice")
        raise ProgramFormatError(f"{directory / 'manifest.json'} {what} ({len(missing)} missing, {len(extra)} "
                                 f"unknown); {fix}")
    if theirs != mine:
        i = next(i for i, (a, b) in enumerate(zip(theirs, mine)) if a != b)
        raise ProgramFormatError(f"{directory / 'manifest.json'} lists the weights in another order than the program "
                                 f"(position {i}: {theirs[i]!r}, the program has {mine[i]!r}); {fix}")
    for w, leaf in zip(manifest["weights"], program.weight_leaves):
        if (tuple(w["shape"]), w["dtype"]) != (tuple(leaf.shape), np.dtype(leaf.dtype).name):
            raise ProgramFormatError(f"{directory / 'manifest.json'}: weight {w['path']!r} is listed as "
                                     f"{w['dtype']}{list(w['shape'])} but the program has "
                                     f"{_fmt(leaf.shape, leaf.dtype)}; {fix}")
    if manifest.get("signature") != program.signature():
        raise ProgramFormatError(f"{directory / 'manifest.json'}: signature {manifest.get('signature')!r} differs from "
                                 f"the program's {program.signature()}; {fix}")


def _read_weights(directory: Path, manifest: dict[str, Any], program: Program) -> list[np.ndarray]:
    """The weight leaves, in order, each checked against the program's leaf and the manifest's checksum."""
    import orbax.checkpoint as ocp

    paths = program.weight_leaf_paths()
    structs = program.weight_leaves
    where = directory / "weights"
    if not where.is_dir():
        raise ProgramFormatError(f"{where} is missing; the save is incomplete: save the program again")
    ckpt = ocp.StandardCheckpointer()
    try:  # what the checkpoint actually holds, before orbax casts anything to the target
        stored = dict(ckpt.metadata(where).item_metadata.items())
    except Exception as e:
        raise ProgramFormatError(f"cannot read the weights checkpoint in {where} ({_one_line(e)}); the save is "
                                 "incomplete or corrupt: save the program again") from e
    for p, s in zip(paths, structs):
        m = stored.get(_ckpt_key(p))
        if m is None:
            raise ProgramFormatError(f"{where} lacks weight {p!r}; the save is incomplete: save the program again")
        if (tuple(m.shape), np.dtype(m.dtype)) != (tuple(s.shape), np.dtype(s.dtype)):
            raise ProgramFormatError(f"{where}: weight {p!r} is stored as {_fmt(m.shape, m.dtype)} but the program has "
                                     f"{_fmt(s.shape, s.dtype)}; the weights come from another save")
    target = {_ckpt_key(p): jax.ShapeDtypeStruct(tuple(s.shape), s.dtype) for p, s in zip(paths, structs)}
    try:
        restored = ckpt.restore(where, target)
    except Exception as e:
        raise ProgramFormatError(f"cannot read the weights checkpoint in {where} ({_one_line(e)}); save the program "
                                 "again") from e
    out = []
    for p, s, w in zip(paths, structs, manifest["weights"]):
        x = np.asarray(restored[_ckpt_key(p)])
        if (x.shape, x.dtype) != (tuple(s.shape), np.dtype(s.dtype)):
            raise ProgramFormatError(f"{where}: weight {p!r} restored as {_fmt(x.shape, x.dtype)}, expected "
                                     f"{_fmt(s.shape, s.dtype)}; save the program again")
        if _sha256(x) != w["sha256"]:
            raise ProgramFormatError(f"{where}: weight {p!r} does not match its checksum in manifest.json; the weights "
                                     "are corrupt or come from another save: save the program again")
        out.append(x)
    return out


def restore_program(directory: str | Path) -> Program:
    """Read a program written by :func:`save_program` (weights bit for bit); see the module doc for the checks."""
    directory = Path(directory).absolute()
    manifest = _read_manifest(directory)
    sf = directory / "structure.pkl"
    if not sf.is_file():
        raise ProgramFormatError(f"{sf} is missing; the save is incomplete: save the program again")
    skeleton = _load_structure(sf.read_bytes(), sf)
    _check_manifest(manifest, skeleton, directory)
    leaves = _read_weights(directory, manifest, skeleton)
    treedef = jax.tree_util.tree_structure(list(skeleton.weights.values()))
    values = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in leaves])
    return skeleton.replace(weights=dict(zip(skeleton.weights, values)))


def load_weights(program: Program, directory: str | Path) -> Program:
    """``program`` with the weights saved in ``directory`` (which must match it exactly).

    Fails with the list of mismatching tensors when the saved program came from
    another model or another pipeline (e.g. quantized weights onto a float program).
    """
    directory = Path(directory).absolute()
    manifest = _read_manifest(directory)
    mine = {p: (list(x.shape), np.dtype(x.dtype).name) for p, x in zip(program.weight_leaf_paths(),
                                                                        program.weight_leaves)}
    theirs = {w["path"]: (w["shape"], w["dtype"]) for w in manifest["weights"]}
    problems = [f"missing in the checkpoint: {p}" for p in mine if p not in theirs]
    problems += [f"not in this program: {p}" for p in theirs if p not in mine]
    problems += [f"{p}: program has {mine[p][1]}{mine[p][0]}, checkpoint {theirs[p][1]}{theirs[p][0]}"
                 for p in mine if p in theirs and mine[p] != theirs[p]]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ProgramFormatError(f"the weights in {directory} do not fit this program ({shown}); load them into "
                                 "the program they were saved from (same model and pipeline)")
    by_path = {w["path"]: w for w in manifest["weights"]}
    ordered = {**manifest, "weights": [by_path[p] for p in mine]}
    leaves = _read_weights(directory, ordered, program)
    treedef = jax.tree_util.tree_structure(list(program.weights.values()))
    values = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in leaves])
    return program.replace(weights=dict(zip(program.weights, values)))


# --------------------------------------------------------------------------
# Export for serving without moejax.
# --------------------------------------------------------------------------
# dtypes safetensors stores natively; others are stored as their bytes (uint8) and re-viewed on load
_SAFETENSORS_NATIVE = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
                       "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2"}


def export_program(program: Program, directory: str | Path, platforms: Sequence[str] = ("cpu",)) -> Path:
    """Write ``program`` as a ``jax.export`` artifact that runs without moejax.

    ``directory`` gets ``model.jaxexport`` (serialized StableHLO, every dialect op
    inlined; weights are arguments, not constants), ``weights.safetensors`` (the
    weight leaves by path) and ``signature.json`` (inputs, outputs, weight
    order). Read it with :func:`load_exported`. ``platforms`` are the lowering
    targets (e.g. ``("cpu", "cuda")``); lowering needs no device of that kind.
    """
    from jax.extend import core as jcore
    from safetensors.numpy import save_file

    from moejax import lowering, native_ffn

    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; choose a new directory to export the program to")
    # plain JAX without moejax's custom calls: the artifact must not need moejax's lowering rules or C++ library
    low = lowering.inline_dialect(native_ffn.portable(program))
    closed = low.jaxpr

    def fn(weights: list[jax.Array], *inputs: jax.Array) -> list[jax.Array]:
        return jcore.jaxpr_as_fun(closed)(*weights, *inputs)

    weight_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in low.weight_leaves]
    input_specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in low.in_avals]
    try:
        exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(weight_specs, *input_specs)
        blob = exported.serialize()
    except Exception as e:
        raise ProgramFormatError(f"cannot export this program for platforms {tuple(platforms)} ({_one_line(e)})") from e
    paths = low.weight_leaf_paths()
    tensors, weights_meta = {}, []
    for p, x in zip(paths, low.weight_leaves):
        arr = np.array(x, order="C")  # a C-order copy: safetensors writes its buffer
        dt = arr.dtype.name
        tensors[p] = arr if dt in _SAFETENSORS_NATIVE else arr.reshape(-1).view(np.uint8)
        weights_meta.append({"path": p, "shape": list(arr.shape), "dtype": dt})
    in_names = low.input_names or tuple(f"in{i}" for i in range(len(low.in_avals)))
    signature = {
        "format": "moejax-export", "version": EXPORT_FORMAT_VERSION, "platforms": list(exported.platforms),
        "inputs": [{"name": n, "shape": list(a.shape), "dtype": np.dtype(a.dtype).name}
                   for n, a in zip(in_names, low.in_avals)],
        "outputs": [{"shape": list(a.shape), "dtype": np.dtype(a.dtype).name} for a in exported.out_avals],
        "weights": weights_meta,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.jaxexport").write_bytes(bytes(blob))
    save_file(tensors, str(directory / "weights.safetensors"))
    (directory / "signature.json").write_text(json.dumps(signature, indent=1))
    return directory


class ExportedModel:
    """An exported program loaded with jax + numpy + safetensors only.

    Call it with the input leaves in signature order (``model(tokens)``); it
    returns the single output, or a tuple of outputs when there are several.
    """

    def __init__(self, exported: Any, weights: list[Any], signature: dict[str, Any]):
        self.exported = exported
        self.weights = weights
        self.signature = signature
        self.input_names = tuple(i["name"] for i in signature["inputs"])
        self._call = jax.jit(exported.call)

    def __call__(self, *inputs: Any) -> Any:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"this exported model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}),"
                            f" got {len(inputs)}")
        outs = self._call(self.weights, *inputs)
        return outs[0] if len(outs) == 1 else tuple(outs)


def load_exported(directory: str | Path) -> ExportedModel:
    """Load what :func:`export_program` wrote; uses only ``jax.export``, numpy and safetensors."""
    from safetensors.numpy import load_file

    directory = Path(directory).absolute()
    try:
        signature = json.loads((directory / "signature.json").read_text())
        exported = jax.export.deserialize(bytearray((directory / "model.jaxexport").read_bytes()))
        tensors = load_file(str(directory / "weights.safetensors"))
    except Exception as e:
        raise ProgramFormatError(f"{directory} does not hold a readable moejax export ({_one_line(e)})") from e
    if signature.get("format") != "moejax-export" or signature.get("version") != EXPORT_FORMAT_VERSION:
        raise ProgramFormatError(f"{directory / 'signature.json'}: not a moejax export of version "
                                 f"{EXPORT_FORMAT_VERSION}; export the program again")
    weights = []
    for w in signature["weights"]:
        x = tensors.get(w["path"])
        if x is None:
            raise ProgramFormatError(f"{directory / 'weights.safetensors'} lacks weight {w['path']!r}; export again")
        dt = jax.numpy.dtype(w["dtype"])  # jax knows the ml_dtypes names (bfloat16, int4, ...)
        x = x if x.dtype == dt else x.reshape(-1).view(dt)
        if x.size != int(np.prod(w["shape"], dtype=np.int64)):
            raise ProgramFormatError(f"{directory}: weight {w['path']!r} has {x.size} values, the signature says "
                                     f"{w['shape']}; export the program again")
        weights.append(jax.numpy.asarray(x.reshape(w["shape"])))
    want = [(tuple(a.shape), np.dtype(a.dtype)) for a in exported.in_avals[:len(weights)]]
    if want != [(x.shape, np.dtype(x.dtype)) for x in weights]:
        raise ProgramFormatError(f"{directory}: the weights do not fit the exported function; export the program again")
    return ExportedModel(exported, weights, signature)
