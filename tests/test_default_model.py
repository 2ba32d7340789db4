"""The bundled default model: it loads, is the promised architecture, beats an n-gram, errors are clear."""
from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from moejax import data, evaluation
from moejax.models.default_model import (DEFAULT_MODEL_DIR, CheckpointError, load_checkpoint,
                                         load_default_model)

SLICE = 8192


@pytest.fixture(scope="module")
def model():
    return load_default_model()


def test_shipped_files_and_architecture(model):
    cfg = model.config
    assert (cfg.n_layers >= 4, cfg.n_experts, cfg.routing.k, cfg.vocab_size) == (True, 8, 2, 256)
    assert not cfg.scan_layers
    size = (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size
    assert size < 25 * 2**20
    held = data.heldout_bytes()
    assert 100_000 < len(held) <= data.HELDOUT_MAX_BYTES
    assert held == (DEFAULT_MODEL_DIR / "heldout.txt").read_bytes()
    assert data.heldout_bytes(100) == held[:100]
    assert "Python Software Foundation License" in (DEFAULT_MODEL_DIR / "LICENSE-PSF.txt").read_text()


def test_default_model_beats_order2_ngram(model):
    # The n-gram is fitted on the first 3 MB of the training text to keep the test fast; the full
    # comparison (all training text, all held-out text) is in models/default/eval_report.json.
    held = data.heldout_bytes(SLICE)
    model_bpb = evaluation.bits_per_byte(model, held, seq_len=256, batch=8)
    ngram_bpb = evaluation.ngram_bits_per_byte(data.train_bytes(max_bytes=3_000_000), held, order=2)
    assert model_bpb < ngram_bpb - 0.2, (model_bpb, ngram_bpb)


def test_default_model_uses_every_expert(model):
    load = evaluation.expert_load(model, data.heldout_bytes(SLICE), seq_len=256, batch=8)
    assert load.shape == (model.config.n_layers, 8)
    assert load.min() > 0.01, np.round(load * 100, 1)


def test_scanned_form_matches_unrolled(model):
    scanned = load_default_model(scan_layers=True)
    assert scanned.config.scan_layers
    tokens = jnp.asarray(data.encode(data.heldout_bytes(64)).reshape(2, 32))
    np.testing.assert_allclose(np.asarray(scanned(tokens)), np.asarray(model(tokens)), rtol=2e-4, atol=2e-4)


@pytest.fixture()
def ckpt_copy(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(DEFAULT_MODEL_DIR / name, folder / name)
    return folder


def test_truncated_checkpoint_raises_clear_error(ckpt_copy):
    weights = ckpt_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1000])
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_checkpoint(ckpt_copy)


def test_missing_files_raise_clear_errors(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(ckpt_copy)
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(ckpt_copy)


def test_config_mismatch_and_unknown_fields_raise(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    (ckpt_copy / "config.json").write_text(json.dumps({**cfg, "d_ff_expert": cfg["d_ff_expert"] + 8}))
    with pytest.raises(CheckpointError, match="experts.w_.*has shape"):
        load_checkpoint(ckpt_copy)
    (ckpt_copy / "config.json").write_text(json.dumps({**cfg, "n_layers": cfg["n_layers"] + 1}))
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_checkpoint(ckpt_copy)
    (ckpt_copy / "config.json").write_text(json.dumps({**cfg, "flux_capacitor": 1}))
    with pytest.raises(CheckpointError, match="unknown fields.*flux_capacitor"):
        load_checkpoint(ckpt_copy)
    (ckpt_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt_copy)


@pytest.mark.full_optimization
def test_fine_grained_model_is_deepseek_style_and_beats_the_default_model(model):
    from moejax.models import FINE_GRAINED_MODEL_DIR, load_bundled_model

    fine = load_bundled_model("fine-grained")
    cfg = fine.config
    assert (cfg.n_experts >= 32, cfg.routing.k >= 4, cfg.n_shared_experts, cfg.routing.score, cfg.selection_bias) \
        == (True, True, 1, "sigmoid", True)
    assert (FINE_GRAINED_MODEL_DIR / "model.safetensors").stat().st_size < 25 * 2**20
    held = data.heldout_bytes(SLICE)
    fine_bpb = evaluation.bits_per_byte(fine, held, seq_len=256, batch=8)
    assert fine_bpb < evaluation.bits_per_byte(model, held, seq_len=256, batch=8) - 0.05
    load = evaluation.expert_load(fine, held, seq_len=256, batch=8)
    assert load.shape == (cfg.n_layers, cfg.n_experts) and load.min() > 0.002, np.round(load * 100, 2)
