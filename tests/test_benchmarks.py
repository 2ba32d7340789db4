"""Every benchmark script runs end to end on a tiny shape (a smoke test: the structure of its JSON
rows and the exactness of its exact rows are checked, never a speed)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402
import moe_layer  # noqa: E402

from moejax import dialect  # noqa: E402

# the scripts add PyTorch rows where torch and transformers are installed (the CI environment has both)
HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))

EXACT_ATOL = 1e-4  # exact rows against their reference (f32 sums blocked differently: ~1e-6)


@pytest.fixture(autouse=True)
def _thread_env(monkeypatch):
    """The scripts set NPROC / MOEJAX_NUM_THREADS for their own process; undo that for the other tests."""
    for name in ("NPROC", "MOEJAX_NUM_THREADS"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])  # restored as it was after the test
        else:
            monkeypatch.delenv(name, raising=False)  # removed again after the test


def _load(path: Path) -> dict:
    result = json.loads(path.read_text())
    # every benchmark records where, when and with how many threads
    assert result["complete"] and result["date_utc"] and result["machine"]["cpu_count"] >= 1
    assert result["threads"]["threads"] == result["threads"]["xla_cpu_threads"] >= 1
    return result


def test_moe_layer_rows_come_from_optimize_and_keep_exact_and_lossy_apart(tmp_path):
    out = tmp_path / "moe_layer.json"
    assert moe_layer.main(["--shapes", "tiny", "--tokens", "8", "--formats", "float,int4", "--repeats", "1",
                           "--out", str(out)]) == 0
    result = _load(out)
    rows = {(r["format"], r["contender"]): r for r in result["rows"]}
    impls = [i for i in dialect.ffn_impls() if i not in ("reference", "pallas")]
    for fmt, pipeline in (("float", "select-impl"), ("int4-g128", "quantize(bits=4,group_size=128),select-impl")):
        choice = rows[(fmt, "moejax")]
        assert choice["pipeline"] == pipeline and choice["impl"] in impls
        for impl in impls:  # a row per registered implementation, forced through select-impl(impl=...)
            forced = rows.get((fmt, f"moejax:impl={impl}"))
            if forced is None:  # it cannot run on this machine (e.g. no C++ compiler): said so in the JSON
                assert f"tiny {pipeline.replace('select-impl', f'select-impl(impl={impl})')}" in result["skipped"]
                continue
            assert forced["impl"] == impl and forced["pipeline"].endswith(f"select-impl(impl={impl})")
        for (f, name), r in rows.items():
            if f == fmt and name.startswith("moejax"):
                # each moejax row computes what its pipeline's reference stage computes
                assert r["max_abs_err_vs_reference"] < EXACT_ATOL, (fmt, name)
                assert r["exact"] is (fmt == "float") and r["phase"] == "decode" and r["x_mem_bound"] > 0
                assert len(r["times_s"]) == r["repeats"] == 1 and r["threads"] == result["threads"]["threads"]
    for r in result["rows"]:
        assert {"shape", "T", "phase", "format", "contender", "median_ms", "x_torch", "x_mem_bound"} <= set(r)
        if r["format"] == "float" and r["contender"].startswith("moejax"):
            assert r["max_abs_err_vs_dense_all"] < EXACT_ATOL
        if r["exact"] is False and r["contender"].startswith("moejax"):
            assert r["x_torch"] is None  # lossy rows are never compared to float PyTorch as if equal
    # quantized experts: fewer bytes in the memory bound
    assert rows[("int4-g128", "moejax")]["touched_bytes"] < rows[("float", "moejax")]["touched_bytes"]
    assert {"reference:dense_all", "reference:gshard", "reference:dense_eq"} <= {c for _, c in rows}
    if HAS_TORCH:
        assert rows[("float", "torch")]["max_abs_err_vs_dense_all"] < EXACT_ATOL
        assert rows[("float", "moejax")]["x_torch"] > 0 and rows[("int4-g128", "moejax")]["x_torch_float"] > 0
        assert result["threads"]["torch_threads"] == result["threads"]["threads"]


def test_end_to_end_smoke_labels_exact_and_lossy_pipelines(tmp_path):
    import end_to_end

    out = tmp_path / "end_to_end.json"
    assert end_to_end.main(["--smoke", "--seq-len", "8", "--decode-tokens", "2", "--repeats", "1",
                            "--out", str(out)]) == 0
    result = _load(out)
    rows = {r["label"]: r for r in result["rows"]}
    exact = rows["moejax: select-impl"]
    lossy = rows["moejax: quantize(bits=4,group_size=64),select-impl"]
    assert exact["exact"] and not lossy["exact"] and exact["pipeline"] == "select-impl"
    for r in (exact, lossy):
        assert len(r["prefill_times_s"]) == len(r["decode_times_s"]) == 1 and r["decode_tokens_per_s"] > 0
    assert "decode_x_torch" not in lossy and "prefill_x_torch" not in lossy
    assert lossy["decode_x_exact"] > 0
    if HAS_TORCH:
        assert rows["torch"]["exact"] and exact["decode_x_torch"] > 0 and lossy["decode_x_torch_float"] > 0
        assert exact["max_abs_logit_diff_vs_torch"] < EXACT_ATOL
        assert result["threads"]["torch_threads"] == result["threads"]["threads"]


def test_quantize_speed_smoke(tmp_path):
    import quantize_speed

    out = tmp_path / "quantize_speed.json"
    assert quantize_speed.main(["--smoke", "--eval-bytes", "128", "--decode-tokens", "2", "--batches", "1",
                                "--repeats", "1", "--out", str(out)]) == 0
    result = _load(out)
    quality = {r["variant"]: r for r in result["quality"]}
    assert quality["float"]["exact"] and not quality["int4-g64"]["exact"]
    assert quality["int4-g64"]["expert_bytes"] < quality["float"]["expert_bytes"]
    speed = {r["variant"]: r for r in result["rows"]}
    assert speed["float"]["x_float"] == 1.0 and speed["float"]["pipeline"] == "select-impl"
    assert not speed["int4-g64"]["exact"] and len(speed["int4-g64"]["times_s"]) == 1


def test_kernel_speed_smoke(tmp_path):
    import kernel_speed

    out = tmp_path / "kernel_speed.json"
    assert kernel_speed.main(["--smoke", "--out", str(out)]) == 0
    result = _load(out)
    assert result["level"] == "kernel" and result["rows"]
    for r in result["rows"]:
        assert r["level"] == "kernel"
        if r["kind"] == "cpu_correctness":  # CPU: the Pallas interpreter against ragged_dot
            assert r["max_abs_err_vs_ragged_dot"] < EXACT_ATOL


def test_benchmark_scripts_shadow_no_package_that_transformers_imports():
    """The tests import the benchmark scripts by their bare names (``benchmarks/`` on ``sys.path``),
    and a test worker then runs other test files. A script named like a package that a dependency
    imports when present takes that package's place: ``benchmarks/kernels.py`` broke every
    transformers test after it once transformers 5.25 began importing the hub's ``kernels``
    package. In a fresh interpreter, every script is imported first, then transformers."""
    if not HAS_TORCH:
        pytest.skip("transformers is not installed")
    names = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
            f"for name in {names!r}: __import__(name)\n"
            "import transformers\n"
            "config = transformers.MixtralConfig(vocab_size=16, hidden_size=8, intermediate_size=8, "
            "num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_local_experts=2)\n"
            "transformers.MixtralForCausalLM(config)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]


def test_ep_overlap_smoke(tmp_path):
    # a subprocess: the script asks XLA for 8 host devices before JAX starts
    out = tmp_path / "ep_overlap.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ep_overlap.py"), "--smoke", "--batch", "2",
                           "--seq", "16", "--calibration-bytes", "512", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _load(out)
    kinds = {}
    for r in result["rows"]:
        kinds.setdefault(r["kind"], []).append(r)
    assert kinds["placement"] and all(r["after_max"] <= r["before_max"] for r in kinds["placement"])
    timing = {r["devices"]: r for r in kinds["timing"]}
    assert timing[1]["pipeline"] == "profile,select-impl" and timing[2]["chunks"] == 2
    for r in kinds["timing"]:  # dropless expert parallelism computes what one device computes
        assert r["exact"] and r["max_abs_dev"] < EXACT_ATOL and len(r["times_s"]) == 1
    exports = {r["chunks"]: r["all_to_all"] for r in kinds["export"]}
    assert exports[2] == 2 * exports[1] > 0  # two chunks: twice the all-to-alls


def test_offload_smoke(tmp_path):
    import offload as offload_benchmark

    out = tmp_path / "offload.json"
    # the script stops if an offload row decodes other logits than the same parts all resident
    assert offload_benchmark.main(["--smoke", "--tokens", "2", "--large-tokens", "2", "--repeats", "1",
                                   "--budgets", "0.25", "--out", str(out)]) == 0
    result = _load(out)
    rows = {r["row"]: r for r in result["rows"]}
    assert "naive" in rows and "cache 0.25 next-use + prefetch top-3" in rows
    assert all(r["exact"] and len(r["times_s"]) == 1 for r in rows.values())


def test_compression_quality_smoke(tmp_path):
    import compression_quality

    out = tmp_path / "compression_quality.json"
    assert compression_quality.main(["--smoke", "--only", "reap", "--eval-bytes", "128", "--calib-bytes", "256",
                                     "--seq-len", "32", "--batch", "2", "--no-plot", "--out", str(out)]) == 0
    base, prune = _load(out)["rows"]
    assert base["setting"] == "baseline" and base["exact"]
    assert prune["setting"] == "prune 75% reap" and not prune["exact"]  # a lossy row, labelled in full
    assert prune["pipeline"] == compression_quality.PREFIX + ",prune(keep=0.75,method=reap)"
    assert prune["experts_kept"] == 6 and prune["bits_per_byte"] > 0


@pytest.mark.parametrize("script,argv", [
    ("moe_layer", ["--formats", "int5"]),
    ("moe_layer", ["--shapes", "tiny", "--tokens", "0"]),
    ("end_to_end", ["--pipeline", "select-impl,nonsense"]),
    ("quantize_speed", ["--rows", "int9"]),
    ("compression_quality", ["--out", "folder"]),
])
def test_bad_flags_stop_with_a_usage_error(script, argv, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()[-1]) > 0


def test_threads_cannot_change_after_xla_started():
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()  # the backend has started
    assert common.set_threads(None)["threads"] == common.xla_cpu_threads()
    with pytest.raises(ValueError, match="already started"):
        common.set_threads(common.xla_cpu_threads() + 1)


def test_profile_decode_runs_on_the_tiny_shape(capsys):
    import profile_decode

    from moejax import native_build

    if not native_build.available() and not os.environ.get("CI"):
        pytest.skip(f"native kernels unavailable: {native_build.unavailable_reason()}")

    assert profile_decode.main(["--shape", "tiny", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "layer through optimize: warm" in out and "native down call" in out and "without its expert FFN" in out


def test_sharded_load_memory_stays_within_the_bound(tmp_path):
    """Loading onto a mesh grows a process's resident memory by at most 1.5 x its share + one tensor.

    (``growth`` excludes the ~200 MB JAX itself holds before the load; the committed
    3 GB run in benchmarks/results/sharded_load.json meets the bound on the absolute peak too.)
    """
    out = tmp_path / "sharded_load.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sharded_load.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = _load(out)
    rows = {(r["mode"], r["process"]): r for r in result["rows"]}
    assert len(rows) == 4
    for (mode, _), r in rows.items():
        if "mesh" in mode and "no mesh" not in mode:
            assert r["growth_mb"] <= r["bound_mb"], r
            assert r["device_bytes_mb"] <= r["growth_mb"] * 1.05  # what was loaded is what stays resident
    two = [r for (mode, _), r in rows.items() if mode.startswith("2 processes")]
    one = rows[("one process, mesh expert=8", 0)]
    assert all(r["device_bytes_mb"] < 0.6 * one["device_bytes_mb"] for r in two)  # each holds about half


def test_merge_vs_drop_prints_one_ratio_line_per_layer(capsys):
    import merge_vs_drop

    assert merge_vs_drop.main(["--smoke", "--calib-bytes", "512", "--seq-len", "64", "--batch", "2"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "absorbing is cheaper than dropping" in l]
    assert len(lines) == 2 and all("of 8 experts" in l and "median" in l for l in lines)
