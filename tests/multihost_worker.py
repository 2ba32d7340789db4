"""One process of the two-process expert-parallel test (tests/test_sharding_multihost.py).

Usage: ``python tests/multihost_worker.py PORT NUM_PROCESSES PROCESS_ID OUT_DIR [TIMEOUT_S]``.
Each process has 2 simulated CPU devices; the mesh spans all processes' devices.
Writes ``OUT_DIR/logits_<id>.npy`` (the ep-optimised model's logits) or prints the
cluster error and exits with status 3.
"""
from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from moejax.sharding import multihost  # noqa: E402


def main() -> int:
    port, nproc, pid, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    timeout = int(sys.argv[5]) if len(sys.argv) > 5 else 60
    try:
        multihost.start_cluster(f"127.0.0.1:{port}", nproc, pid, timeout_s=timeout)
    except multihost.ClusterError as e:
        print(f"CLUSTER_ERROR {e}", flush=True)
        return 3
    import jax
    from flax import nnx

    import moejax
    from moejax.models import MoEDecoder, tiny_mixtral
    from moejax.sharding import ExpertParallel

    mesh = multihost.global_mesh()
    model = MoEDecoder(tiny_mixtral(n_experts=4, n_layers=2), rngs=nnx.Rngs(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 8), 0, 64), np.int32)
    # check_exact=False: the single-process reference is compared by the parent test.
    opt = moejax.optimize(model, (tokens,), [ExpertParallel(mesh=mesh, overlap_chunks=2)], check_exact=False)
    logits = multihost.to_host(opt(multihost.replicated(tokens, mesh)))
    np.save(os.path.join(out_dir, f"logits_{pid}.npy"), logits)
    print(f"OK process {jax.process_index()} of {jax.process_count()}, devices {jax.device_count()}, "
          f"mesh {dict(mesh.shape)}", flush=True)
    multihost.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
