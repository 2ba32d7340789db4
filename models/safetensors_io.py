"""Minimal, pickle-free safetensors reading and writing with numpy.

The format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative
to the end of the header), then the raw little-endian bytes. Reading memory-maps
the file, so a tensor is only read when asked for; ``bfloat16`` and ``float8``
come from ``ml_dtypes`` (a JAX dependency), which numpy-only readers lack.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from moejax.models.validation import CheckpointError, describe, read_json_object

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}

INDEX_FILE = "model.safetensors.index.json"


_MAX_HEADER_BYTES = 100 * 2**20  # the header is JSON names and shapes; DeepSeek-V3's largest is < 1 MB
_FIX = "re-download or re-export the checkpoint"


def _corrupt(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is corrupt or not a safetensors file: {why}; {_FIX}")


def read_header(path: str) -> tuple[dict[str, dict], dict[str, Any], int]:
    """``(entries, metadata, data_start)`` of a safetensors file, validated against the file.

    Every entry has a known dtype, a shape of non-negative ints and ``data_offsets``
    inside the data section that match shape x dtype size and do not overlap, so a
    later read can trust them. Anything else raises :class:`CheckpointError`.
    """
    if not os.path.isfile(path):  # a FIFO would block the read below forever
        raise CheckpointError(f"{path} is not a regular file; {_FIX}")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise _corrupt(path, f"header length {n} exceeds the {size - 8} bytes after it (truncated?)")
            if n > _MAX_HEADER_BYTES:
                raise _corrupt(path, f"header length {n} exceeds the {_MAX_HEADER_BYTES} byte limit")
            text = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror}); {_FIX}") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, over-long ints, deep nesting
        raise _corrupt(path, f"header is not UTF-8 JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"header must be a JSON object, got {describe(header)}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupt(path, f"__metadata__ must be an object, got {describe(metadata)}")
    data_size = size - 8 - n
    spans = []
    for name, e in header.items():
        spans.append((*_check_entry(path, name, e, data_size), name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise _corrupt(path, f"tensors {a!r} and {b!r} overlap in the data section")
    return header, metadata, 8 + n


def _check_entry(path: str, name: str, e: Any, data_size: int) -> tuple[int, int]:
    """``(begin, end)`` of one header entry, after checking its fields against the file."""
    if not isinstance(e, dict):
        raise _corrupt(path, f"tensor {name!r}: entry must be an object, got {describe(e)}")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str):
        raise _corrupt(path, f"tensor {name!r}: dtype must be a string, got {describe(dtype)}")
    if dtype not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}, which moejax cannot read "
                              f"(supported: {', '.join(_DTYPES)}); convert the checkpoint to one of them")
    if not (isinstance(shape, list) and all(_is_size(d) for d in shape)):
        raise _corrupt(path, f"tensor {name!r}: shape must be a list of non-negative integers, got {describe(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)):
        raise _corrupt(path, f"tensor {name!r}: data_offsets must be [begin, end] integers, got {describe(offsets)}")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise _corrupt(path, f"tensor {name!r}: data_offsets {offsets} fall outside the {data_size}-byte data section")
    nbytes = _nbytes(shape, _DTYPES[dtype].itemsize, limit=data_size)
    if end - begin != nbytes:
        need = nbytes if nbytes <= data_size else f"more than the {data_size}"
        raise _corrupt(path, f"tensor {name!r}: shape {describe(shape)} of {dtype} needs {need} bytes, "
                             f"data_offsets give {end - begin}")
    return begin, end


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int:
    """Bytes of ``shape``; stops multiplying past ``limit`` (a hostile shape could make a huge product slow)."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            break
    return n


def _is_size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class SafetensorsFile:
    """One ``.safetensors`` file: names, shapes, dtypes, and lazily read tensors.

    The header is validated when the file is opened (:func:`read_header`), so a
    corrupt or hostile file fails here with :class:`CheckpointError`.
    """

    def __init__(self, path: str):
        self.path = path
        self.entries, self.metadata, self._data_start = read_header(path)
        self._mmap: np.memmap | None = None
        self.bytes_read = 0  # by read(): lets a sharded load show it read only its slices

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self.entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a numpy array (a view of the memory-mapped file)."""
        e = self.entries[name]
        begin, end = e["data_offsets"]
        if begin == end:  # an empty tensor; an all-empty file cannot be memory-mapped
            return np.empty(e["shape"], self.dtype(name))
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = self._mmap[self._data_start + begin: self._data_start + end]
        return buf.view(self.dtype(name)).reshape(e["shape"])

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """A fresh copy of ``tensor[index]`` (basic slices, step 1), read with ``pread``.

        Only the rows of axis 0 that ``index`` selects are read, into memory this
        array owns: unlike :meth:`get` (a view of the memory map, whose pages stay
        in the process's resident set while the map lives), a sharded load's
        resident memory is then the slices it keeps, plus one block in flight.
        """
        e = self.entries[name]
        shape, dtype = tuple(e["shape"]), self.dtype(name)
        if not shape:
            return self.get(name).copy()
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        start, stop, step = index[0].indices(shape[0])
        if step != 1:
            raise ValueError(f"read({name!r}): only unit-step slices are supported, got {index[0]}")
        stop = max(start, stop)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        block = np.empty((stop - start,) + shape[1:], dtype)
        view, offset = memoryview(block.reshape(-1).view(np.uint8)), self._data_start + e["data_offsets"][0]
        offset += start * row_bytes
        with open(self.path, "rb", buffering=0) as f:
            done = 0
            while done < len(view):  # one pread returns at most ~2 GiB on Linux
                n = os.preadv(f.fileno(), [view[done:]], offset + done)
                if n <= 0:
                    raise CheckpointError(f"{self.path}: tensor {name!r} ends early (truncated file); {_FIX}")
                done += n
        self.bytes_read += len(view)
        rest = index[1:]
        return block if all(s == slice(None) for s in rest) else np.ascontiguousarray(block[(slice(None),) + rest])


class Checkpoint(Mapping):
    """All tensors of a checkpoint folder: one ``*.safetensors`` or several with an index file."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, INDEX_FILE)
        weight_map = _weight_map(index) if os.path.exists(index) else None
        if weight_map is not None:
            files = _shard_files(weight_map, index)
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            if not files:
                bins = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
                hint = (f" (found {bins}: pickle checkpoints are not loaded; convert them to safetensors)"
                        if bins else "")
                raise FileNotFoundError(f"no *.safetensors file in {folder}{hint}")
        self.files = {f: SafetensorsFile(os.path.join(folder, f)) for f in files}
        self._where: dict[str, SafetensorsFile] = {}
        for fname, sf in self.files.items():
            for k in sf.keys():
                if k in self._where:  # which copy is meant is ambiguous: refuse rather than pick one
                    raise CheckpointError(f"tensor {k!r} is stored in both {os.path.basename(self._where[k].path)} "
                                          f"and {fname} in {folder}; remove the stray copy")
                self._where[k] = sf
        if weight_map is not None:
            missing = sorted(k for k in weight_map if k not in self._where)
            if missing:
                raise CheckpointError(f"{index} lists tensors missing from their shard files: {missing[:5]}; "
                                      f"{_INDEX_FIX}")

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name].get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """``tensor[index]`` read into fresh memory (see :meth:`SafetensorsFile.read`)."""
        return self._where[name].read(name, index)


_INDEX_FIX = "re-download the model's index and shards"


def _weight_map(index: str) -> dict[str, str]:
    """The ``weight_map`` of an index file: a non-empty object of tensor name -> shard file name."""
    weight_map = read_json_object(index, fix=_INDEX_FIX, max_bytes=_MAX_HEADER_BYTES).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: field 'weight_map' must be a non-empty object of tensor name -> shard file, "
                              f"got {describe(weight_map)}; {_INDEX_FIX}")
    for name, shard in weight_map.items():
        # A bare file name in this folder: no paths, so a hostile index cannot point outside it.
        if not (isinstance(shard, str) and shard.endswith(".safetensors") and os.path.basename(shard) == shard):
            raise CheckpointError(f"{index}: tensor {name!r} maps to {describe(shard)}, not a *.safetensors file "
                                  f"name in the model folder; {_INDEX_FIX}")
    return weight_map


def _shard_files(weight_map: dict[str, str], index: str) -> list[str]:
    files = sorted(set(weight_map.values()))
    folder = os.path.dirname(index)
    for f in files:
        if not os.path.exists(os.path.join(folder, f)):
            raise CheckpointError(f"{index} names shard {f!r}, which is not in {folder}; download the missing "
                                  "shard or re-download the model")
    return files


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` in safetensors format (tensors are C-contiguous, little-endian)."""
    header: dict[str, dict] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        a = a if a.flags.c_contiguous else np.ascontiguousarray(a)  # (which makes a 0-d array 1-d)
        if a.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes())
