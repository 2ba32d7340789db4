"""One process of the multi-process expert-parallel tests (tests/test_sharding_multihost.py).

Usage: ``python tests/multihost_worker.py PORT NUM_PROCESSES PROCESS_ID OUT_DIR TIMEOUT_S [DEVICES [CHECKPOINT [ROLE]]]``.

Each process has ``DEVICES`` simulated CPU devices (default 2); the mesh spans all
processes' devices. Without ``CHECKPOINT`` every process builds the same random
tiny model; with it, the model is loaded with ``from_pretrained(CHECKPOINT,
mesh=...)`` (each process reading only its slices; the tensors and bytes it read
go to ``OUT_DIR/reads_<id>.json``) and its experts are quantized to int4 before
``ep``. Writes ``OUT_DIR/logits_<id>.npy`` (the optimised model's logits), or prints the cluster error and exits with status 3.
``ROLE=die`` makes the process exit abruptly once the cluster has formed, the
way a crashed peer does (its peers must then end too, not hang).
"""
from __future__ import annotations

import json
import os
import sys

DEVICES = int(sys.argv[6]) if len(sys.argv) > 6 else 2
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from moejax.sharding import multihost  # noqa: E402
from worker_util import record_reads  # noqa: E402


def main() -> int:
    port, nproc, pid, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    timeout = int(sys.argv[5]) if len(sys.argv) > 5 else 60
    checkpoint = sys.argv[7] if len(sys.argv) > 7 and sys.argv[7] != "-" else None
    role = sys.argv[8] if len(sys.argv) > 8 else ""
    try:
        multihost.start_cluster(f"127.0.0.1:{port}", nproc, pid, timeout_s=timeout)
    except multihost.ClusterError as e:
        print(f"CLUSTER_ERROR {e}", flush=True)
        return 3
    import jax
    from flax import nnx

    import moejax
    from moejax.models import MoEDecoder, from_pretrained, tiny_mixtral
    from moejax.sharding import ExpertParallel

    mesh = multihost.global_mesh()
    if role == "die":
        print("DYING", flush=True)
        os._exit(1)
    if checkpoint:
        reads, stop = record_reads()  # every tensor slice this process reads
        model = from_pretrained(checkpoint, mesh=mesh)
        stop()
        json.dump(reads, open(os.path.join(out_dir, f"reads_{pid}.json"), "w"))
    else:
        model = MoEDecoder(tiny_mixtral(n_experts=4, n_layers=2), rngs=nnx.Rngs(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 8), 0, 64), np.int32)
    # check_exact=False: the single-process reference is compared by the parent test.
    passes = [ExpertParallel(mesh=mesh, overlap_chunks=2)]
    if checkpoint:  # int4 experts, quantized where they lie (each process quantizes its own experts)
        passes = ["quantize(bits=4,group_size=16)"] + passes
    opt = moejax.optimize(model, (tokens,), passes, check_exact=False)
    logits = multihost.to_host(opt(multihost.replicated(tokens, mesh)))
    np.save(os.path.join(out_dir, f"logits_{pid}.npy"), logits)
    print(f"OK process {jax.process_index()} of {jax.process_count()}, devices {jax.device_count()}, "
          f"mesh {dict(mesh.shape)}", flush=True)
    multihost.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
