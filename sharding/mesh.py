"""Meshes for expert parallelism: build one, check its axes, describe it."""
from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

__all__ = ["expert_mesh", "abstract_expert_mesh", "auto_axes", "check_axes", "describe_mesh", "MESH_AXES",
           "parse_mesh_text", "mesh_from_text"]

# The axes moejax's passes and loading rules use, outermost first: "data" splits the
# batch, "expert" the experts (ep), "model" attention and dense matrices (tensor parallel).
MESH_AXES = ("data", "expert", "model")


def expert_mesh(num_devices: int | None = None, axis: str = "expert", data: int = 1,
                data_axis: str = "data", devices: Any = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices, of every process): ``(data, expert)`` or ``(expert,)``.

    ``num_devices`` is the size of the expert axis (default: all devices / ``data``).
    """
    devs = list(jax.devices() if devices is None else devices)
    if data < 1:
        raise ValueError(f"expert_mesh: data axis size must be >= 1, got {data}")
    n = num_devices if num_devices is not None else len(devs) // data
    if n < 1 or n * data > len(devs):
        raise ValueError(f"expert_mesh: {data} x {n} devices asked but only {len(devs)} are visible; "
                         "on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts")
    chosen = np.array(devs[:n * data], dtype=object)
    if data > 1:
        return Mesh(chosen.reshape(data, n), (data_axis, axis), axis_types=(AxisType.Auto, AxisType.Auto))
    return Mesh(chosen.reshape(n), (axis,), axis_types=(AxisType.Auto,))


def abstract_expert_mesh(num_devices: int, axis: str = "expert", data: int = 1,
                         data_axis: str = "data") -> AbstractMesh:
    """A device-free mesh of the same shape, for lowering/exporting to platforms this host lacks."""
    if data > 1:
        return AbstractMesh((data, num_devices), (data_axis, axis), axis_types=(AxisType.Auto, AxisType.Auto))
    return AbstractMesh((num_devices,), (axis,), axis_types=(AxisType.Auto,))


def auto_axes(mesh: Mesh | AbstractMesh) -> Mesh | AbstractMesh:
    """The same mesh with every axis of type Auto.

    Inside a traced model the MoE activations carry no sharding; with Auto axes
    the compiler inserts the resharding into and out of the ``shard_map`` region
    (with Explicit axes every input would have to be resharded by hand).
    """
    types = (AxisType.Auto,) * len(mesh.axis_names)
    if tuple(getattr(mesh, "axis_types", types)) == types:
        return mesh
    if isinstance(mesh, AbstractMesh):
        return AbstractMesh(tuple(mesh.axis_sizes), tuple(mesh.axis_names), axis_types=types)
    return Mesh(mesh.devices, mesh.axis_names, axis_types=types)


def check_axes(mesh: Any, axis: str, data_axis: str | None, who: str = "ep") -> None:
    """Raise a clear error when ``mesh`` lacks the named axes."""
    if not isinstance(mesh, (Mesh, AbstractMesh)):
        raise TypeError(f"{who}: mesh must be a jax.sharding.Mesh (e.g. moejax.sharding.expert_mesh(8)), "
                        f"got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if axis not in names:
        raise ValueError(f"{who}: the mesh has axes {names} but no axis named {axis!r}; pass axis=<one of "
                         f"{names}> or build the mesh with that axis, e.g. moejax.sharding.expert_mesh(n, "
                         f"axis={axis!r})")
    if data_axis is not None and data_axis not in names:
        raise ValueError(f"{who}: data_axis={data_axis!r} is not an axis of the mesh {names}; pass "
                         f"data_axis=None or one of {names}")
    if data_axis == axis:
        raise ValueError(f"{who}: data_axis and axis must differ, both are {axis!r}")


def describe_mesh(mesh: Any) -> dict[str, int]:
    """``{axis name: size}``."""
    return {str(k): int(v) for k, v in dict(mesh.shape).items()}


def parse_mesh_text(text: str, axes: tuple[str, ...] = MESH_AXES) -> dict[str, int]:
    """``"expert=8,model=2"`` -> ``{"expert": 8, "model": 2}``; raises ``ValueError`` (one line) on bad text."""
    mesh: dict[str, int] = {}
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", item)
        if not m:
            raise ValueError(f"mesh {text!r}: {item.strip()!r} is not axis=size; write e.g. expert=8 or "
                             "expert=4,model=2")
        axis, size = m.group(1), int(m.group(2))
        if axis not in axes:
            raise ValueError(f"mesh {text!r}: unknown axis {axis!r}; the axes are {', '.join(axes)}")
        if size < 1 or axis in mesh:
            raise ValueError(f"mesh {text!r}: axis {axis} must appear once with a size >= 1")
        mesh[axis] = size
    return mesh


def mesh_from_text(text: str, devices: Any = None) -> Mesh:
    """A mesh over the first devices (of every process) from ``"data=2,expert=4"``-style text.

    Axes are ordered ``data, expert, model`` whatever the text's order, so that
    ``model`` (the most communication-heavy) spans neighbouring devices.
    """
    sizes = parse_mesh_text(text)
    names = tuple(a for a in MESH_AXES if a in sizes)
    shape = tuple(sizes[a] for a in names)
    devs = list(jax.devices() if devices is None else devices)
    need = int(np.prod(shape))
    if need > len(devs):
        raise ValueError(f"mesh {text!r} needs {need} devices but {len(devs)} are visible; on CPU set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={need} before JAX starts")
    return Mesh(np.array(devs[:need], dtype=object).reshape(shape), names,
                axis_types=(AxisType.Auto,) * len(names))
