"""Checks on untrusted checkpoint files: :class:`CheckpointError` and typed JSON fields.

Every file a user hands us may be hostile or broken. Bad input must end in one
:class:`CheckpointError` whose message is a single line naming the file or field
and the fix, never in a traceback from deep inside the loader, a silent wrong
answer, or a hang. Field checks are driven by tables of :class:`Kind` s, so each
loader declares what it reads in one place (``hf._HF_FIELDS``, and
:func:`dataclass_kinds` for the moejax format) and checks it with :func:`check_fields`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["CheckpointError", "Kind", "read_json_object", "check_fields", "dataclass_kinds", "describe",
           "POSITIVE_INT", "NON_NEGATIVE_INT", "NUMBER", "POSITIVE_NUMBER", "BOOL", "STRING", "OBJECT",
           "STRINGS", "NON_NEGATIVE_INTS", "LAYER_COUNT", "EXPERT_COUNT", "ANY", "one_of"]

# Sizes above these are refused before any loop or allocation depends on them.
MAX_JSON_BYTES = 16 * 2**20  # config.json is a few KB
MAX_INT = 2**31 - 1  # array dimensions index with int32 in XLA
MAX_LAYERS = 1024  # the loaders loop over layers and experts in Python
MAX_EXPERTS = 4096


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, malformed, or does not match its config."""


def describe(value: Any) -> str:
    """``'128' (a string)``: a short repr of ``value`` and its JSON type, for error messages."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({kinds.get(type(value), type(value).__name__)})"


def read_json_object(path: str | os.PathLike, *, fix: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in ``path``; anything else raises :class:`CheckpointError` (``fix`` ends the message).

    A missing file raises :class:`FileNotFoundError`; a directory, FIFO or device is
    refused before it is opened (reading a FIFO would block forever).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; {fix}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a regular file; {fix}")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise CheckpointError(f"{path} is {size} bytes, over the {max_bytes} byte limit for this file; {fix}")
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror}); {fix}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, over-long ints, deep nesting
        raise CheckpointError(f"{path} is not valid JSON ({_one_line(e)}); {fix}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {describe(value)}; {fix}")
    return value


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


# --------------------------------------------------------------------------
# Field kinds
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Kind:
    """What one config field may hold: ``desc`` reads "must be {desc}"."""

    desc: str
    ok: Callable[[Any], bool]
    nullable: bool = False

    def accepts(self, value: Any) -> bool:
        return (value is None and self.nullable) or (value is not None and self.ok(value))

    def or_null(self) -> Kind:
        return dataclasses.replace(self, desc=f"{self.desc} or null", nullable=True)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is a Python int


def _is_number(v: Any) -> bool:
    # json accepts NaN and Infinity; a huge int would overflow float()
    return (_is_int(v) and abs(v) < 2**53) or (isinstance(v, float) and math.isfinite(v))


def _int_in(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and lo <= v <= hi


def one_of(*choices: str) -> Kind:
    return Kind(f"one of {list(choices)}", lambda v: isinstance(v, str) and v in choices)


POSITIVE_INT = Kind("a positive integer", _int_in(1, MAX_INT))
NON_NEGATIVE_INT = Kind("a non-negative integer", _int_in(0, MAX_INT))
LAYER_COUNT = Kind(f"an integer from 1 to {MAX_LAYERS}", _int_in(1, MAX_LAYERS))
EXPERT_COUNT = Kind(f"an integer from 1 to {MAX_EXPERTS}", _int_in(1, MAX_EXPERTS))
NUMBER = Kind("a finite number", _is_number)
POSITIVE_NUMBER = Kind("a positive number", lambda v: _is_number(v) and v > 0)
BOOL = Kind("true or false", lambda v: isinstance(v, bool))
STRING = Kind("a string", lambda v: isinstance(v, str))
OBJECT = Kind("an object", lambda v: isinstance(v, dict))
STRINGS = Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
ANY = Kind("anything", lambda v: True)
NON_NEGATIVE_INTS = Kind("a list of non-negative integers",
                         lambda v: isinstance(v, list) and all(_int_in(0, MAX_INT)(x) for x in v))


def check_fields(d: Mapping[str, Any], kinds: Mapping[str, Kind], *, file: str, fix: str) -> None:
    """Raise :class:`CheckpointError` for the first field of ``d`` that ``kinds`` rejects.

    Keys of ``kinds`` may be dotted (``"attn_config.kv_n_heads"``) to reach into
    nested objects; absent fields pass (the loader's defaults or its "lacks field"
    error apply), a present ``null`` passes only where the kind is nullable.
    """
    for name, kind in kinds.items():
        *parents, leaf = name.split(".")
        node: Any = d
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node[leaf]
        if not kind.accepts(value):
            raise CheckpointError(f"{file}: field {name!r} must be {kind.desc}, got {describe(value)}; {fix}")


def dataclass_kinds(cls: type, overrides: Mapping[str, Kind] | None = None) -> dict[str, Kind]:
    """A :class:`Kind` per field of dataclass ``cls``, read off its type annotations.

    ``int`` fields are positive unless ``overrides`` says otherwise; nested
    dataclasses are objects (check them with their own table).
    """
    plain = {int: POSITIVE_INT, float: NUMBER, bool: BOOL, str: STRING, tuple[int, ...]: NON_NEGATIVE_INTS}
    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        base = next(a for a in args if a is not type(None))
        kind = plain.get(base) or (OBJECT if dataclasses.is_dataclass(base) else ANY)
        kinds[name] = kind.or_null() if type(None) in args else kind
    for name, kind in (overrides or {}).items():
        kinds[name] = kind.or_null() if kinds[name].nullable else kind
    return kinds
