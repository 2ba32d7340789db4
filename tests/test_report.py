"""moejax.report: the self-contained HTML report, checked as text and in a real headless browser."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from moejax.report import render_report, write_report

HOSTILE = "<script>alert(1)</script>"
N_LAYERS, N_EXPERTS, EXPERT_BYTES = 4, 8, 393216
LAYERS = ["layers/0/mlp", HOSTILE, "layers/2/mlp", "layers/3/mlp"]


def _loads(skew: float) -> dict[str, list[float]]:
    """Per-layer expert loads summing to 1, more skewed for larger ``skew``."""
    out = {}
    for li, name in enumerate(LAYERS):
        raw = [1.0 + skew * ((e * 3 + li) % N_EXPERTS) for e in range(N_EXPERTS)]
        out[name] = [r / sum(raw) for r in raw]
    return out


def _structure(stage: int, bytes_per_expert: int, fmt: str, loads: dict | None, pruned: set[int]) -> dict:
    layers = []
    for li, name in enumerate(LAYERS):
        keep = [e for e in range(N_EXPERTS) if not (li == 2 and e in pruned)]
        layers.append({"name": name, "experts": [
            {"bytes": bytes_per_expert, "format": fmt, "load": loads[name][e] if loads else None} for e in keep]})
    return {"stage": stage, "layers": layers}


def _stage(index: int, name: str, exact, expert_bytes: int, bits, prefill=8689.0, decode=1044.0, dev=0.0) -> dict:
    return {"index": index, "pass": name, "exact": exact, "expert_bytes": expert_bytes,
            "total_bytes": expert_bytes + 1_069_000, "active_expert_flops_per_token": 1.57e6, "bits_per_byte": bits,
            "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "pass_seconds": 0.5,
            "max_deviation": dev}


def make_data() -> dict:
    """A 5-pass pipeline (6 stages with the input) on 4 layers x 8 experts."""
    full = N_LAYERS * N_EXPERTS * EXPERT_BYTES
    quant = full // 4 + N_LAYERS * N_EXPERTS * 6144  # int4 payload + group scales
    pruned = quant - 3 * (EXPERT_BYTES // 4 + 6144)
    profiled, gated = _loads(0.6), _loads(1.5)
    return {
        "title": "moejax optimize", "model": "default",
        "pipeline": "profile,gating(skip_ratio=0.3),quantize(bits=4,group_size=64),prune(n=3),select-impl",
        "created": "2026-12-02 12:00 UTC", "machine": "x86_64, 2 CPUs, jax 0.x cpu",
        "stages": [
            _stage(0, "input", None, full, 1.5978, dev=None),
            _stage(1, "profile", True, full, None, prefill=None, decode=None),  # quality skipped
            _stage(2, f"gating {HOSTILE}", False, full, 1.6120, dev=2.1e-2),
            _stage(3, "quantize", False, quant, 1.6410, prefill=9120.0, decode=1301.0, dev=4.4e-2),
            _stage(4, "prune", False, pruned, 1.7050, dev=8.0e-2),
            _stage(5, "select-impl", True, pruned, 1.7050, prefill=12011.0, decode=1688.0),
        ],
        "diffs": [
            {"from": 0, "to": 1, "lines": []},
            {"from": 1, "to": 2, "lines": [f"layer {n}: moe_route k=2 -> k=2 gating=skip(0.3)" for n in LAYERS]},
            {"from": 2, "to": 3, "lines": [f"layer {n}: experts f32 -> int4-g64" for n in LAYERS]},
            {"from": 3, "to": 4, "lines": ["layer layers/2/mlp: experts 8 -> 5 (pruned 1, 4, 6)"]},
            {"from": 4, "to": 5, "lines": ["layer layers/0/mlp: expert impl dense -> blocked"]},
        ],
        "structure": [
            _structure(0, EXPERT_BYTES, "f32", None, set()),
            _structure(3, EXPERT_BYTES // 4 + 6144, "int4-g64", gated, set()),
            _structure(5, EXPERT_BYTES // 4 + 6144, "int4-g64", None, {1, 4, 6}),
        ],
        "loads": [{"stage": 1, "label": "profile", "layers": profiled},
                  {"stage": 2, "label": "gating", "layers": gated}],
    }


class _Checker(HTMLParser):
    """Checks that elements nest properly and collects what the assertions need."""
    VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr", "area", "base", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.svgs: list[dict] = []
        self.tags: list[str] = []
        self.rows: list[list[str]] = []  # the #stages table's body rows, as cell texts
        self._in = {"stages": False, "tbody": False, "td": False}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "svg":
            self.svgs.append(a)
        if tag == "table" and a.get("id") == "stages":
            self._in["stages"] = True
        if self._in["stages"] and tag == "tbody":
            self._in["tbody"] = True
        if self._in["tbody"] and tag == "tr":
            self.rows.append([])
        if self._in["tbody"] and tag == "td":
            self._in["td"] = True
            self.rows[-1].append("")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        if tag == "table":
            self._in["stages"] = self._in["tbody"] = False
        self._in["td"] = self._in["td"] and tag != "td"

    def handle_data(self, data):
        if self._in["td"]:
            self.rows[-1][-1] += data


def _parse(text: str) -> _Checker:
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert checker.stack == [], f"unclosed elements: {checker.stack}"
    return checker


def test_report_structure_and_escaping(tmp_path):
    data = make_data()
    path = write_report(tmp_path / "sub" / "report.html", data)
    assert path == tmp_path / "sub" / "report.html" and path.is_file()
    text = path.read_text(encoding="utf-8")
    assert text == render_report(data)
    page = _parse(text)

    assert len(page.rows) == len(data["stages"])
    assert all(len(r) == len(page.rows[0]) == 11 for r in page.rows)
    assert [r[1] for r in page.rows][:2] == ["input", "profile"]
    # None numbers render as "-": stage 1 has no bits/byte, prefill or decode; stage 0 no deviation.
    assert page.rows[1][6] == page.rows[1][7] == page.rows[1][8] == "-"
    assert page.rows[0][10] == "-" and page.rows[0][2] == "-"
    assert page.rows[3][6].startswith("1.6410 (+2.70%")  # the change relative to stage 0
    assert page.rows[3][2] == "lossy" and page.rows[1][2] == "exact"

    ids = [s.get("id") for s in page.svgs]
    classes = [s.get("class") for s in page.svgs]
    assert ids.count("quality-cost") == 1
    assert classes.count("heatmap") == len(data["loads"])
    assert classes.count("structure") == len(data["structure"])
    # Order: table, chart, diffs, heatmaps, structure.
    positions = [text.index(m) for m in ('id="stages"', 'id="quality-cost"', "Semantic diffs",
                                         'class="heatmap"', 'class="structure"')]
    assert positions == sorted(positions)
    assert "expert load after stage 1 (profile)" in text
    assert "stage 0 -&gt; 1 (profile)" in text and "no structural change" in text

    # Hostile names are escaped everywhere; the page has no script at all.
    assert HOSTILE not in text and "script" not in page.tags
    assert html_escaped(HOSTILE) in text
    # Self-contained: no references to anything on the network.
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(src|href)\s*=|@import|url\(""", text)


def html_escaped(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_report_structure_widths_share_one_scale():
    text = render_report(make_data())
    pictures = re.findall(r'<svg class="structure".*?</svg>', text, flags=re.S)
    widths = [[float(w) for w in re.findall(r'<rect x="[\d.]+" y="[\d.]+" width="([\d.]+)" height="18.00"', p)]
              for p in pictures]
    assert [len(w) for w in widths] == [32, 32, 29]  # three experts pruned from one layer
    # Quantized experts are (a quarter + scales) of the f32 ones, on the same scale (1 px gap).
    assert (widths[1][0] + 1) / (widths[0][0] + 1) == pytest.approx((EXPERT_BYTES // 4 + 6144) / EXPERT_BYTES,
                                                                    rel=0.01)
    assert all(re.search(r'width="(\d+)"', p).group(1) == "1100" for p in pictures)


def test_report_degenerate_inputs():
    data = make_data()
    for s in data["stages"]:
        s["bits_per_byte"] = None
    data.update(diffs=[], structure=[], loads=[])
    text = render_report(data)
    page = _parse(text)
    assert 'id="quality-cost"' not in text and "No stage has a bits/byte measurement" in text
    assert len(page.rows) == len(data["stages"]) and not page.svgs
    # A completely empty run still renders.
    _parse(render_report({"stages": []}))


# ---------------------------------------------------------------- in a real browser

def _console_messages(stderr: str) -> list[str]:
    """Console output of the page, from chromium's --enable-logging=stderr log.

    Chromium logs every console message (errors, uncaught exceptions, console.error alike) as
    ``[...:INFO:CONSOLE:<line>] "<message>", source: ...``: the level is INFO even for errors,
    so matching "ERROR" would find nothing. The report has no JavaScript, so any console line
    is a problem; ``ERROR:`` lines from chromium itself (dbus, GPU) are not CONSOLE lines.
    """
    return [line for line in stderr.splitlines() if re.search(r"CONSOLE[:(]", line) or "Uncaught" in line]


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    if os.environ.get("CI"):
        pytest.fail("CI must have a headless browser: chromium not found (.ci/run installs it with apt-get)")
    pytest.skip("chromium not installed")


def _render_in_browser(chromium: str, page: Path, tmp_path: Path) -> tuple[str, str, Path]:
    """Loads ``page`` headless; returns (dumped DOM, stderr log, screenshot path)."""
    png = tmp_path / "screenshot.png"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2000",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--no-first-run",
         f"--screenshot={png}", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr, png


def test_console_detector_catches_errors(chromium, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>throw new Error('x')</script></body></html>")
    _, stderr, _ = _render_in_browser(chromium, page, tmp_path)
    found = _console_messages(stderr)
    assert any("Uncaught Error: x" in line for line in found), stderr[-3000:]


def test_report_renders_in_chromium(chromium, tmp_path):
    from PIL import Image

    page = write_report(tmp_path / "report.html", make_data())
    dom, stderr, png = _render_in_browser(chromium, page, tmp_path)
    assert 'id="stages"' in dom and 'id="quality-cost"' in dom
    assert _console_messages(stderr) == [], stderr[-3000:]
    with Image.open(png) as img:
        assert img.size == (1280, 2000)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 100, "the screenshot looks blank"
    # The most common colour (the white background) leaves plenty of content.
    assert max(colours)[0] < 0.95 * 1280 * 2000
