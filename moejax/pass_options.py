"""Documentation of pass options: type, default, allowed values and description (``moejax passes``).

A pass's options are its dataclass fields (those with ``repr=True``). What they
mean comes from the "Options:" section of the class docstring::

    Options:
      bits: storage width 8, 4, 3 or 2; with ``mixed=true`` an average budget
        in [2, 8] (e.g. 3.5) split over experts by importance.

(the first sentence is used, wrapped lines joined). What values they take is
declared on the pass class, next to the ``__post_init__``/``check`` that
enforces it::

    option_ranges: ClassVar[Mapping[str, str]] = {"bits": "8, 4, 3 or 2 (with mixed=true: a budget in [2, 8])"}
    required_options: ClassVar[tuple[str, ...]] = ("num_experts",)   # must be given
    option_descriptions: ClassVar[Mapping[str, str]] = {...}         # optional: overrides the docstring

:func:`option_docs` collects it all per option; :func:`format_pass_help` is
the text block ``moejax passes`` prints for one pass.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Mapping
from typing import Any

from moejax.pipeline import Pass, _parse_value, exactness_label

__all__ = ["OptionDoc", "option_docs", "format_pass_help", "docstring_options", "first_sentence", "render_type",
           "render_default"]

# Abbreviations whose period does not end a sentence.
_ABBREVIATIONS = ("e.g.", "i.e.", "cf.", "etc.", "vs.")
_ENTRY_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.*)")


@dataclasses.dataclass(frozen=True)
class OptionDoc:
    """One option of a pass, as ``moejax passes`` shows it.

    ``default`` is spelled as in a pipeline string (``true``, ``none``, ``0.25``,
    ``auto``), or ``required`` when the option must be given (``required=True``).
    """

    name: str
    type: str
    default: str
    allowed: str
    description: str
    required: bool


# --------------------------------------------------------------------------
# Rendering types and defaults.
# --------------------------------------------------------------------------
def render_type(annotation: Any) -> str:
    """A readable form of a field annotation: ``int``, ``float | None``, ``Mesh | AbstractMesh | None``.

    Annotations are usually strings (``from __future__ import annotations``):
    those are tidied (``typing.`` prefixes dropped, ``Optional``/``Union``
    spelled with ``|``) rather than evaluated.
    """
    if isinstance(annotation, str):
        return _tidy_type_text(annotation)
    if annotation is type(None) or annotation is None:
        return "None"
    if annotation is typing.Any:
        return "Any"
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(render_type(a) for a in typing.get_args(annotation))
    if origin is not None:  # list[int], tuple[str, ...], ...
        args = ", ".join("..." if a is Ellipsis else render_type(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return _tidy_type_text(str(annotation))


def _tidy_type_text(text: str) -> str:
    text = re.sub(r"\btyping\.", "", text.strip().strip("'\""))
    # Optional[X] -> X | None, Union[A, B] -> A | B (innermost first, so nesting works)
    while True:
        m = re.search(r"\b(Optional|Union)\[([^\[\]]*)\]", text)
        if not m:
            break
        parts = [p.strip() for p in m.group(2).split(",")]
        if m.group(1) == "Optional":
            parts.append("None")
        text = text[:m.start()] + " | ".join(parts) + text[m.end():]
    return re.sub(r"\s*\|\s*", " | ", text)


def render_default(value: Any) -> str:
    """``value`` as written in a pipeline string: ``true``/``false``, ``none``, numbers, strings unquoted.

    A string that the pipeline parser would read back as something else
    (``"none"``, ``"8"``, one holding a comma or parenthesis) is quoted.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, str):
        needs_quotes = (not value or value != value.strip() or any(c in value for c in ",()=")
                        or _parse_value(value) != value)
        return repr(value) if needs_quotes else value
    return str(value)


# --------------------------------------------------------------------------
# The docstring's "Options:" section.
# --------------------------------------------------------------------------
def docstring_options(doc: str | None) -> dict[str, str]:
    """``option name -> full text`` of the "Options:" section of ``doc`` (wrapped lines joined).

    The section starts at a line ``Options:`` (or ``Options (...):``) and ends
    at a blank line or a line indented less than its entries. Each entry is
    ``name: text``; more-indented lines continue the entry above.
    """
    lines = _cleandoc(doc or "").splitlines()
    start = next((i for i, line in enumerate(lines)
                  if line.strip().startswith("Options") and line.rstrip().endswith(":")), None)
    if start is None:
        return {}
    entries: dict[str, list[str]] = {}
    base: int | None = None
    current: str | None = None
    for line in lines[start + 1:]:
        if not line.strip():
            break
        indent = len(line) - len(line.lstrip())
        if base is None:
            base = indent
        if indent < base:
            break
        m = _ENTRY_RE.fullmatch(line.strip()) if indent == base else None
        if m:
            current = m.group(1)
            entries[current] = [m.group(2)]
        elif current is not None:
            entries[current].append(line.strip())
    return {name: " ".join(t for t in parts if t) for name, parts in entries.items()}


def _cleandoc(doc: str) -> str:
    return inspect.cleandoc(doc)


def plain_text(text: str) -> str:
    """``text`` on one line, without reST markup: ``x`` and :func:`x` become x."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return " ".join(text.replace("``", "").split())


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` as plain text (see :func:`plain_text`), without its final period.

    A period ends the sentence when it is followed by a space or the end, is
    outside parentheses, and does not end an abbreviation such as ``e.g.``.
    """
    text = plain_text(text)
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(depth - 1, 0)
        elif ch in ".!?" and depth == 0 and (i + 1 == len(text) or text[i + 1] == " "):
            word = text[:i + 1].rsplit(" ", 1)[-1].lower()
            if word.lstrip("(") in _ABBREVIATIONS:
                continue
            return text[:i]
    return text.rstrip(".")


# --------------------------------------------------------------------------
# Per pass.
# --------------------------------------------------------------------------
def _option_fields(cls: type[Pass]) -> list[dataclasses.Field]:
    """The fields that are options (the ones :meth:`Pass.options` and ``str(pass)`` show)."""
    return [f for f in dataclasses.fields(cls) if f.repr and f.init]


def option_docs(cls: type[Pass]) -> list[OptionDoc]:
    """Every option of pass class ``cls``, in field order.

    Reads ``cls.option_ranges`` (allowed values), ``cls.required_options`` and
    ``cls.option_descriptions`` (overrides) when the pass declares them, and the
    "Options:" section of its docstring. Missing information is left empty: a
    pass's tests should check that every field is documented.
    """
    ranges: Mapping[str, str] = getattr(cls, "option_ranges", {}) or {}
    required: tuple[str, ...] = tuple(getattr(cls, "required_options", ()) or ())
    overrides: Mapping[str, str] = getattr(cls, "option_descriptions", {}) or {}
    from_doc = docstring_options(cls.__doc__)
    docs = []
    for f in _option_fields(cls):
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        is_required = f.name in required or default is dataclasses.MISSING
        description = overrides.get(f.name) or first_sentence(from_doc.get(f.name, ""))
        type_text = render_type(f.type)
        if is_required and type_text.endswith(" | None"):  # None only stands for "not given"
            type_text = type_text[:-len(" | None")]
        docs.append(OptionDoc(
            name=f.name,
            type=type_text,
            default="required" if is_required else render_default(default),
            allowed=str(ranges.get(f.name, "")),
            description=description,
            required=is_required,
        ))
    return docs


def format_pass_help(cls: type[Pass], width: int = 110) -> str:
    """The block ``moejax passes`` prints for ``cls``: header, summary, tolerance, one line per option.

    ::

        quantize  (lossy)
            Weight-only quantization of routed-expert weights; router weights stay float.
            bits            float        default 8       allowed: 8, 4, 3 or 2 (...)   storage width ...

    A line longer than ``width`` puts the description on the next line(s),
    indented under the option's type.
    """
    kind = exactness_label(cls)
    needs = f", needs {', '.join(cls.needs)}" if cls.needs else ""
    lines = [f"{cls.name}  ({kind}{needs})"]
    doc = _cleandoc(cls.__doc__ or "").splitlines()
    if doc:
        lines.append(f"    {plain_text(doc[0])}")
    tol = getattr(cls, "tolerance", None)
    if tol is not None and kind != "lossy":
        lines.extend(textwrap.wrap(
            f"not bit-exact: |difference| <= {tol.atol:g} + {tol.rtol:g} * max|output| ({tol.reason})",
            width=width, initial_indent="    ", subsequent_indent="      ", break_on_hyphens=False))
    docs = option_docs(cls)
    if not docs:
        return "\n".join(lines)
    name_w = max(len(d.name) for d in docs)
    type_w = max(len(d.type) for d in docs)
    default_w = max(len(f"default {d.default}") for d in docs)
    head_w = 4 + name_w + 2 + type_w + 2 + default_w + 2  # where "allowed:" starts
    desc_indent = " " * (4 + name_w + 2)  # continuation lines start under the type
    for d in docs:
        head = f"    {d.name:<{name_w}}  {d.type:<{type_w}}  {'default ' + d.default:<{default_w}}  "
        allowed = f"allowed: {d.allowed}" if d.allowed else ""
        one_line = (head + allowed + (f"   {d.description}" if d.description else "")).rstrip()
        if len(one_line) <= width:
            lines.append(one_line)
            continue
        if allowed:  # wrap the allowed text itself under its column if it is long
            lines.extend(textwrap.wrap(allowed, width=width, initial_indent=head,
                                       subsequent_indent=" " * (head_w + len("allowed: ")),
                                       break_on_hyphens=False) or [head.rstrip()])
        else:
            lines.append(head.rstrip())
        if d.description:
            lines.extend(textwrap.wrap(d.description, width=width, initial_indent=desc_indent,
                                       subsequent_indent=desc_indent + "  ", break_on_hyphens=False))
    return "\n".join(lines)
