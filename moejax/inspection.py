"""Inspection: program text, diffs between stages, and a Graphviz view of MoE structure."""
from __future__ import annotations

import collections
import difflib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from moejax import expert_layout, rewrite, weight_formats

__all__ = ["program_text", "diff_programs", "moe_graph_dot", "render_dot"]


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
