"""A self-contained HTML report of one optimization run.

``render_report(data)`` turns the JSON-able dict the CLI builds (stages, semantic diffs, MoE
structure, expert loads) into one HTML page; ``write_report(path, data)`` writes it. The page
needs no network, server or JavaScript: every picture is inline SVG drawn here in plain Python.
Every string taken from ``data`` (layer, pass and format names come from user-supplied models
and pipelines) is escaped, and missing numbers (``None``) render as "-" and stay out of charts.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Iterable

__all__ = ["render_report", "write_report"]

_WIDTH = 1100           # every SVG is at most this wide (CSS scales it down on narrow screens)
_FONT_PX = 12           # SVG label size; _text_width() estimates widths from it
_LABEL_MAX_CHARS = 32   # longer row labels are shortened (the full name is in the tooltip)
_MISSING_FILL = "#d9d9d9"
_ROW_H, _ROW_PITCH = 18, 21  # grid rows (heatmaps, structure pictures): cell height, row spacing

# Sequential scale (viridis stops, reversed so that more load is darker): perceptually
# ordered, readable by colour-blind viewers, and monotone in lightness so it prints in grey.
_SEQ_STOPS = [(0xfd, 0xe7, 0x25), (0x5e, 0xc9, 0x62), (0x21, 0x91, 0x8c), (0x3b, 0x52, 0x8b), (0x44, 0x01, 0x54)]
# Categorical palette for weight formats (Tableau 10).
_CATEGORICAL = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #222; background: #fff; margin: 0; line-height: 1.45; }
main { max-width: 1140px; margin: 0 auto; padding: 24px 20px 60px; }
h1 { font-size: 1.6em; margin: 0 0 .3em; }
h2 { font-size: 1.25em; margin: 1.8em 0 .5em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
h3 { font-size: 1.02em; margin: 1.2em 0 .3em; }
.meta { margin: .15em 0; color: #444; }
.muted, figcaption { color: #666; font-size: .92em; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .9em; }
pre { background: #f6f8fa; border: 1px solid #e3e6ea; border-radius: 4px; padding: 8px 10px;
      overflow-x: auto; margin: .3em 0; }
table { border-collapse: collapse; font-size: .92em; width: 100%; }
th, td { padding: 5px 8px; border-bottom: 1px solid #e5e5e5; text-align: right; white-space: nowrap; }
th { background: #f3f4f6; font-weight: 600; vertical-align: bottom; white-space: normal; }
th:nth-child(-n+3), td:nth-child(-n+3) { text-align: left; }
tbody tr:nth-child(even) { background: #fafafa; }
td.exact { color: #1a7f37; } td.lossy { color: #b35900; }
.table-wrap { overflow-x: auto; }
figure { margin: 1em 0 1.6em; }
svg { max-width: 100%; height: auto; display: block; }
svg text { font-family: inherit; font-size: 12px; fill: #333; }
svg .axis { stroke: #888; } svg .grid { stroke: #eee; }
"""


# ---------------------------------------------------------------- small helpers

def _esc(value: Any) -> str:
    """Escapes anything for HTML text and attribute values (quotes included)."""
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    """A finite float, or None for missing/non-numeric/NaN values (those are shown as "-")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any, spec: str) -> str:
    v = _num(value)
    return "-" if v is None else format(v, spec)


def _megabytes(value: Any) -> str:
    v = _num(value)
    return "-" if v is None else f"{v / 1e6:.3f}"


def _text_width(text: str, size: float = _FONT_PX) -> float:
    """A rough width estimate for proportional fonts, enough to lay out labels."""
    return len(text) * size * 0.6


def _shorten(text: str, limit: int = _LABEL_MAX_CHARS) -> str:
    # Keeps the end of the name: layer paths differ in their tail ("layers/17/mlp").
    return text if len(text) <= limit else "\u2026" + text[-(limit - 1):]


def _svg(width: float, height: float, body: Iterable[str], attrs: str, label: str) -> str:
    return (f'<svg {attrs} role="img" aria-label="{_esc(label)}" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}">' + "".join(body) + "</svg>")


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{_esc(text)}</text>'


def _rect(x: float, y: float, w: float, h: float, fill: str, tooltip: str | None = None) -> str:
    inner = f"<title>{_esc(tooltip)}</title>" if tooltip is not None else ""
    return f'<rect x="{x:.2f}" y="{y:.2f}" width="{w:.2f}" height="{h:.2f}" fill="{fill}">{inner}</rect>'


def _load_colour(load: float | None, hi: float) -> str:
    """Sequential colour for a load in [0, hi]; grey when the load is unknown."""
    if load is None:
        return _MISSING_FILL
    t = min(max(load / hi, 0.0), 1.0) * (len(_SEQ_STOPS) - 1) if hi > 0 else 0.0
    i = min(int(t), len(_SEQ_STOPS) - 2)
    f = t - i
    rgb = (round(a + (b - a) * f) for a, b in zip(_SEQ_STOPS[i], _SEQ_STOPS[i + 1]))
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _load_legend(x: float, y: float, hi: float) -> tuple[list[str], float, float]:
    """A stepped colour bar from 0 to ``hi`` (no gradient ids: several SVGs share one page).

    Returns the SVG parts, their height and their width.
    """
    steps, w, x0 = 20, 8, x + 12
    top, caption = f"{hi:.3g}", "load = fraction of the layer's routed tokens"
    x1 = x0 + steps * w + 6
    x2 = x1 + _text_width(top) + 14
    parts = [_text(x, y + 12, "0")]
    parts += [_rect(x0 + i * w, y, w, 16, _load_colour(hi * (i + 0.5) / steps, hi)) for i in range(steps)]
    parts += [_text(x1, y + 12, top), _text(x2, y + 12, caption, extra=' fill="#666"')]
    return parts, 22, x2 - x + _text_width(caption)


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _padded_range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or abs(hi) * 0.05 or 1.0  # a single value still gets a visible range
    return lo - pad, hi + pad


def _pass_of(stages: dict[Any, dict], index: Any) -> str:
    """The pass that produced stage ``index`` ("?" when the stage list does not have it)."""
    return str(stages.get(index, {}).get("pass", "?"))


# ---------------------------------------------------------------- sections

def _header(data: dict) -> str:
    return (f"<header><h1>{_esc(data.get('title', 'moejax report'))}</h1>"
            f"<p class=\"meta\">model: <code>{_esc(data.get('model', '-'))}</code></p>"
            f"<p class=\"meta\">pipeline: <code>{_esc(data.get('pipeline', '-'))}</code></p>"
            f"<p class=\"meta muted\">{_esc(data.get('created', '-'))} &middot; {_esc(data.get('machine', '-'))}</p>"
            "</header>")


def _bits_cell(bits: float | None, base: float | None) -> str:
    if bits is None:
        return "-"
    if base is None or base == 0 or bits == base:
        return f"{bits:.4f}"
    return f"{bits:.4f} ({(bits - base) / base * 100:+.2f}%)"


def _stage_table(stages: list[dict]) -> str:
    base = _num(stages[0].get("bits_per_byte")) if stages else None
    head = ["#", "pass", "exact", "expert MB", "total MB", "active expert GFLOP/token",
            "bits/byte (vs stage 0)", "prefill tok/s", "decode tok/s", "pass s", "max deviation"]
    rows = []
    for s in stages:
        exact = s.get("exact")
        kind = "-" if exact is None else ("exact" if exact else "lossy")
        flops = _num(s.get("active_expert_flops_per_token"))
        cells = [_esc(s.get("index", "-")), _esc(s.get("pass", "-")), kind,
                 _megabytes(s.get("expert_bytes")), _megabytes(s.get("total_bytes")),
                 "-" if flops is None else f"{flops / 1e9:.3g}",
                 _bits_cell(_num(s.get("bits_per_byte")), base),
                 _fmt(s.get("prefill_tokens_per_s"), ",.0f"), _fmt(s.get("decode_tokens_per_s"), ",.0f"),
                 _fmt(s.get("pass_seconds"), ".2f"), _fmt(s.get("max_deviation"), ".3g")]
        tds = "".join(f'<td class="{kind}">{c}</td>' if i == 2 and exact is not None else f"<td>{c}</td>"
                      for i, c in enumerate(cells))
        rows.append(f"<tr>{tds}</tr>")
    ths = "".join(f'<th scope="col">{h}</th>' for h in head)
    return ('<h2>Stages</h2><div class="table-wrap"><table id="stages">'
            f"<thead><tr>{ths}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
            '<p class="muted">MB = 10<sup>6</sup> bytes; bits/byte is the model\'s cross-entropy on the '
            "evaluation text (lower is better), with its change relative to stage 0.</p>")


def _quality_cost_chart(stages: list[dict]) -> str:
    pts = [(_num(s.get("expert_bytes")), _num(s.get("bits_per_byte")), s) for s in stages]
    pts = [(size / 1e6, bits, s) for size, bits, s in pts if size is not None and bits is not None]
    title = "<h2>Quality vs. cost</h2>"
    if not pts:
        return title + '<p class="muted">No stage has a bits/byte measurement (quality was not evaluated).</p>'
    w, h, ml, mr, mt, mb = 860, 420, 70, 30, 20, 50
    (x0, x1), (y0, y1) = _padded_range([p[0] for p in pts]), _padded_range([p[1] for p in pts])

    def sx(v: float) -> float:
        return ml + (v - x0) / (x1 - x0) * (w - ml - mr)

    def sy(v: float) -> float:
        return h - mb - (v - y0) / (y1 - y0) * (h - mt - mb)

    body = [f'<rect x="{ml}" y="{mt}" width="{w - ml - mr}" height="{h - mt - mb}" fill="#fcfcfd" class="axis"/>']
    for t in (t for t in _nice_ticks(x0, x1) if x0 <= t <= x1):
        body += [f'<line class="grid" x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{mt}" y2="{h - mb}"/>',
                 _text(sx(t), h - mb + 16, f"{t:.4g}", "middle")]
    for t in (t for t in _nice_ticks(y0, y1) if y0 <= t <= y1):
        body += [f'<line class="grid" x1="{ml}" x2="{w - mr}" y1="{sy(t):.1f}" y2="{sy(t):.1f}"/>',
                 _text(ml - 6, sy(t) + 4, f"{t:.4g}", "end")]
    body += [_text(ml + (w - ml - mr) / 2, h - 12, "expert weights (MB)", "middle"),
             _text(16, mt + (h - mt - mb) / 2, "bits per byte", "middle",
                   f' transform="rotate(-90 16 {mt + (h - mt - mb) / 2:.1f})"')]
    # The pipeline's path through the plane, in stage order.
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in pts)
    body.append(f'<polyline points="{path}" fill="none" stroke="#9aa7b8" stroke-dasharray="4 3"/>')
    # Stages that land on the same pixel (e.g. an exact pass after another) share one label.
    groups: dict[tuple[int, int], tuple[float, float, list[dict]]] = {}
    for x, y, s in pts:
        groups.setdefault((round(sx(x) / 4), round(sy(y) / 4)), (sx(x), sy(y), []))[2].append(s)
    for n, (px, py, members) in enumerate(groups.values()):
        label = ", ".join(f"{m.get('index')} {m.get('pass', '')}" for m in members)
        right = px + 8 + _text_width(label) < w - mr
        dy = -8 if n % 2 == 0 else 16  # alternate above/below: neighbouring stages are often close
        body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="#4e79a7" stroke="#fff">'
                    f"<title>{_esc(label)}</title></circle>")
        body.append(_text(px + (8 if right else -8), py + dy, label, "start" if right else "end"))
    return (title + '<figure>' + _svg(w, h, body, 'id="quality-cost"', "bits per byte against expert MB")
            + "<figcaption>Each point is a stage: x = expert weight bytes, y = bits per byte. "
            "Lower-left is better (smaller and more accurate). Stages without bits/byte are left out."
            "</figcaption></figure>")


def _diffs(diffs: list[dict], stages: dict[int, dict]) -> str:
    out = ["<h2>Semantic diffs</h2>"]
    if not diffs:
        out.append('<p class="muted">No diffs were recorded.</p>')
    for d in diffs:
        to = d.get("to")
        out.append(f"<h3>stage {_esc(d.get('from'))} -&gt; {_esc(to)} ({_esc(_pass_of(stages, to))})</h3>")
        lines = d.get("lines") or []
        out.append(f"<pre>{_esc(chr(10).join(map(str, lines)))}</pre>" if lines
                   else '<p class="muted">no structural change</p>')
    return "".join(out)


def _label_width(names: Iterable[str]) -> float:
    """Room for the (shortened) row labels left of a grid."""
    return max((_text_width(_shorten(n)) for n in names), default=40) + 12


def _grid_rows(rows: list[tuple[str, list[tuple[float, str, str]]]], label_w: float, top: float) -> list[str]:
    """Rows of cells: each row is (layer name, [(cell width, fill, tooltip), ...])."""
    body = []
    for r, (name, cells) in enumerate(rows):
        y = top + r * _ROW_PITCH
        body.append(f'<text x="{label_w - 8:.1f}" y="{y + _ROW_H / 2 + 4:.1f}" text-anchor="end">'
                    f"<title>{_esc(name)}</title>{_esc(_shorten(name))}</text>")
        x = label_w
        for cw, fill, tip in cells:
            # A 1 px gap separates experts, unless it would eat most of a narrow cell.
            body.append(_rect(x, y, cw - 1 if cw >= 4 else cw, _ROW_H, fill, tip))
            x += cw
    return body


def _heatmap(entry: dict, stages: dict[int, dict], hi: float) -> str:
    layers = entry.get("layers") or {}
    label_w = _label_width(layers)
    n_exp = max((len(v) for v in layers.values()), default=1)
    cell = min(36.0, max(3.0, (_WIDTH - label_w - 10) / n_exp))
    top = 40
    rows = [(name, [(cell, _load_colour(_num(v), hi), f"{name} expert {i}: load {_fmt(v, '.4f')}")
                    for i, v in enumerate(loads)]) for name, loads in layers.items()]
    stage = entry.get("stage")
    label = entry.get("label") or _pass_of(stages, stage)
    title = f"expert load after stage {stage} ({label})"
    body = [_text(0, 14, title, extra=' font-weight="600"')] + _grid_rows(rows, label_w, top)
    # Expert indices along the top when the columns are wide enough to read them.
    need = (_text_width(str(n_exp - 1), 10) + 8) / cell
    step = next(m * 10 ** k for k in range(8) for m in (1, 2, 5) if m * 10 ** k >= need)
    body += [_text(label_w + (i + 0.5) * cell, top - 4, str(i), "middle", ' font-size="10"')
             for i in range(0, n_exp, step)]
    legend_y = top + len(rows) * _ROW_PITCH + 8
    legend, lh, lw = _load_legend(label_w, legend_y, hi)
    width = label_w + max(n_exp * cell, lw)
    return "<figure>" + _svg(width + 10, legend_y + lh + 4, body + legend, 'class="heatmap"', title) + "</figure>"


def _structure(entry: dict, stages: dict[int, dict], label_w: float, px_per_byte: float, hi: float,
               formats: dict[str, str]) -> str:
    layers = entry.get("layers") or []
    names = [str(layer.get("name", "?")) for layer in layers]
    experts_of = [layer.get("experts") or [] for layer in layers]
    by_load = any(_num(e.get("load")) is not None for ex in experts_of for e in ex)

    def colour(expert: dict) -> str:
        if by_load:
            return _load_colour(_num(expert.get("load")), hi)
        return formats.get(str(expert.get("format")), _MISSING_FILL)

    rows = []
    for name, experts in zip(names, experts_of):
        cells = [(max((_num(e.get("bytes")) or 0) * px_per_byte, 0.5), colour(e),
                  f"{name} expert {i}: {_fmt(e.get('bytes'), ',.0f')} bytes, {e.get('format', '-')}, "
                  f"load {_fmt(e.get('load'), '.4f')}") for i, e in enumerate(experts)]
        rows.append((name, cells))
    top = 24
    title = f"MoE structure at stage {entry.get('stage')} ({_pass_of(stages, entry.get('stage'))})"
    body = [_text(0, 14, title, extra=' font-weight="600"')] + _grid_rows(rows, label_w, top)
    # Each row ends with its total size, so shrinking is readable as a number too.
    for r, experts in enumerate(experts_of):
        x = label_w + sum(c[0] for c in rows[r][1]) + 6
        total = sum(_num(e.get("bytes")) or 0 for e in experts)
        body.append(_text(x, top + r * _ROW_PITCH + _ROW_H / 2 + 4, f"{total / 1e6:.2f} MB, {len(experts)} experts"))
    y = top + len(rows) * _ROW_PITCH + 8
    used = sorted({str(e.get("format")) for ex in experts_of for e in ex})
    if by_load:
        legend, lh, _ = _load_legend(label_w, y, hi)
        # The colour shows load here, so the formats are named in words.
        legend.append(_text(label_w, y + lh + 14, "weight formats: " + ", ".join(used)))
        lh += 20
    else:
        legend, x, lh = [], label_w, 20
        for f in used:
            if x + 20 + _text_width(f) > _WIDTH - 10:  # wrap the legend instead of widening the picture
                x, lh = label_w, lh + 20
            legend += [_rect(x, y + lh - 18, 14, 14, formats.get(f, _MISSING_FILL)), _text(x + 19, y + lh - 7, f)]
            x += 34 + _text_width(f)
    return "<figure>" + _svg(_WIDTH, y + lh + 4, body + legend, 'class="structure"', title) + "</figure>"


def _structures(entries: list[dict], stages: dict[int, dict], hi: float) -> str:
    out = ["<h2>MoE structure</h2>"]
    if not entries:
        return out[0] + '<p class="muted">No structure was recorded.</p>'
    all_layers = [layer for e in entries for layer in (e.get("layers") or [])]
    label_w = _label_width(str(layer.get("name", "?")) for layer in all_layers)
    # One bytes-per-pixel scale for every stage, so that shrunk experts look smaller; the widest
    # row fills the picture (less room for its size label), so nothing grows past _WIDTH.
    widest = max((sum(_num(x.get("bytes")) or 0 for x in (layer.get("experts") or [])) for layer in all_layers),
                 default=0)
    px_per_byte = (_WIDTH - label_w - 150) / widest if widest > 0 else 0.0
    formats = sorted({str(x.get("format")) for layer in all_layers for x in (layer.get("experts") or [])})
    palette = {f: _CATEGORICAL[i % len(_CATEGORICAL)] for i, f in enumerate(formats)}
    scale = f"{100 / px_per_byte / 1e6:.3g} MB" if px_per_byte else "-"
    out.append(f'<p class="muted">Rows are MoE layers, cells are experts; a cell\'s width is proportional to '
               f"the expert's bytes, on one scale for all stages (100 px = {scale}). Cells are coloured by "
               "expert load where it was measured, else by weight format.</p>")
    out += [_structure(e, stages, label_w, px_per_byte, hi, palette) for e in entries]
    return "".join(out)


# ---------------------------------------------------------------- public API

def render_report(data: dict) -> str:
    """Renders the report for ``data`` (the schema the CLI builds) as one self-contained HTML page."""
    stage_list = list(data.get("stages") or [])
    stages = {s.get("index"): s for s in stage_list}
    loads = list(data.get("loads") or [])
    structure = list(data.get("structure") or [])
    # One load scale for heatmaps and structure pictures, so colours compare across stages.
    all_loads = [v for entry in loads for row in (entry.get("layers") or {}).values() for v in map(_num, row)]
    all_loads += [_num(x.get("load")) for e in structure for layer in (e.get("layers") or [])
                  for x in (layer.get("experts") or [])]
    hi = max((v for v in all_loads if v is not None), default=0.0) or 1.0
    heatmaps = "".join(_heatmap(e, stages, hi) for e in loads) or '<p class="muted">No expert loads were recorded.</p>'
    title = str(data.get("title", "moejax report"))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)} &ndash; {_esc(data.get('model', ''))}</title><style>{_CSS}</style></head>"
            "<body><main>" + _header(data) + _stage_table(stage_list) + _quality_cost_chart(stage_list)
            + _diffs(list(data.get("diffs") or []), stages) + "<h2>Expert load</h2>" + heatmaps
            + _structures(structure, stages, hi) + "</main></body></html>\n")


def write_report(path: str | Path, data: dict) -> Path:
    """Writes ``render_report(data)`` to ``path`` (UTF-8, parent folders created) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(data), encoding="utf-8")
    return path
