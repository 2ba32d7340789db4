"""Slow tiers for offloaded experts: a safetensors file read with explicit reads, or host memory.

A store holds every expert of every expert op ("site") and hands one back as
device arrays on request; it counts the bytes and seconds it spent. Experts
are addressed ``(site, expert)`` and stored as the tuple of the expert op's
weight operands for that expert (float arrays or quantized pytrees,
:mod:`moejax.weight_formats`), flattened to leaves.

* :class:`DiskExpertStore` writes the experts to one ``.safetensors`` file, one
  tensor per leaf, an expert's leaves adjacent, and reads an expert with one
  ``pread`` of its byte range. With ``direct=True`` (default) the file is read
  with ``O_DIRECT``, bypassing the page cache, so a read costs what the disk
  costs; filesystems without ``O_DIRECT`` (tmpfs) fall back to buffered reads
  and say so in :attr:`DiskExpertStore.direct`.
* :class:`HostExpertStore` keeps the experts in host memory: JAX's
  ``pinned_host`` memory kind where the device has one (GPU, TPU; also XLA:CPU),
  numpy arrays otherwise; a read is a host-to-device copy.
"""
from __future__ import annotations

import abc
import dataclasses
import mmap
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from moejax import weight_formats as wf

__all__ = ["ExpertStore", "DiskExpertStore", "HostExpertStore", "TIERS", "split_site_experts"]

TIERS = ("disk", "host")
_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers are multiples of the logical block size


def split_site_experts(weights: Sequence[Any], num_experts: int) -> list[tuple[Any, ...]]:
    """Per expert, the tuple of that expert's slice of each weight operand (stored format kept)."""
    return [tuple(wf.expert_slice(w, e) for w in weights) for e in range(num_experts)]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one site's experts flatten: pytree structure and per-leaf dtype/shape/bytes."""

    treedef: Any
    dtypes: tuple[np.dtype, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def nbytes(self) -> int:
        return int(sum(np.prod(s, dtype=np.int64) * d.itemsize for s, d in zip(self.shapes, self.dtypes)))


class ExpertStore(abc.ABC):
    """Every expert of every site, in a slow tier; :meth:`read` brings one to the device."""

    tier: str = ""

    def __init__(self, sites: Sequence[Sequence[tuple[Any, ...]]]):
        self.layouts: list[_Layout] = []
        for s, experts in enumerate(sites):
            leaves, treedef = jax.tree_util.tree_flatten(experts[0])
            for e, x in enumerate(experts[1:], start=1):
                if jax.tree_util.tree_structure(x) != treedef:
                    raise ValueError(f"expert op {s}: expert {e} is stored in another format than expert 0 "
                                     "(mixed precision); offloading needs one format per layer")
            self.layouts.append(_Layout(treedef, tuple(np.dtype(x.dtype) for x in leaves),
                                        tuple(tuple(x.shape) for x in leaves)))
        self.num_experts = [len(x) for x in sites]
        self.bytes_read = 0
        self.reads = 0
        self.read_seconds = 0.0
        self._lock = threading.Lock()

    def expert_nbytes(self, site: int) -> int:
        return self.layouts[site].nbytes

    @property
    def total_bytes(self) -> int:
        return sum(l.nbytes * n for l, n in zip(self.layouts, self.num_experts))

    def read(self, site: int, expert: int) -> tuple[Any, ...]:
        """Expert ``expert`` of ``site`` as device arrays (thread-safe; counts bytes and time)."""
        t0 = time.perf_counter()
        value = self._read(site, expert)
        with self._lock:
            self.bytes_read += self.layouts[site].nbytes
            self.reads += 1
            self.read_seconds += time.perf_counter() - t0
        return value

    @abc.abstractmethod
    def _read(self, site: int, expert: int) -> tuple[Any, ...]:
        ...

    def describe(self) -> dict[str, Any]:
        return {"tier": self.tier, "expert_bytes": self.total_bytes}


def _name(site: int, expert: int, leaf: int) -> str:
    return f"s{site:04d}.e{expert:05d}.l{leaf:03d}"  # sorted order keeps an expert's leaves adjacent


class DiskExpertStore(ExpertStore):
    """Experts in one safetensors file, read back with explicit (``O_DIRECT``) reads."""

    tier = "disk"

    def __init__(self, sites: Sequence[Sequence[tuple[Any, ...]]], directory: str | None = None,
                 direct: bool = True):
        from moejax.models.safetensors_io import SafetensorsFile, save_file  # models import the core, not back

        super().__init__(sites)
        owned = directory is None
        folder = Path(tempfile.mkdtemp(prefix="moejax-offload-") if owned else directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"experts-{os.getpid()}-{id(self):x}.safetensors"
        tensors = {}
        for s, experts in enumerate(sites):
            for e, x in enumerate(experts):
                for j, leaf in enumerate(jax.tree_util.tree_leaves(x)):
                    tensors[_name(s, e, j)] = np.asarray(leaf)
        save_file(tensors, str(self.path), metadata={"format": "moejax-offload"})
        del tensors
        header = SafetensorsFile(str(self.path))
        self._ranges: list[list[tuple[int, list[tuple[int, int]]]]] = []
        for s, experts in enumerate(sites):
            per_expert = []
            for e in range(len(experts)):
                spans = [header.entries[_name(s, e, j)]["data_offsets"] for j in range(len(self.layouts[s].shapes))]
                start = header._data_start + spans[0][0]
                per_expert.append((start, [(header._data_start + b - start, end - b) for b, end in spans]))
            self._ranges.append(per_expert)
        self.direct = False
        fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError:  # e.g. tmpfs: no O_DIRECT
                fd = -1
        if fd < 0:
            fd = os.open(self.path, os.O_RDONLY)
        self._fd = fd
        # the file and its descriptor go when the store does
        self._finalizer = weakref.finalize(self, _cleanup, fd, str(self.path), str(folder) if owned else None)

    def _read(self, site: int, expert: int) -> tuple[Any, ...]:
        layout = self.layouts[site]
        start, leaves = self._ranges[site][expert]
        total = leaves[-1][0] + leaves[-1][1]
        if self.direct:
            begin = start - start % _ALIGN
            length = -(-(start + total - begin) // _ALIGN) * _ALIGN
            buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT requires
            got = os.preadv(self._fd, [buf], begin)
            if got < start + total - begin:
                raise OSError(f"{self.path}: short read of expert {expert} of op {site} ({got} bytes)")
            raw = np.frombuffer(buf, np.uint8, count=total, offset=start - begin)
        else:
            raw = np.frombuffer(os.pread(self._fd, total, start), np.uint8)
        arrays = [raw[off:off + n].view(dt).reshape(shape)
                  for (off, n), dt, shape in zip(leaves, layout.dtypes, layout.shapes)]
        return jax.tree_util.tree_unflatten(layout.treedef, [jax.device_put(a) for a in arrays])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.path), "direct_io": self.direct}


def _cleanup(fd: int, path: str, folder: str | None) -> None:
    try:
        os.close(fd)
        os.unlink(path)
        if folder:
            os.rmdir(folder)
    except OSError:
        pass


class HostExpertStore(ExpertStore):
    """Experts in host memory (``pinned_host`` where the device has it); a read copies one to the device."""

    tier = "host"

    def __init__(self, sites: Sequence[Sequence[tuple[Any, ...]]], device: Any = None):
        super().__init__(sites)
        self.device = device or jax.devices()[0]
        kinds = {m.kind for m in self.device.addressable_memories()} if hasattr(
            self.device, "addressable_memories") else set()
        self.memory_kind = "pinned_host" if "pinned_host" in kinds else None
        host = (jax.sharding.SingleDeviceSharding(self.device, memory_kind="pinned_host")
                if self.memory_kind else None)
        self._experts = [[jax.tree_util.tree_map(lambda a: jax.device_put(a, host) if host else np.asarray(a), x)
                          for x in experts] for experts in sites]
        self._to_device = jax.sharding.SingleDeviceSharding(self.device, memory_kind="device") \
            if self.memory_kind else self.device

    def _read(self, site: int, expert: int) -> tuple[Any, ...]:
        value = jax.device_put(self._experts[site][expert], self._to_device)
        return jax.block_until_ready(value)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "memory_kind": self.memory_kind or "numpy"}
