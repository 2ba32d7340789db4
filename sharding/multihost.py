"""Multi-host helpers: start a JAX cluster with a time-out, build meshes across processes, move data.

Every process runs the same program (JAX's multi-controller model)::

    from moejax.sharding import multihost
    multihost.start_cluster("10.0.0.1:7777", num_processes=2, process_id=i, timeout_s=60)
    mesh = multihost.global_mesh()                 # all devices of all processes on the "expert" axis
    opt = moejax.optimize(model, (tokens,), [ExpertParallel(mesh=mesh)])
    logits = multihost.to_host(opt(multihost.replicated(tokens, mesh)))

On CPU the collectives across processes use gloo
(``jax_cpu_collectives_implementation="gloo"``), so a cluster of processes on
one machine (127.0.0.1) exercises the same code paths as a multi-host pod.
"""
from __future__ import annotations

import socket
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.sharding.mesh import expert_mesh

__all__ = ["ClusterError", "free_port", "rendezvous", "start_cluster", "shutdown", "global_mesh", "replicated", "to_host"]


class ClusterError(RuntimeError):
    """The JAX cluster could not be formed (bad address, a peer that never joined, ...)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for a local coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_cluster(coordinator_address: str, num_processes: int, process_id: int, *, timeout_s: int = 60,
                  cpu_collectives: str | None = "gloo", local_device_ids: Any = None) -> None:
    """``jax.distributed.initialize`` with a bounded wait, and CPU collectives switched on.

    Must run before any other JAX call in the process. If a peer has not joined
    within ``timeout_s`` seconds, raises :class:`ClusterError` naming the
    coordinator, the process count and the fix (instead of hanging).

    A peer that dies later (crash, preemption) stops sending heartbeats; after
    ``max(10, timeout_s)`` seconds JAX's coordination service ends every other
    process (non-zero exit, "Terminating process because the JAX distributed
    service detected fatal errors ... another task died") rather than letting
    it wait in a collective forever (tests/test_sharding_multihost.py).
    """
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ClusterError(f"start_cluster: process_id={process_id} must be in [0, num_processes={num_processes})")
    if ":" not in coordinator_address:
        raise ClusterError(f"start_cluster: coordinator_address {coordinator_address!r} must be HOST:PORT")
    if timeout_s < 1:
        raise ClusterError(f"start_cluster: timeout_s must be >= 1 second, got {timeout_s}")
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if num_processes > 1:
        # XLA's coordination client aborts the whole process (LOG(FATAL)) when a peer
        # never registers; a bounded TCP rendezvous first turns that into an exception.
        host, _, port = coordinator_address.rpartition(":")
        rendezvous(host, int(port), num_processes, process_id, timeout_s)
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=int(timeout_s), heartbeat_timeout_seconds=max(
                                       10, int(timeout_s)), shutdown_timeout_seconds=max(5, int(timeout_s) // 2))
    except Exception as e:  # XLA raises plain RuntimeErrors (DEADLINE_EXCEEDED, UNAVAILABLE)
        raise ClusterError(
            f"process {process_id}/{num_processes}: the JAX cluster at {coordinator_address} did not form within "
            f"{timeout_s}s ({type(e).__name__}: {str(e).splitlines()[0][:300]}); start all {num_processes} "
            "processes with the same coordinator address and num_processes, check that the port is reachable, "
            "or raise timeout_s") from e


def _fail(process_id: int, num_processes: int, address: str, timeout_s: float, what: str) -> ClusterError:
    return ClusterError(f"process {process_id}/{num_processes}: {what} within {timeout_s:g}s at {address}; start all "
                        f"{num_processes} processes with the same coordinator address and num_processes, check "
                        "that the coordinator port is reachable, or raise timeout_s")


def rendezvous(host: str, port: int, num_processes: int, process_id: int, timeout_s: float) -> None:
    """Wait (at most ``timeout_s``) until all processes are up, over a plain TCP socket on the coordinator port.

    Process 0 listens and collects the other process ids, then tells them to
    go; the others connect (retrying until the deadline) and wait for the go.
    Raises :class:`ClusterError` naming the processes that never joined.
    """
    deadline = time.monotonic() + timeout_s
    address = f"{host}:{port}"
    if process_id == 0:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            srv.bind((host, port))
        except OSError as e:
            srv.close()
            raise ClusterError(f"process 0: cannot listen on {address} ({e}); pick a free port "
                               "(moejax.sharding.multihost.free_port())") from e
        srv.listen(num_processes)
        peers: dict[int, socket.socket] = {}
        try:
            while len(peers) < num_processes - 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(1, num_processes)) - set(peers))
                    raise _fail(0, num_processes, address, timeout_s, f"processes {missing} never joined")
                srv.settimeout(left)
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    continue
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    pid = int(conn.recv(16).decode().strip() or -1)
                except (OSError, ValueError):
                    conn.close()
                    continue
                if not 0 < pid < num_processes or pid in peers:
                    conn.close()
                    raise ClusterError(f"process 0: a peer announced process id {pid}, which is out of range or "
                                       f"taken; give each of the {num_processes} processes a distinct process_id")
                peers[pid] = conn
            for conn in peers.values():
                conn.sendall(b"go\n")
            for conn in peers.values():  # let the peers close first (their side keeps TIME_WAIT)
                conn.settimeout(5)
                try:
                    conn.recv(16)
                except OSError:
                    pass
        finally:
            for conn in peers.values():
                conn.close()
            srv.close()
        return
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _fail(process_id, num_processes, address, timeout_s, "the coordinator (process 0) did not answer")
        try:
            conn = socket.create_connection((host, port), timeout=min(1.0, left))
        except OSError:
            time.sleep(min(0.2, max(0.0, left)))
            continue
        try:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            conn.sendall(f"{process_id}\n".encode())
            reply = conn.recv(16)
        except OSError:
            reply = b""
        finally:
            conn.close()
        if reply.startswith(b"go"):
            return
        raise _fail(process_id, num_processes, address, timeout_s, "the other processes did not all join")


def shutdown() -> None:
    """Leave the cluster (safe to call when none was started)."""
    try:
        jax.distributed.shutdown()
    except Exception:  # pragma: no cover - nothing to shut down
        pass


def global_mesh(num_devices: int | None = None, axis: str = "expert", data: int = 1,
                data_axis: str = "data") -> Mesh:
    """A mesh over the devices of every process (process-major order, as ``jax.devices()``)."""
    return expert_mesh(num_devices, axis=axis, data=data, data_axis=data_axis, devices=jax.devices())


def replicated(x: Any, mesh: Mesh) -> jax.Array:
    """A global array holding the same host value ``x`` on every device of ``mesh`` (every process passes ``x``)."""
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, P()), lambda idx: host[idx])


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) global array, on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    if getattr(x, "is_fully_replicated", False):
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
