"""Byte-level models: token ids are raw UTF-8 bytes, so byte text can be scored directly.

The loaders decide this once, from the checkpoint folder, and record it on the
model (:func:`mark_byte_level`); :func:`is_byte_level` reads it back, so callers
(the CLI's bits-per-byte measurement) need not know where a model came from.
"""
from __future__ import annotations

import os
from typing import TypeVar

__all__ = ["is_byte_level", "mark_byte_level", "TOKENIZER_FILES", "BYTE_VOCAB_RANGE"]

# Files that give token ids a meaning other than bytes (BPE, SentencePiece, WordPiece, or
# special tokens shifting the byte ids as in ByT5).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "vocab.txt", "spiece.model")
# 256 byte ids, plus room for a few special tokens and padding of the embedding to a round size.
BYTE_VOCAB_RANGE = (256, 512)
_ATTR = "byte_level"

M = TypeVar("M")


def mark_byte_level(model: M, folder: str | os.PathLike) -> M:
    """Record on ``model`` (loaded from ``folder``) whether it is byte-level; returns ``model``.

    The rule: ``vocab_size`` is between 256 and 512 and ``folder`` holds none of
    :data:`TOKENIZER_FILES`.
    """
    lo, hi = BYTE_VOCAB_RANGE
    byte_vocab = lo <= model.config.vocab_size <= hi
    setattr(model, _ATTR, byte_vocab and not any(os.path.exists(os.path.join(folder, f)) for f in TOKENIZER_FILES))
    return model


def is_byte_level(model) -> bool:
    """Whether ``model``'s token ids are raw UTF-8 bytes, so byte text can be scored (bits per byte).

    True for models that :func:`moejax.models.from_pretrained` or
    :func:`moejax.models.load_default_model` loaded from a folder whose config has
    ``vocab_size`` between 256 and 512 and which holds no tokenizer files
    (:data:`TOKENIZER_FILES`): the bundled default model, copies of its folder, and
    Hugging Face checkpoints with a byte vocabulary. False for any other model,
    including models built in code rather than loaded (their vocabulary is unknown).
    """
    return bool(getattr(model, _ATTR, False))
