"""Hostile checkpoint folders: each defect fails with ONE CheckpointError line naming the file or field.

A valid tiny Mixtral checkpoint (written by ``save_pretrained_hf``) is copied per
test and corrupted in one way; ``from_pretrained`` must refuse it with a one-line
message, never a traceback from deep inside the loader or a hang. Also: a copy of
the bundled model's folder loads like the bundled model, and ``is_byte_level``.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import models
from moejax.models import DEFAULT_MODEL_DIR, CheckpointError, MoEDecoder, tiny_mixtral
from moejax.models.safetensors_io import INDEX_FILE


def _export(folder: Path, **overrides) -> Path:
    models.save_pretrained_hf(MoEDecoder(tiny_mixtral(**overrides), rngs=nnx.Rngs(0)), str(folder))
    return folder


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("valid"))


@pytest.fixture
def ckpt(valid, tmp_path) -> Path:
    return Path(shutil.copytree(valid, tmp_path / "ckpt"))


# --------------------------------------------------------------------------
# Corruptions
# --------------------------------------------------------------------------
def _read(folder: Path) -> tuple[dict, bytes]:
    raw = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def _write(folder: Path, header: dict | list | bytes, data: bytes = b"", length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if length is None else length
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", length) + raw + data)


def _edit_entry(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Apply ``edit`` to the header entry of the first tensor."""
    def corrupt(folder: Path) -> None:
        header, data = _read(folder)
        edit(header[sorted(k for k in header if k != "__metadata__")[0]])
        _write(folder, header, data)
    return corrupt


def _overlap(folder: Path) -> None:
    header, data = _read(folder)
    a, b = sorted(k for k in header if k != "__metadata__")[:2]
    header[b] = dict(header[a])
    _write(folder, header, data)


def _config(**changes) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **changes}))
    return corrupt


def _drop_config_field(folder: Path, name: str) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    del cfg[name]
    (folder / "config.json").write_text(json.dumps(cfg))


def _moejax_config(folder: Path, **changes) -> None:
    """Make ``folder`` a bundled-format checkpoint (its config only: the config is checked first)."""
    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))


def _sparse_header(length: int) -> Callable[[Path], None]:
    """A header length as long as the (sparse, so instant) file, but over the size cap."""
    def corrupt(folder: Path) -> None:
        _write(folder, b"", length=length)
        os.truncate(folder / "model.safetensors", 8 + length)
    return corrupt


def _index(weight_map: object) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return corrupt


def _index_naming(shard: str) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        header, _ = _read(folder)
        names = sorted(k for k in header if k != "__metadata__")
        _index({**dict.fromkeys(names, "model.safetensors"), names[0]: shard})(folder)
    return corrupt


def _write_file(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content)


def _fifo(name: str) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        (folder / name).unlink()
        os.mkfifo(folder / name)
    return corrupt


# (id, corruption, text the one-line message must contain: the file or field, and the problem)
CASES = [
    ("random-bytes", _write_file("model.safetensors", np.random.default_rng(0).bytes(4096)),
     "model.safetensors is corrupt or not a safetensors file: header length"),
    ("shorter-than-8-bytes", _write_file("model.safetensors", b"abc"), "model.safetensors is corrupt"),
    ("truncated", lambda f: os.truncate(f / "model.safetensors", os.path.getsize(f / "model.safetensors") - 100),
     "fall outside the"),
    ("truncated-in-header", lambda f: os.truncate(f / "model.safetensors", 100),
     "header length 4"),
    ("huge-header-length", lambda f: _write(f, *_read(f), length=2**63), "header length 9223372036854775808"),
    ("header-over-cap", _sparse_header(101 * 2**20), "exceeds the 104857600 byte limit"),
    ("header-not-json", lambda f: _write(f, b"{not json", b"\0" * 64), "header is not UTF-8 JSON"),
    ("header-not-utf8", lambda f: _write(f, b"\xff\xfe{}", b""), "header is not UTF-8 JSON"),
    ("header-is-list", lambda f: _write(f, [1, 2], b""), "header must be a JSON object, got [1, 2] (a list)"),
    ("entry-not-object", _edit_entry(lambda e: e.clear()), "dtype must be a string, got None"),
    ("bad-dtype", _edit_entry(lambda e: e.update(dtype="Q7")), "has dtype 'Q7', which moejax cannot read"),
    ("shape-not-ints", _edit_entry(lambda e: e.update(shape=[4, "32"])), "shape must be a list of non-negative"),
    ("offsets-bool", _edit_entry(lambda e: e.update(data_offsets=[False, 8])), "data_offsets must be [begin, end]"),
    ("offsets-outside-file", _edit_entry(lambda e: e.update(data_offsets=[0, 10**12])), "fall outside the"),
    ("shape-offset-mismatch", _edit_entry(lambda e: e.update(shape=[e["shape"][0] * 2, *e["shape"][1:]])),
     "needs"),
    ("huge-shape", _edit_entry(lambda e: e.update(shape=[2**40] * 64)), "needs more than the"),
    ("overlapping-offsets", _overlap, "overlap in the data section"),
    ("index-not-json", _write_file(INDEX_FILE, b"{not json"), f"{INDEX_FILE} is not valid JSON"),
    ("index-is-list", _write_file(INDEX_FILE, b"[]"), f"{INDEX_FILE} must hold a JSON object"),
    ("index-weight-map-list", _index(["model.safetensors"]), "field 'weight_map' must be a non-empty object"),
    ("index-missing-shard", _index_naming("model-00002-of-00002.safetensors"),
     "names shard 'model-00002-of-00002.safetensors', which is not in"),
    ("index-path-escape", _index_naming("../model.safetensors"), "not a *.safetensors file name in the model folder"),
    ("config-not-json", _write_file("config.json", b'{"hidden_size": 12'), "config.json is not valid JSON"),
    ("config-is-list", _write_file("config.json", b"[1]"), "config.json must hold a JSON object, got [1] (a list)"),
    ("hidden-size-string", _config(hidden_size="128"),
     "config.json: field 'hidden_size' must be a positive integer, got '128' (a string); fix the checkpoint's "
     "config.json"),
    ("experts-per-tok-bool", _config(num_experts_per_tok=True), "field 'num_experts_per_tok' must be a positive"),
    ("negative-layers", _config(num_hidden_layers=-2), "field 'num_hidden_layers' must be an integer from 1 to"),
    ("billion-layers", _config(num_hidden_layers=10**9), "field 'num_hidden_layers' must be an integer from 1 to"),
    ("float-heads", _config(num_attention_heads=4.0), "field 'num_attention_heads' must be a positive integer"),
    ("nan-eps", _config(rms_norm_eps=float("nan")), "field 'rms_norm_eps' must be a positive number, got nan"),
    ("huge-int-theta", _config(rope_theta=10**400), "field 'rope_theta' must be a positive number"),
    ("rope-scaling-string", _config(rope_scaling="yarn"), "field 'rope_scaling' must be an object or null"),
    ("architectures-string", _config(architectures="MixtralForCausalLM"), "field 'architectures' must be a list"),
    ("unknown-dtype", _config(dtype="float8"), "field 'dtype' must be one of"),
    ("k-above-experts", _config(num_experts_per_tok=9), "routing.k=9 exceeds n_experts=4"),
    ("missing-field", lambda f: _drop_config_field(f, "intermediate_size"),
     "config.json lacks field 'intermediate_size'"),
    ("config-fifo", _fifo("config.json"), "config.json is not a regular file"),
    ("weights-fifo", _fifo("model.safetensors"), "model.safetensors is not a regular file"),
    # a folder in the bundled model's own format, hostile in the same ways
    ("moejax-format-string", lambda f: _moejax_config(f, d_model="128"), "field 'd_model' must be a positive"),
    ("moejax-format-routing-k", lambda f: _moejax_config(f, routing={"k": "2"}), "field 'routing.k' must be"),
    ("moejax-format-activation", lambda f: _moejax_config(f, activation="tanh"), "field 'activation' must be one"),
    ("moejax-format-yarn-factor", lambda f: _moejax_config(f, rope_scaling={"factor": "4",
                                                                           "original_max_position_embeddings": 16}),
     "field 'rope_scaling.factor' must be a finite number"),
    ("moejax-format-yarn-missing", lambda f: _moejax_config(f, rope_scaling={"factor": 4.0}),
     "field 'rope_scaling' lacks ['original_max_position_embeddings']"),
    ("moejax-format-yarn-negative", lambda f: _moejax_config(f, rope_scaling={"factor": -4.0,
                                                                             "original_max_position_embeddings": 16}),
     "yarn rope scaling needs positive factor"),
]


@pytest.mark.parametrize("corrupt, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_checkpoint_fails_with_one_clear_line(ckpt, corrupt, expected):
    corrupt(ckpt)
    with pytest.raises(CheckpointError) as err:
        models.from_pretrained(str(ckpt))
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert expected in msg, msg


def test_missing_config_or_weights_keep_their_documented_error(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors file"):
        models.from_pretrained(str(ckpt))
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        models.from_pretrained(str(ckpt))


# --------------------------------------------------------------------------
# The bundled model's own format, and byte-level models
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundled():
    return models.load_default_model()


@pytest.fixture(scope="module")
def bundled_copy(tmp_path_factory) -> Path:
    return Path(shutil.copytree(DEFAULT_MODEL_DIR, tmp_path_factory.mktemp("copy") / "x"))


def test_copy_of_bundled_folder_loads_like_the_bundled_model(bundled, bundled_copy):
    copy = models.from_pretrained(str(bundled_copy))
    assert copy.config == bundled.config
    tokens = jnp.asarray(np.frombuffer(b"def f(x):\n    return x + 1\n", np.uint8)[None].astype(np.int32))
    np.testing.assert_array_equal(np.asarray(copy(tokens)), np.asarray(bundled(tokens)))
    assert models.from_pretrained(str(bundled_copy), scan_layers=True).config.scan_layers


def test_is_byte_level(bundled, bundled_copy, tmp_path, valid):
    assert models.is_byte_level(bundled)
    assert models.is_byte_level(models.from_pretrained(str(bundled_copy)))
    byte_vocab = _export(tmp_path / "bytes", vocab_size=256)
    assert models.is_byte_level(models.from_pretrained(str(byte_vocab)))
    (byte_vocab / "tokenizer.json").write_text("{}")  # a tokenizer gives the ids another meaning
    assert not models.is_byte_level(models.from_pretrained(str(byte_vocab)))
    assert not models.is_byte_level(models.from_pretrained(str(_export(tmp_path / "v1000", vocab_size=1000))))
    assert not models.is_byte_level(models.from_pretrained(str(valid)))  # vocab 64
    assert not models.is_byte_level(MoEDecoder(tiny_mixtral(vocab_size=256), rngs=nnx.Rngs(0)))  # not loaded
