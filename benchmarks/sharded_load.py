"""Peak host memory while loading a sharded checkpoint onto 8 simulated devices.

Writes a Mixtral-layout checkpoint of about ``--gb`` GB (float32, one safetensors
shard per layer plus the index, as released checkpoints are laid out), then loads
it in fresh processes and reads each process's peak resident set size
(``VmHWM``):

* ``one process, no mesh``: ``from_pretrained(path)`` (everything on one device);
* ``one process, mesh expert=8``: ``from_pretrained(path, mesh=...)``;
* ``2 processes x 4 devices``: a JAX cluster on 127.0.0.1, ``mesh=`` over all 8
  devices, each process reading only its own experts.

The issue's bound is ``1.5 x (checkpoint bytes / processes) + largest tensor``;
``peak - before`` is the growth during the load (``before`` = RSS once JAX and its
devices are up). On CPU the "devices" live in host memory, so a process's share
of the weights is resident by construction; a replicated weight costs one copy
per local device.

Usage::

    python benchmarks/sharded_load.py                 # ~3 GB checkpoint, results/sharded_load.json
    python benchmarks/sharded_load.py --smoke         # ~200 MB, about 20 s
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODES = {"one process, no mesh": (1, False), "one process, mesh expert=8": (1, True),
         "2 processes x 4 devices, mesh expert=8": (2, True)}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_checkpoint(folder: Path, d: int, ff: int, experts: int, layers: int, vocab: int) -> dict:
    """A random Mixtral-layout checkpoint, one shard per layer; returns its sizes."""
    from moejax.models.safetensors_io import INDEX_FILE, save_file

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    kv = d // 4

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    weight_map, total, largest = {}, 0, 0

    def write(name: str, tensors: dict) -> None:
        nonlocal total, largest
        save_file(tensors, str(folder / name))
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.nbytes
            largest = max(largest, v.nbytes)

    write("model-embed.safetensors", {"model.embed_tokens.weight": w(vocab, d), "lm_head.weight": w(vocab, d),
                                      "model.norm.weight": np.ones(d, np.float32)})
    for i in range(layers):
        p = f"model.layers.{i}"
        t = {f"{p}.input_layernorm.weight": np.ones(d, np.float32),
             f"{p}.post_attention_layernorm.weight": np.ones(d, np.float32),
             f"{p}.self_attn.q_proj.weight": w(d, d), f"{p}.self_attn.k_proj.weight": w(kv, d),
             f"{p}.self_attn.v_proj.weight": w(kv, d), f"{p}.self_attn.o_proj.weight": w(d, d),
             f"{p}.block_sparse_moe.gate.weight": w(experts, d)}
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            t.update({f"{q}.w1.weight": w(ff, d), f"{q}.w3.weight": w(ff, d), f"{q}.w2.weight": w(d, ff)})
        write(f"model-{i:05d}.safetensors", t)
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
              "hidden_size": d, "intermediate_size": ff, "num_hidden_layers": layers, "num_attention_heads": 8,
              "num_key_value_heads": 2, "num_local_experts": experts, "num_experts_per_tok": 2,
              "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False,
              "dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    return {"checkpoint_bytes": total, "largest_tensor_bytes": largest}


def child(args: argparse.Namespace) -> None:
    """One loading process: prints ``RESULT {json}``."""
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from moejax.sharding import multihost

    if args.nproc > 1:
        multihost.start_cluster(f"127.0.0.1:{args.port}", args.nproc, args.pid, timeout_s=120)
    import jax

    from moejax.models import from_pretrained

    jax.devices()
    before = _status_kb("VmRSS") * 1024
    mesh = multihost.global_mesh() if args.mesh else None
    start = time.perf_counter()
    model = from_pretrained(args.child, mesh=mesh)
    from flax import nnx

    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - start
    local = sum(s.data.nbytes for leaf in leaves for s in leaf.addressable_shards)
    peak = _status_kb("VmHWM") * 1024
    print("RESULT " + json.dumps({"pid": args.pid, "rss_before": before, "rss_peak": peak, "load_s": seconds,
                                  "local_device_bytes": local}), flush=True)
    if args.nproc > 1:
        multihost.shutdown()


def run_mode(ckpt: Path, nproc: int, mesh: bool) -> list[dict]:
    from moejax.sharding.multihost import free_port

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    port = free_port()
    devices = 8 // nproc
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(ckpt), "--nproc", str(nproc), "--pid",
                               str(i), "--port", str(port), "--devices", str(devices)] + (["--mesh"] if mesh else []),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(nproc)]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise SystemExit(f"loader process failed (rc={p.returncode}):\n{err[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=3.0, help="approximate checkpoint size in GB")
    ap.add_argument("--smoke", action="store_true", help="a ~200 MB checkpoint")
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", default=None, help="write the checkpoint here and keep it")
    # child-process arguments
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--nproc", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--pid", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--mesh", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    gb = 0.2 if args.smoke else args.gb
    # experts hold most bytes, as in released MoE checkpoints (DeepSeek-V3: ~97 %)
    d, ff, experts = (128, 2048, 16) if args.smoke else (1024, 2816, 16)
    per_layer = 3 * d * ff * experts * 4
    layers = max(1, round(gb * 1e9 / per_layer))
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="moejax-sharded-load-"))
    try:
        sizes = write_checkpoint(folder, d, ff, experts, layers, vocab=512 if args.smoke else 4096)
        rows = []
        for mode, (nproc, mesh) in MODES.items():
            for r in run_mode(folder, nproc, mesh):
                bound = 1.5 * sizes["checkpoint_bytes"] / nproc + sizes["largest_tensor_bytes"]
                rows.append({"mode": mode, "process": r["pid"], "rss_before_mb": r["rss_before"] / 1e6,
                             "rss_peak_mb": r["rss_peak"] / 1e6,
                             "growth_mb": (r["rss_peak"] - r["rss_before"]) / 1e6,
                             "device_bytes_mb": r["local_device_bytes"] / 1e6, "bound_mb": bound / 1e6,
                             "peak_within_bound": r["rss_peak"] <= bound, "load_s": r["load_s"]})
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"checkpoint: {sizes['checkpoint_bytes'] / 1e9:.2f} GB in {layers + 1} shards, largest tensor "
          f"{sizes['largest_tensor_bytes'] / 1e6:.1f} MB (d={d}, ff={ff}, {experts} experts, {layers} layers)")
    print(common.format_table(rows, ["mode", "process", "rss_before_mb", "rss_peak_mb", "growth_mb",
                                     "device_bytes_mb", "bound_mb", "peak_within_bound", "load_s"]))
    payload = common.result_payload("sharded_load", {"gb": gb, "smoke": args.smoke},
                                    {"threads": common.available_cpus(), "xla_cpu_threads": common.available_cpus()},
                                    rows, **sizes, layers=layers, d_model=d, d_ff=ff, experts=experts)
    path = common.write_json(args.out or common.default_out("sharded_load", args.smoke), payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
