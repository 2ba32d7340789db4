"""Real text every Python installation carries: the standard library's source.

The default model is trained on the ``*.py`` files of the Python standard library
(``sysconfig.get_paths()["stdlib"]``), byte by byte (vocabulary = the 256 byte
values). Files are split into training and held-out text *by file*, using a hash
of the file's path relative to the stdlib root, so the split is the same on every
machine and no held-out file leaks into training.

Held-out evaluation text is shipped with the package (``models/default/heldout.txt``)
so that evaluation gives identical numbers whichever Python version is installed;
:func:`heldout_bytes` reads that file, never the local stdlib.
"""
from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "VOCAB_SIZE",
    "FILE_SEPARATOR",
    "HELDOUT_MAX_BYTES",
    "stdlib_root",
    "stdlib_files",
    "is_heldout",
    "split_files",
    "train_bytes",
    "heldout_files_bytes",
    "heldout_bytes",
    "heldout_path",
    "encode",
    "decode",
    "batches",
    "calibration_tokens",
]

VOCAB_SIZE = 256
# Files are joined with the ASCII "file separator" control byte, which never
# occurs in the stdlib's source, so a model sees where one file ends.
FILE_SEPARATOR = b"\x1c"
HELDOUT_MAX_BYTES = 1_000_000
# One file in HELDOUT_BUCKETS goes to the held-out side.
HELDOUT_BUCKETS = 20

# Directories never used: tests (large, repetitive), third-party packages, and
# build configuration; files whose content depends on the machine.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_EXCLUDED_PREFIXES = ("config-", "_sysconfigdata")


def stdlib_root() -> Path:
    """The directory of this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: Path) -> bool:
    if any(part in _EXCLUDED_DIRS or part.startswith(_EXCLUDED_PREFIXES) for part in rel.parts[:-1]):
        return True
    return rel.name.startswith(_EXCLUDED_PREFIXES)


def stdlib_files(root: Path | str | None = None) -> list[Path]:
    """Relative paths of the corpus's ``*.py`` files, sorted (POSIX order) for determinism."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {root} does not exist; pass root= explicitly")
    rels = [p.relative_to(root) for p in root.rglob("*.py") if p.is_file()]
    return sorted((r for r in rels if not _excluded(r)), key=lambda r: r.as_posix())


def is_heldout(rel: Path | str) -> bool:
    """Whether a file (path relative to the stdlib root) belongs to the held-out side."""
    digest = hashlib.sha256(Path(rel).as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "little") % HELDOUT_BUCKETS == 0


def split_files(root: Path | str | None = None) -> tuple[list[Path], list[Path]]:
    """``(train, heldout)`` relative paths; disjoint, each sorted."""
    files = stdlib_files(root)
    return [f for f in files if not is_heldout(f)], [f for f in files if is_heldout(f)]


def _join(root: Path, rels: list[Path], max_bytes: int | None) -> bytes:
    parts: list[bytes] = []
    total = 0
    for rel in rels:
        data = (root / rel).read_bytes() + FILE_SEPARATOR
        if max_bytes is not None and total + len(data) > max_bytes:
            break
        parts.append(data)
        total += len(data)
    return b"".join(parts)


def train_bytes(max_bytes: int | None = None, root: Path | str | None = None) -> bytes:
    """Training text: the training files joined by :data:`FILE_SEPARATOR`.

    ``max_bytes`` stops before the first file that would exceed it.
    """
    root = Path(root) if root is not None else stdlib_root()
    return _join(root, split_files(root)[0], max_bytes)


def heldout_files_bytes(max_bytes: int = HELDOUT_MAX_BYTES, root: Path | str | None = None) -> bytes:
    """Held-out text built from the local stdlib (what ``heldout.txt`` is written from)."""
    root = Path(root) if root is not None else stdlib_root()
    return _join(root, split_files(root)[1], max_bytes)


def heldout_path() -> Path:
    """Where the shipped held-out text lives (inside the installed ``moejax.models`` package)."""
    from moejax.models import default_model  # local import: moejax core must not import models eagerly

    return default_model.DEFAULT_MODEL_DIR / "heldout.txt"


def heldout_bytes(max_bytes: int | None = None) -> bytes:
    """The shipped held-out text (identical on every machine); optionally its first ``max_bytes``."""
    path = heldout_path()
    if not path.is_file():
        raise FileNotFoundError(f"held-out text {path} is missing; reinstall moejax or run "
                                "scripts/train_default.py to regenerate models/default/")
    data = path.read_bytes()
    return data if max_bytes is None else data[:max_bytes]


def encode(text: bytes | str) -> np.ndarray:
    """Bytes (or UTF-8 text) -> int32 token ids in ``[0, 256)``."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    return np.frombuffer(text, dtype=np.uint8).astype(np.int32)


def decode(tokens) -> bytes:
    """Token ids -> bytes."""
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
        raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE}) for the byte vocabulary")
    return arr.astype(np.uint8).tobytes()


def batches(data: bytes, batch: int, seq_len: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Endless random windows ``int32 [batch, seq_len + 1]`` (inputs plus next-byte targets).

    Deterministic for a given ``seed``.
    """
    if len(data) < seq_len + 2:
        raise ValueError(f"need more than seq_len+1={seq_len + 1} bytes of text, got {len(data)}")
    arr = np.frombuffer(data, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    offs = np.arange(seq_len + 1)
    while True:
        starts = rng.integers(0, len(arr) - seq_len - 1, size=batch)
        yield arr[starts[:, None] + offs].astype(np.int32)


def calibration_tokens(n_bytes: int, seq_len: int, data: bytes | None = None) -> np.ndarray:
    """``int32 [n_bytes // seq_len, seq_len]`` consecutive windows for routing calibration.

    Taken from the start of the training text (never the held-out text) unless
    ``data`` is given.
    """
    if n_bytes < seq_len:
        raise ValueError(f"{n_bytes} bytes of calibration text is less than one window of {seq_len} tokens; "
                         f"ask for at least {seq_len} bytes")
    n = n_bytes // seq_len
    if data is None:
        data = train_bytes(max_bytes=n * seq_len + 1_000_000)
    if len(data) < n * seq_len:
        raise ValueError(f"{n * seq_len} bytes of calibration text requested, but the text has only {len(data)}; "
                         f"ask for at most {len(data)} bytes")
    return encode(data[: n * seq_len]).reshape(n, seq_len)
