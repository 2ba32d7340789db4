"""moejax.data (corpus, split, batches) and moejax.evaluation (bpb, speed, n-gram, expert load)."""
from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import data, evaluation
from moejax.models.decoder import MoEDecoder, tiny_mixtral
from moejax.models.default_model import to_scanned

TEXT = (b"def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 12)[:700]


@pytest.fixture(scope="module")
def tiny_model() -> MoEDecoder:
    return MoEDecoder(tiny_mixtral(vocab_size=256), rngs=nnx.Rngs(3))


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
def _fake_stdlib(root: Path) -> None:
    for rel in ["os.py", "json/__init__.py", "json/decoder.py", "test/test_os.py", "site-packages/x/y.py",
                "idlelib/idle_test/t.py", "_sysconfigdata__linux.py", "config-3.11/m.py", "README.txt",
                "abc.py", "asyncio/staggered.py", "asyncio/tasks.py"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"# {rel}\nx = 1\n".encode())


def test_stdlib_files_exclude_tests_and_site_packages(tmp_path):
    _fake_stdlib(tmp_path)
    files = [f.as_posix() for f in data.stdlib_files(tmp_path)]
    assert files == ["abc.py", "asyncio/staggered.py", "asyncio/tasks.py", "json/__init__.py",
                     "json/decoder.py", "os.py"]


def test_split_is_deterministic_disjoint_and_by_file(tmp_path):
    _fake_stdlib(tmp_path)
    train, held = data.split_files(tmp_path)
    assert (train, held) == data.split_files(tmp_path)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(data.stdlib_files(tmp_path))
    # The hash rule is fixed: these two files land on the held-out side everywhere.
    assert data.is_heldout("abc.py") and data.is_heldout("asyncio/staggered.py")
    assert not data.is_heldout("os.py")
    assert [p.as_posix() for p in held] == ["abc.py", "asyncio/staggered.py"]
    text = data.train_bytes(root=tmp_path)
    assert text.count(data.FILE_SEPARATOR) == len(train)
    assert b"# os.py" in text and b"# abc.py" not in text
    assert data.heldout_files_bytes(root=tmp_path).startswith(b"# abc.py\n")


def test_real_stdlib_split_is_disjoint():
    train, held = data.split_files()
    assert len(held) > 10 and len(train) > 10 * len(held)
    assert not {p.as_posix() for p in train} & {p.as_posix() for p in held}


def test_batches_deterministic_shapes():
    a = list(zip(range(3), data.batches(TEXT, batch=4, seq_len=16, seed=1)))
    b = list(zip(range(3), data.batches(TEXT, batch=4, seq_len=16, seed=1)))
    for (_, x), (_, y) in zip(a, b):
        assert x.shape == (4, 17) and x.dtype == np.int32
        np.testing.assert_array_equal(x, y)
    row = a[0][1][0]
    assert data.decode(row) in TEXT  # windows are contiguous slices of the text
    with pytest.raises(ValueError, match="more than seq_len"):
        next(data.batches(b"abc", batch=1, seq_len=8))


def test_calibration_tokens_and_codec():
    cal = data.calibration_tokens(100, 32, data=TEXT)
    assert cal.shape == (3, 32)
    assert data.decode(cal.reshape(-1)) == TEXT[:96]
    np.testing.assert_array_equal(data.encode("é"), [0xC3, 0xA9])
    with pytest.raises(ValueError, match="token ids"):
        data.decode([300])
    # a calibration size from a user's pipeline string: the error says what to ask for instead
    with pytest.raises(ValueError, match="less than one window of 32 tokens; ask for at least 32 bytes"):
        data.calibration_tokens(1, 32, data=TEXT)
    with pytest.raises(ValueError, match=f"has only {len(TEXT)}; ask for at most {len(TEXT)} bytes"):
        data.calibration_tokens(len(TEXT) + 64, 32, data=TEXT)


# ---------------------------------------------------------------------------
# bits per byte
# ---------------------------------------------------------------------------
def _hand_bits_per_byte(model, text: bytes, seq_len: int) -> float:
    arr = np.frombuffer(text, np.uint8).astype(np.int32)
    forward = nnx.jit(lambda m, t: m(t))  # one window at a time, unpadded (two shapes compile)
    total, n = 0.0, 0
    for start in range(0, len(arr) - 1, seq_len):
        window = arr[start: start + seq_len + 1]
        logits = np.asarray(forward(model, jnp.asarray(window[None, :-1])), np.float64)[0]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= logp[np.arange(len(window) - 1), window[1:]].sum()
        n += len(window) - 1
    assert n == len(arr) - 1
    return total / n / math.log(2)


def test_bits_per_byte_matches_hand_computation(tiny_model):
    # 699 predictions in windows of 64: the last window is partial and the last batch padded.
    got = evaluation.bits_per_byte(tiny_model, TEXT, seq_len=64, batch=4)
    want = _hand_bits_per_byte(tiny_model, TEXT, 64)
    assert math.isfinite(got) and 6.0 < got < 10.0  # an untrained model is near log2(256) = 8
    assert got == pytest.approx(want, rel=1e-5)
    assert evaluation.bits_per_byte(tiny_model, TEXT, eval_bytes=200, seq_len=64, batch=4) == pytest.approx(
        _hand_bits_per_byte(tiny_model, TEXT[:200], 64), rel=1e-5)


def test_bits_per_byte_rejects_bad_input(tiny_model):
    with pytest.raises(ValueError, match="at least 2 bytes"):
        evaluation.bits_per_byte(tiny_model, b"a")
    with pytest.raises(TypeError, match="bytes or str"):
        evaluation.bits_per_byte(tiny_model, [1, 2, 3])
    with pytest.raises(TypeError, match="init_cache"):
        evaluation.bits_per_byte(lambda t: t, TEXT)


# ---------------------------------------------------------------------------
# n-gram baseline
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_kneser_ney_is_normalised(order):
    model = evaluation.KneserNeyBytes(TEXT + bytes(range(0, 256, 7)), order)
    for ctx in (b"de", b"\x00\xff", b"x"):
        total = sum(model.probs(ctx + bytes([w]))[-1] for w in range(256))
        assert total == pytest.approx(1.0, abs=1e-9)


def test_ngram_baseline_sanity():
    rep = b"the quick brown fox. " * 200
    assert evaluation.ngram_bits_per_byte(rep, rep[:2000], order=2) < 0.1
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 20000, dtype=np.uint8).tobytes()
    assert evaluation.ngram_bits_per_byte(noise, noise[::-1][:4000], order=0) > 7.9
    sample = data.train_bytes(max_bytes=200_000)
    held = data.heldout_files_bytes(max_bytes=30_000)
    bpb = [evaluation.ngram_bits_per_byte(sample, held, order=o) for o in (0, 1, 2)]
    assert 4.0 < bpb[0] < 6.5 and bpb[0] > bpb[1] > bpb[2]
    with pytest.raises(ValueError, match="order"):
        evaluation.ngram_bits_per_byte(sample, held, order=9)


# ---------------------------------------------------------------------------
# evaluate and expert load
# ---------------------------------------------------------------------------
class _Wrapped:
    """A non-NNX model with the same call forms (like an optimised model)."""

    def __init__(self, model):
        graphdef, state = nnx.split(model)
        self._fwd = jax.jit(lambda t: nnx.merge(graphdef, state)(t))
        self._step = jax.jit(lambda t, c, i: nnx.merge(graphdef, state)(t, cache=c, cache_index=i))
        self.init_cache = model.init_cache
        self.weight_bytes = 1234

    def __call__(self, tokens, cache=None, cache_index=None):
        return self._fwd(tokens) if cache is None else self._step(tokens, cache, cache_index)


def test_evaluate_reports_quality_speed_and_bytes(tiny_model):
    kw = dict(eval_bytes=300, seq_len=32, batch=2, decode_tokens=4, repeats=2)
    res = evaluation.evaluate(tiny_model, TEXT, **kw)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(tiny_model, nnx.Param)))
    assert res.weight_bytes == 4 * n_params
    assert res.prefill_tokens_per_s > 0 and res.decode_tokens_per_s > 0
    assert res.scored_bytes == 299
    assert res.bits_per_byte == pytest.approx(
        evaluation.bits_per_byte(tiny_model, TEXT[:300], seq_len=32, batch=2), rel=1e-6)
    wrapped = evaluation.evaluate(_Wrapped(tiny_model), TEXT, **kw)
    assert wrapped.weight_bytes == 1234
    assert wrapped.bits_per_byte == pytest.approx(res.bits_per_byte, rel=1e-5)
    assert set(res.as_dict()) >= {"bits_per_byte", "prefill_tokens_per_s", "decode_tokens_per_s", "weight_bytes"}
    with pytest.raises(ValueError, match="decode_batch"):
        evaluation.evaluate(tiny_model, TEXT, batch=2, decode_batch=3)


def test_expert_load_counts_routing_slots(tiny_model):
    load = evaluation.expert_load(tiny_model, TEXT, seq_len=64, batch=4)
    cfg = tiny_model.config
    assert load.shape == (cfg.n_layers, cfg.n_experts)
    np.testing.assert_allclose(load.sum(1), 1.0)
    # Layer 0 by hand: the router input is the post-attention norm of x + attention(x).
    arr = jnp.asarray(np.frombuffer(TEXT[:65], np.uint8).astype(np.int32)[None, :64])
    layer = tiny_model.layers[0]
    x = tiny_model.embed_tokens(arr)
    h, _ = layer.self_attn(layer.input_layernorm(x), jnp.arange(64)[None])
    logits = np.asarray(layer.mlp.router_logits(layer.post_attention_layernorm(x + h)))
    top2 = np.argsort(-logits, axis=-1)[:, :2]
    want = np.bincount(top2.reshape(-1), minlength=cfg.n_experts) / top2.size
    np.testing.assert_allclose(evaluation.expert_load(tiny_model, TEXT[:65], seq_len=64, batch=1)[0], want)
    # The scanned form of the same weights routes identically.
    np.testing.assert_allclose(evaluation.expert_load(to_scanned(tiny_model), TEXT, seq_len=64, batch=4), load)
