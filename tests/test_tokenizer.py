"""Checkpoints with ``tokenizer.json``: text in and out, and quality measured on text as tokens."""
from __future__ import annotations

import math

import jax.numpy as jnp
import pytest

pytest.importorskip("tokenizers")

from moejax import evaluation  # noqa: E402
from moejax.models import CheckpointError, from_pretrained, is_byte_level  # noqa: E402
from moejax.models.tokenizer import load_tokenizer  # noqa: E402

TEXT = "def main(argv):\n    return sum(int(a) for a in argv)  # café, naïve, 日本\n" * 3
VOCAB = 320  # 256 byte tokens + merges


def _train_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    tok.save(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Mixtral (vocabulary 320) saved by transformers, with a byte-level BPE tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tokenized")
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=48, num_local_experts=4,
                                     num_experts_per_tok=2, initializer_range=0.2)
    model = transformers.MixtralForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    _train_tokenizer(str(folder / "tokenizer.json"))
    return folder, model


def test_text_round_trips_and_streams(checkpoint):
    tok = load_tokenizer(checkpoint[0])
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and max(ids) < VOCAB and len(ids) < len(TEXT.encode())
    push, flush = tok.stream_decoder(ids[:3])
    pieces = [push(i) for i in ids[3:]]
    assert all("\ufffd" not in p for p in pieces)  # multi-byte characters split over tokens come out whole
    assert tok.decode(ids[:3]) + "".join(pieces) + flush() == TEXT and flush() == ""


def test_quality_on_text_matches_transformers(checkpoint):
    torch = pytest.importorskip("torch")
    folder, hf_model = checkpoint
    model = from_pretrained(str(folder), dtype=jnp.float32)
    assert not is_byte_level(model)
    tok = load_tokenizer(folder)
    q = evaluation.token_quality(model, tok, TEXT, seq_len=128, batch=1)
    ids = tok.encode(TEXT)
    assert len(ids) <= 129  # one window: the same context transformers sees
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    nats = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item()
    assert q["tokens_scored"] == len(ids) - 1
    assert math.isclose(q["cross_entropy_nats_per_token"], nats, rel_tol=1e-5)
    first = tok.encode_with_offsets(TEXT)[1][1][0]
    assert q["bytes_scored"] == len(TEXT[first:].encode())
    bits = q["cross_entropy_nats_per_token"] * q["tokens_scored"] / math.log(2)
    assert math.isclose(q["bits_per_byte"], bits / q["bytes_scored"], rel_tol=1e-12)


def test_folder_without_tokenizer_and_bad_tokenizer_files(tmp_path):
    assert load_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 12}}')
    with pytest.raises(CheckpointError, match="cannot be read as a tokenizer") as exc:
        load_tokenizer(tmp_path)
    assert "\n" not in str(exc.value)


def test_too_short_text_is_refused(checkpoint):
    model = from_pretrained(str(checkpoint[0]), dtype=jnp.float32)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluation.token_quality(model, load_tokenizer(checkpoint[0]), "d")



def test_generate_on_text_with_the_checkpoints_tokenizer(checkpoint, capsys):
    """moejax generate --model DIR --prompt TEXT: the prompt is encoded with tokenizer.json, the continuation
    decoded with it, and the tokens are transformers' greedy ones."""
    torch = pytest.importorskip("torch")
    from moejax import cli

    folder, hf_model = checkpoint
    prompt = "def main(argv):"
    assert cli.main(["generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", "6", "--quiet"]) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer(folder)
    ids = tok.encode(prompt)
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0].tolist()
    assert out == tok.decode(ref) + "\n"


def test_export_hf_command_round_trip(checkpoint, tmp_path, capsys):
    """moejax export-hf --model DIR --passes 'profile,prune(...)' --out OUT: transformers loads OUT."""
    transformers = pytest.importorskip("transformers")
    from moejax import cli

    out = tmp_path / "pruned"
    argv = ["export-hf", "--model", str(checkpoint[0]), "--passes", "profile,prune(num_experts=3)", "--out", str(out),
            "--quiet"]
    assert cli.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_local_experts == 3
    assert cli.main(argv) == 2  # the folder is not empty now
    assert "not an empty folder" in capsys.readouterr().err


def test_optimize_measures_a_tokenized_checkpoint_on_the_users_text(checkpoint, tmp_path, capsys):
    """moejax optimize --eval-text FILE on a checkpoint with tokenizer.json: per-token cross-entropy and bits per
    byte of that text for every stage (they equal evaluation.token_quality's)."""
    import json

    from moejax import cli

    text = tmp_path / "mine.py"
    text.write_text(TEXT)
    argv = ["optimize", "--model", str(checkpoint[0]), "--eval-text", str(text), "--calib-text", str(text),
            "--passes", "profile,prune(num_experts=3)", "--batch", "1", "--seq-len", "64", "--decode-tokens", "2",
            "--json", "--quiet"]
    assert cli.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    model = from_pretrained(str(checkpoint[0]))
    q = evaluation.token_quality(model, load_tokenizer(checkpoint[0]), TEXT, seq_len=64, batch=1)
    assert math.isclose(rows[0]["cross_entropy"], q["cross_entropy_nats_per_token"], rel_tol=1e-6)
    assert math.isclose(rows[0]["bits_per_byte"], q["bits_per_byte"], rel_tol=1e-6)
    assert rows[2]["pass"] == "prune(num_experts=3)" and rows[2]["cross_entropy"] != rows[0]["cross_entropy"]
    assert cli.main(argv[:5] + ["--calib-text", str(tmp_path / "none.txt")] + argv[7:]) == 2
    assert "is not a file" in capsys.readouterr().err
