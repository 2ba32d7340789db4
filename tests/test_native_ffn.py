"""impl="native": the C++ grouped-matmul kernel computes the expert op's function, and falls back cleanly."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import dialect, native_build, weight_formats as wf
from moejax.expert_layout import split_experts
from moejax.native_ffn import ffn_native, grouped_matmul, uses_kernel

# Skipped where no C++ compiler is found, except under CI (.ci/run installs g++): there it must run.
pytestmark = pytest.mark.skipif(not native_build.available() and not os.environ.get("CI"),
                                reason=f"native kernels unavailable: {native_build.unavailable_reason()}")

FORMATS = {
    "float": lambda w: w,
    "int8": lambda w: wf.quantize(w, 8),
    "int8-g32-asym": lambda w: wf.quantize(w, 8, 32, symmetric=False),
    "int4-g16": lambda w: wf.quantize(w, 4, 16),
    "int4-g32-asym": lambda w: wf.quantize(w, 4, 32, symmetric=False),
}


def _weights(e, d, f, gated, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(e, d, f), (e, d, f), (e, f, d)] if gated else [(e, d, f), (e, f, d)]
    return [jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.1) for s in shapes]


def _close(got, want):
    """Within select-impl's declared tolerance (rtol 1e-5 of the largest output)."""
    got, want = np.asarray(got), np.asarray(want)
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)) + 1e-7


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("split", [False, True], ids=["stacked", "per-expert"])
def test_native_matches_the_reference(fmt, split):
    # d=96, f=320: 256-, 128- and 64-column vector tiles (by rows per tile) and narrower portable tails
    e, d, f = 4, 96, 320
    mats = [FORMATS[fmt](w) for w in _weights(e, d, f, gated=True)]
    weights = [split_experts(w) for w in mats] if split else mats
    rng = np.random.default_rng(1)
    for sizes in ([1, 0, 1, 0], [3, 5, 0, 1], [0, 0, 0, 2], [9, 0, 0, 0]):
        n = sum(sizes) + 3  # three padding rows past the groups must come out zero
        x = jnp.asarray(rng.standard_normal((n, d)).astype(np.float32))
        gs = jnp.asarray(np.array(sizes, np.int32))
        assert uses_kernel(x, gs, weights)
        got = jax.jit(lambda x, s, w: ffn_native(x, s, w, activation="swiglu"))(x, gs, weights)
        _close(got, dialect.ffn_reference(x, gs, mats, activation="swiglu"))
        assert not np.any(np.asarray(got)[sum(sizes):])


def test_native_ungated_activation_and_mixed_formats():
    """gelu takes (w_up, w_down); an up and a down weight of different formats run as separate calls."""
    up, down = _weights(3, 64, 128, gated=False)
    mats = [wf.quantize(up, 4, 16), wf.quantize(down, 8)]
    x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32))
    gs = jnp.asarray(np.array([2, 0, 3], np.int32))
    got = jax.jit(lambda x, s, w: ffn_native(x, s, w, activation="gelu"))(x, gs, mats)
    _close(got, dialect.ffn_reference(x, gs, mats, activation="gelu"))


def test_grouped_matmul_fuses_matrices_of_one_format():
    w0, w1, _ = _weights(2, 64, 64, gated=True)
    x = jnp.ones((2, 64), jnp.float32)
    gs = jnp.asarray(np.array([1, 1], np.int32))
    text = jax.jit(lambda x: grouped_matmul(x, gs, w0, w1)).lower(x).as_text()
    assert text.count("moejax_grouped_matmul") == 1
    y0, y1 = grouped_matmul(x, gs, w0, w1)
    _close(y0, jnp.stack([x[0] @ w0[0], x[1] @ w0[1]]))
    _close(y1, jnp.stack([x[0] @ w1[0], x[1] @ w1[1]]))
    with pytest.raises(ValueError, match="reads float32, int8 and int4"):
        grouped_matmul(x, gs, wf.quantize_lowbit(w0, 3, 16))


def test_prefill_and_unsupported_weights_run_blocked():
    """Many rows per expert (compute-bound), bf16 rows or 3-bit weights: XLA's dots, the same function."""
    mats = _weights(2, 32, 48, gated=True)
    gs = jnp.asarray(np.array([40, 40], np.int32))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((80, 32)).astype(np.float32))
    assert not uses_kernel(x, gs, mats)
    assert "moejax_grouped_matmul" not in jax.jit(
        lambda x: ffn_native(x, gs, mats, activation="swiglu")).lower(x).as_text()
    small = jnp.asarray(np.array([1, 1], np.int32))
    assert not uses_kernel(x[:2].astype(jnp.bfloat16), small, mats)
    low = [wf.quantize_lowbit(w, 3, 16) for w in mats]
    assert not uses_kernel(x[:2], small, low)
    _close(ffn_native(x[:2], small, low, activation="swiglu"),
           dialect.ffn_reference(x[:2], small, low, activation="swiglu"))


def test_native_under_vmap():
    mats = [wf.quantize(w, 4, 16) for w in _weights(2, 32, 64, gated=True)]
    xs = jnp.asarray(np.random.default_rng(4).standard_normal((3, 2, 32)).astype(np.float32))
    gs = jnp.asarray(np.array([1, 1], np.int32))
    got = jax.vmap(lambda x: ffn_native(x, gs, mats, activation="swiglu"))(xs)
    for i in range(3):
        _close(got[i], dialect.ffn_reference(xs[i], gs, mats, activation="swiglu"))


def test_select_impl_picks_native_on_cpu_and_the_pipeline_checks_it(tiny_model, tokens):
    """auto on CPU is native; the stage check compares it with the reference within the declared tolerance."""
    opt = moejax.optimize(tiny_model, (tokens,), "quantize(bits=4,group_size=16),select-impl")
    assert opt.stages[-1].stats["ffn_impls"] == {"native": 2}
    assert opt.stages[-1].max_deviation is not None
    np.testing.assert_allclose(opt(tokens), opt.stages[1].program(tokens), rtol=1e-5, atol=1e-5)


def test_without_a_compiler_select_impl_keeps_blocked(tmp_path):
    """A failed build is one line of reason; auto falls back to blocked and impl=native still runs (blocked)."""
    script = textwrap.dedent("""
        import jax.numpy as jnp, numpy as np
        from moejax import dialect, native_build
        from moejax.native_ffn import ffn_native
        from moejax.passes.select_impl import SelectImpl
        reason = native_build.unavailable_reason()
        assert reason is not None and "\\n" not in reason and "CXX" in reason, reason
        assert SelectImpl().resolve("cpu") == "blocked"
        rng = np.random.default_rng(0)
        mats = [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in ((2, 8, 16), (2, 8, 16), (2, 16, 8))]
        x, gs = jnp.ones((2, 8), jnp.float32), jnp.asarray(np.array([1, 1], np.int32))
        got = ffn_native(x, gs, mats, activation="swiglu")
        want = dialect.ffn_reference(x, gs, mats, activation="swiglu")
        assert np.max(np.abs(np.asarray(got) - np.asarray(want))) < 1e-4
        print("fallback ok:", reason)
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "MOEJAX_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fallback ok: $CXX=" in out.stdout


def test_build_cache_is_keyed_and_reused(tmp_path, monkeypatch):
    """The library lives under a key of source, compiler, flags, jaxlib and CPU; a second load reuses it."""
    path = native_build.library_path()
    assert path.exists() and path.parent.name.isalnum() and len(path.parent.name) == 16
    monkeypatch.setenv("MOEJAX_CACHE_DIR", str(tmp_path))
    assert native_build.library_path().parent.name == path.parent.name  # same key, other root
    assert str(native_build.library_path()).startswith(str(tmp_path))


def test_portable_tiles_without_avx512(tmp_path):
    """Machines without AVX-512 run the portable C++ tiles: build them (-mno-avx512f) and check parity."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from moejax import dialect, native_build, weight_formats as wf
        native_build._FLAGS = native_build._FLAGS + ("-mno-avx512f",)
        assert native_build.unavailable_reason() is None, native_build.unavailable_reason()
        from moejax.native_ffn import ffn_native
        rng = np.random.default_rng(0)
        shapes = ((3, 96, 320), (3, 96, 320), (3, 320, 96))
        mats = [jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.1) for s in shapes]
        x = jnp.asarray(rng.standard_normal((9, 96)).astype(np.float32))
        gs = jnp.asarray(np.array([1, 5, 2], np.int32))
        for fmt in (lambda w: w, lambda w: wf.quantize(w, 8), lambda w: wf.quantize(w, 4, 16, symmetric=False)):
            ws = [fmt(w) for w in mats]
            got = np.asarray(ffn_native(x, gs, ws, activation="swiglu"))
            want = np.asarray(dialect.ffn_reference(x, gs, ws, activation="swiglu"))
            assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want)), np.max(np.abs(got - want))
        print("portable ok")
    """)
    env = {**os.environ, "MOEJAX_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "portable ok" in out.stdout


def test_an_unwritable_cache_folder_is_one_line(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    script = ("from moejax import native_build; r = native_build.unavailable_reason(); "
              "assert r and 'MOEJAX_CACHE_DIR' in r and '\\n' not in r, r; print(r)")
    env = {**os.environ, "MOEJAX_CACHE_DIR": str(not_a_folder)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cannot build in" in out.stdout
