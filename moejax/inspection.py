"""Inspection: program text, the MoE structure of a program, and diffs between stages.

:func:`structure` describes each MoE layer (routing, experts, expert weight format,
shapes and bytes, implementation) as plain JSON; :func:`semantic_diff` says, per
layer, what changed between two such descriptions. :func:`diff_programs` is the
line diff of the program text, for when the jaxpr itself is the question.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import shutil
import subprocess
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from moejax import dialect, expert_layout, rewrite, weight_formats

__all__ = ["program_text", "diff_programs", "structure", "semantic_diff", "moe_graph_dot", "render_dot"]


def _fmt(x: Any) -> str:
    return f"{jnp.dtype(x.dtype).name}[{','.join(map(str, x.shape))}]"


def program_text(program, show_weights: bool = True) -> str:
    """Signature, weights (path, format, shape) and the jaxpr, as text."""
    lines = [f"# inputs: {program.signature()}"]
    if show_weights:
        lines.append(f"# weights ({len(program.weights)} tensors, in jaxpr-input order):")
        for path, w in program.weights.items():
            fmt = weight_formats.format_of(w) if weight_formats.is_structured(w) else None
            if expert_layout.is_split(w):  # E buffers: show one of each kind
                fmt += ", one buffer per expert"
                kinds = collections.Counter(" ".join(_fmt(x) for x in jax.tree_util.tree_leaves(e)) for e in w.experts)
                desc = ", ".join(f"{n} x {k}" for k, n in kinds.items())
            else:
                desc = " ".join(_fmt(x) for x in jax.tree_util.tree_leaves(w))
            lines.append(f"#   {path}: {desc}" + (f"  ({fmt})" if fmt else ""))
    if program.metadata:
        lines.append(f"# metadata: {', '.join(sorted(program.metadata))}")
    lines.append(str(program.jaxpr))
    return "\n".join(lines)


def diff_programs(a, b, a_name: str = "before", b_name: str = "after", context: int = 3) -> str:
    """Unified diff of two programs' text."""
    return "".join(difflib.unified_diff(program_text(a).splitlines(keepends=True),
                                        program_text(b).splitlines(keepends=True),
                                        fromfile=a_name, tofile=b_name, n=context))


def _routing_text(routing: Any) -> str:
    """``k=2 softmax`` plus every Routing field that differs from its default."""
    parts = [f"k={routing.k}", routing.score]
    for f in dataclasses.fields(routing):
        if f.name in ("k", "score"):
            continue
        value = getattr(routing, f.name)
        if f.default is not dataclasses.MISSING and value != f.default:
            parts.append(f"{f.name}={value}")
    return " ".join(parts)


def _shapes(avals: Sequence[Any]) -> str:
    """Distinct ``dtype[shape]`` of ``avals`` with their counts, in first-seen order."""
    counts = collections.Counter(_fmt(a) for a in avals)
    return ", ".join(k if n == 1 else f"{n} x {k}" for k, n in counts.items())


def structure(program) -> list[dict[str, Any]]:
    """Every MoE layer of ``program`` as JSON-able facts, in program order.

    Each entry: ``name``, ``stacked`` (layers under one ``scan``), ``routing``,
    ``num_experts``, ``activation``, ``weight_format``, ``impl``, ``expert_weights``
    (distinct leaf types and shapes), ``expert_bytes`` (all experts of the entry) and
    ``other_ops`` (the number of non-MoE equations in the program, on the first entry only).
    """
    layers: dict[str, dict[str, Any]] = {}
    for site in rewrite.dialect_sites(program.jaxpr):
        name = site.name or "/".join(map(str, site.path)) or "moe"
        entry = layers.setdefault(name, {"name": name, "stacked": int(site.trip_count)})
        eqn, op = site.eqn, site.eqn.primitive.name
        if op == "moe_route":
            entry["routing"] = _routing_text(eqn.params["routing"])
            entry["route_impl"] = eqn.params.get("impl", "reference")
        elif op == "moe_dispatch":
            entry["num_experts"] = int(eqn.params["num_experts"])
        elif op == "moe_expert_ffn":
            weights = [v.aval for v in eqn.invars[2:]]
            entry.update(activation=eqn.params["activation"], weight_format=eqn.params["weight_format"],
                         impl=eqn.params["impl"], expert_weights=_shapes(weights),
                         expert_bytes=int(sum(a.size * a.dtype.itemsize for a in weights)) * int(site.trip_count))
    out = list(layers.values())
    if out:
        out[0]["other_ops"] = sum(1 for s in rewrite.iter_eqns(program.jaxpr)
                                  if not dialect.is_dialect_primitive(s.eqn.primitive))
    return out


_DIFF_FIELDS = ("stacked", "routing", "route_impl", "num_experts", "activation", "weight_format", "impl",
                "expert_weights", "expert_bytes", "other_ops")


def semantic_diff(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]) -> list[str]:
    """What changed between two :func:`structure` descriptions: ``LAYERS: FIELD OLD -> NEW`` lines.

    A change shared by several layers is one line that names them. Renamed jaxpr
    variables and re-ordered equations do not show; an empty list means no structural
    change (weights may still differ in value, e.g. after recalibration).
    """
    a = {layer["name"]: layer for layer in before}
    b = {layer["name"]: layer for layer in after}
    changes: dict[str, list[str]] = {}  # change text -> the layers it applies to, in program order
    for name in a:
        if name not in b:
            changes.setdefault("layer removed", []).append(name)
    for name in b:
        if name not in a:
            changes.setdefault("layer added", []).append(name)
            continue
        for field in _DIFF_FIELDS:
            old, new = a[name].get(field), b[name].get(field)
            if old == new:
                continue
            if field == "expert_bytes" and old and new:
                text = f"expert bytes {old:,} -> {new:,} ({new / old:.3g}x)"
            else:
                text = f"{field.replace('_', ' ')} {old} -> {new}"
            changes.setdefault(text, []).append(name)
    return [f"{_layers_text(names)}: {text}" for text, names in changes.items()]


def _layers_text(names: Sequence[str]) -> str:
    if len(names) == 1:
        return names[0]
    if len(names) == 2:
        return f"2 layers ({names[0]}, {names[1]})"
    return f"{len(names)} layers ({names[0]} ... {names[-1]})"


def _param_summary(eqn) -> str:
    p = eqn.params
    name = eqn.primitive.name
    if name == "moe_route":
        r = p["routing"]
        extra = f" {r.gating}" if r.gating != "topk" else ""
        return f"k={r.k}{extra} {r.score}"
    if name == "moe_dispatch":
        return f"E={p['num_experts']}"
    if name == "moe_expert_ffn":
        return f"{p['activation']} {p['weight_format']} impl={p['impl']}"
    return ""


def moe_graph_dot(program, title: str = "moe program") -> str:
    """Graphviz DOT of the MoE structure: one cluster per layer, ops with shapes."""
    layers: dict[str, list] = {}
    for site in rewrite.dialect_sites(program.jaxpr):
        layers.setdefault(site.name or "/".join(site.path) or "top", []).append(site)
    out = [f'digraph "{title}" {{', "  rankdir=LR; node [shape=box, fontname=monospace, fontsize=10];"]
    prev_last = None
    for li, (layer, sites) in enumerate(layers.items()):
        trips = sites[0].trip_count
        label = layer + (f" (x{trips} via scan)" if trips > 1 else "")
        out.append(f'  subgraph cluster_{li} {{ label="{label}"; style=rounded;')
        ids = []
        for si, s in enumerate(sites):
            nid = f"n{li}_{si}"
            ins = " ".join(_fmt(v.aval) for v in s.eqn.invars if hasattr(v.aval, "shape"))
            outs = " ".join(_fmt(v.aval) for v in s.eqn.outvars)
            out.append(f'    {nid} [label="{s.eqn.primitive.name}\\n{_param_summary(s.eqn)}\\nin: {ins}\\nout: {outs}"];')
            ids.append(nid)
        out.append("  }")
        for a, b in zip(ids, ids[1:]):
            out.append(f"  {a} -> {b};")
        if prev_last and ids:
            out.append(f"  {prev_last} -> {ids[0]} [style=dashed];")
        prev_last = ids[-1] if ids else prev_last
    out.append("}")
    return "\n".join(out)


def render_dot(dot: str, path: str | Path) -> Path | None:
    """Write ``path`` (.dot) and, when Graphviz's ``dot`` is installed, an SVG beside it."""
    path = Path(path)
    path.write_text(dot)
    exe = shutil.which("dot")
    if exe is None:
        return None
    svg = path.with_suffix(".svg")
    subprocess.run([exe, "-Tsvg", str(path), "-o", str(svg)], check=True, timeout=60)
    return svg
