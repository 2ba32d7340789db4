"""Stage dumps: every stage of every traced signature written to a folder, safely.

Layout of a dump folder::

    .moejax-dump                 written first: marks the folder as a moejax dump
    forward/00_input.txt         program text, one folder per traced signature
    forward/00_input.json        pass, statistics, checks and the MoE structure
    forward/00_input.dot         Graphviz text of the MoE structure
    decode/...  prefill/...
    manifest.json                written last: the stages of each signature, "complete": true

A dump without ``manifest.json`` was interrupted: :func:`read_dump` says so rather
than presenting a partial dump as whole. A folder that is not empty is refused
unless ``overwrite`` is set, and then only when it holds an earlier moejax dump, so
a dump never mixes with stale stages or deletes files it did not write.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = ["DumpError", "StageDump", "DumpContents", "check_dump_target", "read_dump", "MANIFEST", "MARKER"]

MARKER = ".moejax-dump"
MANIFEST = "manifest.json"
FORMAT = 2


class DumpError(ValueError):
    """A dump folder that cannot be written or read; the message names the fix."""


def check_dump_target(directory: str | Path, overwrite: bool = False) -> None:
    """Raise :class:`DumpError` unless ``directory`` can take a new dump (nothing is changed)."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise DumpError(f"dump folder {str(path)!r} is an existing file; choose a folder name")
    if not path.exists() or not any(path.iterdir()):
        return
    if not overwrite:
        raise DumpError(f"dump folder {str(path)!r} is not empty; choose an empty or new folder, or overwrite the "
                        f"earlier dump there (--overwrite)")
    if not (path / MARKER).exists():
        raise DumpError(f"dump folder {str(path)!r} is not empty and holds no moejax dump, so overwriting it could "
                        f"delete files moejax did not write; choose an empty or new folder")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")[:60] or "stage"


class StageDump:
    """Writes stages into ``directory`` (see the module docstring for the layout)."""

    def __init__(self, directory: str | Path, *, overwrite: bool = False):
        self.directory = Path(directory)
        check_dump_target(self.directory, overwrite)
        if self.directory.exists():
            for child in self.directory.iterdir():  # an earlier moejax dump (checked above)
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / MARKER).write_text(json.dumps({"format": FORMAT, "started": _now()}) + "\n")
        self._signatures: dict[str, dict[str, Any]] = {}

    def write_stage(self, signature: str, index: int, stage: Any) -> str:
        """Write one :class:`~moejax.pipeline.Stage` of ``signature``; returns its file stem."""
        from moejax import inspection

        folder = self.directory / signature
        folder.mkdir(exist_ok=True)
        stem = f"{index:02d}_{_slug(stage.name)}"
        program = stage.program
        (folder / f"{stem}.txt").write_text(str(program))
        (folder / f"{stem}.dot").write_text(inspection.moe_graph_dot(program, stage.name))
        meta = {"index": index, "pass": stage.name, "signature": signature, "inputs": program.signature(),
                "seconds": stage.seconds, "exact": stage.exact, "max_deviation": stage.max_deviation,
                "checked_batches": stage.checked_batches, "stats": stage.stats,
                "structure": inspection.structure(program)}
        (folder / f"{stem}.json").write_text(json.dumps(meta, indent=2, default=str))
        entry = self._signatures.setdefault(signature, {"inputs": program.signature(), "stages": []})
        entry["stages"] = [s for s in entry["stages"] if s["index"] != index] + [
            {"index": index, "pass": stage.name, "file": f"{signature}/{stem}"}]
        return stem

    def finish(self, **info: Any) -> Path:
        """Write the manifest (last: its presence means the dump is whole)."""
        manifest = {"format": FORMAT, "complete": True, "written": _now(), **info, "signatures": self._signatures}
        path = self.directory / MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        tmp.replace(path)  # atomic: a manifest is either absent or whole
        return path


@dataclasses.dataclass
class DumpContents:
    """What :func:`read_dump` found: the stage metadata of each signature, in order."""

    directory: Path
    complete: bool
    signatures: dict[str, list[dict[str, Any]]]
    manifest: dict[str, Any]

    def stage_text(self, meta: dict[str, Any]) -> str:
        """The program text of a stage (one of the metadata dicts in :attr:`signatures`)."""
        return (self.directory / meta["signature"] / f"{meta['_stem']}.txt").read_text()


def read_dump(directory: str | Path) -> DumpContents:
    """Read a dump folder; raises :class:`DumpError` with the fix when it is not one."""
    path = Path(directory)
    if not path.is_dir():
        raise DumpError(f"{str(path)!r} is not a folder; give a folder written by `moejax optimize --dump DIR`")
    if not (path / MARKER).exists():
        raise DumpError(f"{str(path)!r} holds no moejax dump; create one with `moejax optimize --dump DIR`")
    manifest: dict[str, Any] = {}
    if (path / MANIFEST).exists():
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DumpError(f"{str(path / MANIFEST)!r} is not valid JSON ({e}); dump again with --overwrite") from e
    signatures: dict[str, list[dict[str, Any]]] = {}
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        stages = []
        for meta_path in sorted(folder.glob("[0-9][0-9]_*.json")):
            try:
                meta = json.loads(meta_path.read_text())
            except (ValueError, UnicodeDecodeError):
                continue  # a file cut short by an interruption: the dump is incomplete anyway
            meta["_stem"] = meta_path.stem
            stages.append(meta)
        if stages:
            signatures[folder.name] = stages
    order = list(manifest.get("signatures", {}))  # the traced order: forward first
    signatures = dict(sorted(signatures.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    complete = bool(manifest.get("complete")) and all(
        len(signatures.get(name, [])) == len(entry.get("stages", []))
        for name, entry in manifest.get("signatures", {}).items())
    return DumpContents(path, complete, signatures, manifest)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
