"""A checkpoint's own tokenizer (``tokenizer.json``, read with Hugging Face ``tokenizers``).

A checkpoint folder with ``tokenizer.json`` gets text in and out: ``moejax
generate`` encodes the prompt and decodes the continuation as it streams, and
quality is measured on any text as token cross-entropy and bits per byte
(:func:`moejax.evaluation.token_quality`). ``tokenizers`` parses the JSON in Rust
and runs no code from the file; a malformed or oversized file is one
:class:`~moejax.models.validation.CheckpointError` line.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from moejax.models.validation import CheckpointError

__all__ = ["TextTokenizer", "load_tokenizer", "TOKENIZER_FILE"]

TOKENIZER_FILE = "tokenizer.json"
_MAX_BYTES = 256 * 2**20  # the largest released tokenizer.json files are ~20 MB
_FIX = "re-download the model's tokenizer.json"


class TextTokenizer:
    """Text <-> token ids with a checkpoint's ``tokenizer.json``."""

    def __init__(self, tokenizer, path: str):
        self._tok, self.path = tokenizer, path

    @property
    def vocab_size(self) -> int:
        """Token ids this tokenizer can produce (its vocabulary plus added tokens)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added: the text as written)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's ``(start, end)`` character span in ``text``."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def stream_decoder(self, prompt_ids: Sequence[int] = ()) -> tuple[Callable[[int], str], Callable[[], str]]:
        """``(push, flush)``: ``push(token_id)`` returns the text a decoded stream adds with each token,
        ``flush()`` what is still held back at the end.

        Tokens that hold part of a UTF-8 character (byte-level BPE) decode to U+FFFD
        until the character is complete, so text ending in one is held back; what a
        finished stream still holds (a character never completed) comes out in ``flush``.
        """
        ids, shown = list(prompt_ids), self.decode(prompt_ids)

        def release(final: bool) -> str:
            nonlocal shown
            text = self.decode(ids)
            if not final and (text.endswith("\ufffd") or not text.startswith(shown)):
                return ""
            new = text[len(os.path.commonprefix([shown, text])):]  # (a decoder that rewrote earlier text: its tail)
            shown = text
            return new

        def push(token: int) -> str:
            ids.append(int(token))
            return release(final=False)

        return push, lambda: release(final=True)


def load_tokenizer(folder: str | os.PathLike) -> TextTokenizer | None:
    """The tokenizer of checkpoint ``folder``, or ``None`` when it has no ``tokenizer.json``.

    Raises :class:`CheckpointError` for an unreadable, oversized or malformed file,
    and ``ImportError`` (with the install line) when ``tokenizers`` is missing.
    """
    path = os.path.join(os.fspath(folder), TOKENIZER_FILE)
    if not os.path.exists(path):
        return None
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a regular file; {_FIX}")
    if os.path.getsize(path) > _MAX_BYTES:
        raise CheckpointError(f"{path} is {os.path.getsize(path)} bytes, over the {_MAX_BYTES} byte limit; {_FIX}")
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # pragma: no cover - a dependency of moejax
        raise ImportError("reading tokenizer.json needs the tokenizers package: pip install tokenizers") from e
    try:
        return TextTokenizer(Tokenizer.from_file(path), path)
    except Exception as e:  # tokenizers raises plain Exceptions with serde's message
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path} cannot be read as a tokenizer ({reason}); {_FIX}") from None
