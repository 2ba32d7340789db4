"""benchmarks/device_check.py in smoke mode (CPU: Pallas interpreter, tiny shapes) and the tokamax expert impl.

No timing is asserted: on CPU the speed rows only prove that every contender's code path runs.
"""
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_check  # noqa: E402

from moejax import dialect, tokamax_ffn, weight_formats  # noqa: E402

KERNELS = {"gmm", "gmm (custom vjp)", "gmm_gated", "ffn_pallas", "fused_route"}


@pytest.fixture(scope="module")
def smoke_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check") / "device_check.json"
    assert device_check.main(["--smoke", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_header_names_the_run(smoke_result):
    r = smoke_result
    assert r["benchmark"] == "device_check"
    assert r["backend"] == jax.default_backend() and r["jax"] == jax.__version__
    assert r["device_kind"] and r["date_utc"] and r["machine"]["cpu_count"]
    assert r["mode"] == {"smoke": True, "interpret": True, "pallas_driver": "mosaic"}
    assert set(r["sections"]) == {"correctness", "gmm_speed", "end_to_end"}
    for name, section in r["sections"].items():
        assert section["status"] in ("ok", "partial"), (name, section.get("reason"))


def test_every_kernel_passes_against_ragged_dot_and_float64(smoke_result):
    c = smoke_result["sections"]["correctness"]
    assert c["passed"] and c["mode"] == "interpret"
    assert KERNELS <= {row["kernel"] for row in c["rows"]}
    formats = {row["format"] for row in c["rows"] if row["kernel"] == "gmm"}
    assert {"float32", "bfloat16", "int8"} <= formats and any(f.startswith("int4") for f in formats)
    for row in c["rows"]:
        assert row["passed"] and "error" not in row, row
        assert row["max_rel_err_vs_float64"] <= row["threshold_rel"]
        ref_key = "max_rel_err_vs_route_reference" if row["kernel"] == "fused_route" else "max_rel_err_vs_ragged_dot"
        assert row[ref_key] <= row["threshold_rel"]
        assert row.get("padding_rows_zero", True)
    if not tokamax_ffn.AVAILABLE:
        assert c["tokamax_impl"] == {"checked": False, "reason": "tokamax not installed"}


def test_speed_rows_have_finite_medians_and_label_everything(smoke_result):
    s = smoke_result["sections"]["gmm_speed"]
    rows = s["rows"]
    measured = [r for r in rows if "median_s" in r]
    assert {r["contender"] for r in measured} >= {"pallas", "ragged_dot", "dense"}
    assert {r["shape"] for r in measured} == {sh.name for sh in device_check.SMOKE_SHAPES}
    assert {r["phase"] for r in measured} == {"decode", "prefill"}
    assert {r["format"] for r in measured if r["contender"] == "pallas"} == {"float32", "bf16", "int8", "int4-g16"}
    for r in rows:
        assert {"contender", "label", "format", "lhs_dtype", "shape", "d", "f", "experts", "top_k", "T"} <= set(r)
        assert "median_s" in r or r.get("skipped") or r.get("error"), r
        assert "error" not in r, r
    for r in measured:
        assert math.isfinite(r["median_s"]) and r["median_s"] > 0 and r["repeats"] >= 3
        assert len(r["times_s"]) == r["repeats"]
        assert r["x_dense"] > 0 and r["x_ragged_dot"] > 0
    # optional contenders: skipped with a reason, both in the section header and in each row
    if not tokamax_ffn.AVAILABLE:
        assert s["contenders"]["tokamax"] == {"available": False, "reason": "tokamax not installed"}
        assert all(r["skipped"] == "tokamax not installed" for r in rows if r["contender"] == "tokamax")
    assert s["contenders"]["megablox"] == {"available": False, "reason": "megablox gmm needs TPU"}
    assert s["goal"]["evaluated"] is False and s["goal"]["reason"]


def test_end_to_end_rows(smoke_result):
    e = smoke_result["sections"]["end_to_end"]
    rows = {r["pipeline"]: r for r in e["rows"]}
    assert len(rows) >= 2 and any(p.startswith("quantize(bits=4") for p in rows)
    for r in rows.values():
        assert "error" not in r, r
        assert r["prefill_median_s"] > 0 and r["decode_median_s_per_token"] > 0
        assert math.isfinite(r["rel_logit_dev_vs_traced"])
    assert rows["select-impl(impl=ragged)"]["max_abs_logit_dev_vs_traced"] < 1e-4  # exact pipeline
    if not tokamax_ffn.AVAILABLE:
        assert e["skipped"] == {"select-impl(impl=tokamax)": "tokamax not installed"}


@pytest.mark.parametrize("argv, message", [
    (["--budget-s", "0"], "--budget-s"), (["--repeats", "2"], "--repeats"), (["--sections", "kernels"], "unknown"),
    (["--nope"], "unrecognized"),
])
def test_bad_flags_are_one_line(capsys, argv, message):
    assert device_check.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_speed_tasks_put_goal_rows_first():
    tasks = device_check.speed_tasks(device_check.DEVICE_FORMATS, device_check.DEVICE_DECODE,
                                     device_check.DEVICE_PREFILL, smoke=False)
    assert tasks[:2] == [("bf16", 8192), ("bf16", 2048)]
    assert len(set(tasks)) == len(tasks) == len(device_check.DEVICE_FORMATS) * 5


def test_tokamax_module_without_tokamax_registers_nothing():
    if tokamax_ffn.AVAILABLE:
        pytest.skip("tokamax is installed")
    assert "tokamax" not in dialect.ffn_impls()
    assert tokamax_ffn.UNAVAILABLE_REASON


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("quantized", [False, True])
def test_tokamax_impl_computes_ffn_reference(activation, quantized):
    pytest.importorskip("tokamax")
    assert "tokamax" in dialect.ffn_impls()
    rng = np.random.default_rng(0)
    e, d, f = 4, 32, 48
    sizes = jnp.asarray([5, 0, 7, 3], jnp.int32)
    x = jnp.asarray(rng.standard_normal((18, d)), jnp.float32)  # 3 padding rows
    n = 3 if activation == "swiglu" else 2
    mats = [jnp.asarray(rng.standard_normal((e, d, f)) * 0.2, jnp.float32) for _ in range(n - 1)]
    mats.append(jnp.asarray(rng.standard_normal((e, f, d)) * 0.2, jnp.float32))
    ws = [weight_formats.quantize(w, 4, 16) for w in mats] if quantized else mats
    got = jax.jit(lambda a, g, w: dialect.moe_expert_ffn(a, g, w, activation=activation, impl="tokamax"))(
        x, sizes, ws)
    want = dialect.ffn_reference(x, sizes, ws, activation=activation)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[15:] == 0)


def test_select_impl_tokamax_through_optimize():
    pytest.importorskip("tokamax")
    import moejax
    from flax import nnx

    from moejax.models import MoEDecoder
    from moejax.models.presets import tiny

    model = MoEDecoder(tiny("mixtral", n_layers=1), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.arange(8, dtype=np.int32).reshape(1, 8))
    opt = moejax.optimize(model, (tokens,), "select-impl(impl=tokamax)")  # exact: checked against the reference
    assert opt.stages[-1].stats["ffn_impls"] == {"tokamax": 1}
    np.testing.assert_allclose(np.asarray(opt(tokens)), np.asarray(opt.at_stage(0)(tokens)), rtol=1e-5, atol=1e-5)
