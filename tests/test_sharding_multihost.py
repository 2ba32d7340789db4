"""Two processes on 127.0.0.1 (gloo CPU collectives) run an ep-optimised model; a missing peer times out."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from moejax.sharding import multihost

WORKER = Path(__file__).with_name("multihost_worker.py")
ROOT = WORKER.parent.parent


def _env():
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _start(port, nproc, pid, out, timeout_s):
    return subprocess.Popen([sys.executable, str(WORKER), str(port), str(nproc), str(pid), str(out), str(timeout_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)


def _finish(procs, limit=240):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=limit)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def test_two_processes_match_single_process(tmp_path):
    import jax
    from flax import nnx

    from moejax.models import MoEDecoder, tiny_mixtral

    port = multihost.free_port()
    procs = [_start(port, 2, i, tmp_path, 90) for i in range(2)]
    outs = _finish(procs)
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
        assert f"OK process {i} of 2, devices 4" in out
    model = MoEDecoder(tiny_mixtral(n_experts=4, n_layers=2), rngs=nnx.Rngs(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 8), 0, 64), np.int32)
    ref = np.asarray(model(tokens))
    for i in range(2):
        got = np.load(tmp_path / f"logits_{i}.npy")
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_peer_that_never_joins_times_out(tmp_path):
    port = multihost.free_port()
    (out,) = _finish([_start(port, 2, 0, tmp_path, 3)], limit=60)
    assert "CLUSTER_ERROR" in out and "processes [1] never joined within 3s" in out, out[-2000:]


def test_start_cluster_rejects_bad_arguments():
    import pytest

    with pytest.raises(multihost.ClusterError, match="process_id=2 must be in"):
        multihost.start_cluster("127.0.0.1:1", 2, 2)
    with pytest.raises(multihost.ClusterError, match="must be HOST:PORT"):
        multihost.start_cluster("localhost", 2, 0)
