"""Build and load moejax's C++ CPU kernels (an XLA FFI library), once per machine.

The source ships with the package (``moejax/csrc``). On first use it is
compiled with the system C++ compiler (``$CXX``, else ``c++`` or ``g++``)
against the XLA FFI headers that jaxlib ships, with ``-O3 -march=native``: the
library is built for the CPU it runs on. It is cached under
``$MOEJAX_CACHE_DIR`` (default ``$XDG_CACHE_HOME/moejax`` or
``~/.cache/moejax``) in a folder named by a hash of the source, the compiler,
the flags, jaxlib's version and the CPU's feature flags, so a cache shared by
different machines or versions never serves a wrong build. Several processes
may build at once: each writes its own temporary file and renames it into place.

``python -m moejax.native_build`` builds (if needed) and prints the library's path.
Without a compiler nothing breaks: :func:`available` is False, the reason is in
:func:`unavailable_reason`, and ``select-impl`` keeps the pure-XLA implementations.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import jax

__all__ = ["NativeBuildError", "FFI_TARGET", "library_path", "load", "available", "unavailable_reason"]

FFI_TARGET = "moejax_grouped_matmul"
_SOURCE = "grouped_matmul.cc"
_SYMBOL = "MoejaxGroupedMatmul"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_BUILD_TIMEOUT_S = 300


class NativeBuildError(RuntimeError):
    """The C++ kernels could not be built or loaded; the message says why and what to do."""


def _compiler() -> str:
    if os.environ.get("CXX"):  # the user's choice, or an error: never silently another compiler
        found = shutil.which(os.environ["CXX"])
        if not found:
            raise NativeBuildError(f"$CXX={os.environ['CXX']!r} is not an executable C++ compiler")
        return found
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise NativeBuildError("no C++ compiler found (set $CXX, or install g++: apt-get install g++)")


def _cpu_flags() -> str:
    """The CPU's feature flags: -march=native code must not run on another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_root() -> Path:
    if os.environ.get("MOEJAX_CACHE_DIR"):
        return Path(os.environ["MOEJAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moejax"


def _source() -> bytes:
    return resources.files("moejax").joinpath("csrc", _SOURCE).read_bytes()


def library_path() -> Path:
    """Where the library for this source, compiler, jaxlib and CPU lives (built or not)."""
    import jaxlib

    key = hashlib.sha256()
    for part in (_source(), _compiler().encode(), " ".join(_FLAGS).encode(), jaxlib.__version__.encode(),
                 _cpu_flags().encode()):
        key.update(part + b"\0")
    return _cache_root() / "native" / key.hexdigest()[:16] / "libmoejax_cpu.so"


def _build(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            _compile_into(Path(tmp), target)
    except OSError as err:  # an unwritable or odd cache folder: say where, and how to choose another
        raise NativeBuildError(f"cannot build in {target.parent} ({err.strerror or err}); "
                               "set $MOEJAX_CACHE_DIR to a writable folder") from None


def _compile_into(tmp: Path, target: Path) -> None:
    """Compile the source in ``tmp`` and rename the library to ``target``."""
    src = tmp / _SOURCE
    src.write_bytes(_source())
    out = tmp / target.name
    cmd = [_compiler(), *_FLAGS, f"-I{jax.ffi.include_dir()}", str(src), "-o", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise NativeBuildError(f"compiling {_SOURCE} took over {_BUILD_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:300])
        raise NativeBuildError(f"compiling {_SOURCE} failed: {first} (command: {' '.join(cmd)})")
    os.replace(out, target)  # atomic: a concurrent build's rename is equally complete


@functools.cache
def load() -> ctypes.CDLL:
    """Build if needed, load, and register the FFI targets with JAX (CPU); returns the library."""
    path = library_path()
    if not path.exists():
        _build(path)
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        handler = getattr(lib, _SYMBOL)
    except (OSError, AttributeError) as err:
        raise NativeBuildError(f"loading {path} failed: {err}; delete that folder to rebuild it") from None
    jax.ffi.register_ffi_target(FFI_TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    return lib


@functools.cache
def unavailable_reason() -> str | None:
    """None when the kernels load; otherwise one line saying why not."""
    if os.environ.get("MOEJAX_DISABLE_NATIVE"):
        return "disabled by $MOEJAX_DISABLE_NATIVE"
    try:
        load()
    except NativeBuildError as err:
        return str(err)
    return None


def available() -> bool:
    """Whether the C++ CPU kernels can be used here (builds them on the first call)."""
    return unavailable_reason() is None


if __name__ == "__main__":  # pragma: no cover - a command-line convenience
    reason = unavailable_reason()
    if reason:
        print(f"moejax native kernels unavailable: {reason}", file=sys.stderr)
        sys.exit(1)
    print(library_path())
