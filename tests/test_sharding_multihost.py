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


def _start(port, nproc, pid, out, timeout_s, devices=2, checkpoint="-", role=""):
    return subprocess.Popen([sys.executable, str(WORKER), str(port), str(nproc), str(pid), str(out), str(timeout_s),
                             str(devices), str(checkpoint), role],
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


def test_two_processes_load_only_their_own_experts_and_match(tmp_path):
    """2 processes x 4 devices: each reads only the experts its devices hold, quantizes them to int4 where
    they lie, and runs the ep pipeline; the result equals one process's."""
    import json
    import re

    import jax.numpy as jnp
    from flax import nnx

    from moejax.models import MoEDecoder, from_pretrained, save_pretrained_hf, tiny_mixtral

    ckpt = tmp_path / "ckpt"
    save_pretrained_hf(MoEDecoder(tiny_mixtral(n_experts=8, n_layers=2), rngs=nnx.Rngs(0)), str(ckpt))
    port = multihost.free_port()
    procs = [_start(port, 2, i, tmp_path, 90, devices=4, checkpoint=ckpt) for i in range(2)]
    outs = _finish(procs)
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
        assert f"OK process {i} of 2, devices 8" in out
    import jax

    import moejax

    tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 8), 0, 64), np.int32)
    single = moejax.optimize(from_pretrained(str(ckpt)), (tokens,), "quantize(bits=4,group_size=16)")
    ref = np.asarray(single(jnp.asarray(tokens)))
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"logits_{i}.npy"), ref, atol=1e-4, rtol=1e-4)
        reads = json.loads((tmp_path / f"reads_{i}.json").read_text())
        experts = {int(m.group(1)) for name in reads if (m := re.search(r"experts\.(\d+)\.", name))}
        assert experts == set(range(4 * i, 4 * i + 4)), f"process {i} read experts {sorted(experts)}"
        assert "model.embed_tokens.weight" in reads  # replicated weights: every process reads them


def test_a_peer_that_dies_ends_the_others(tmp_path):
    """A crashed peer must not leave the survivors hanging in a collective."""
    import time

    port = multihost.free_port()
    start = time.monotonic()
    procs = [_start(port, 2, i, tmp_path, 10, role="die" if i == 1 else "") for i in range(2)]
    outs = _finish(procs, limit=180)
    elapsed = time.monotonic() - start
    assert "DYING" in outs[1]
    assert procs[0].returncode != 0, outs[0][-3000:]
    assert "another task died" in outs[0] or "heartbeat" in outs[0], outs[0][-3000:]
    assert elapsed < 120, f"the survivor took {elapsed:.0f}s to end"


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
