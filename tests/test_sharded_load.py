"""``from_pretrained(path, mesh=...)``: sharding rules, slice reads, and loads onto 8 simulated devices.

The 8-device loads run once in a subprocess (tests/sharded_load_worker.py; the device
count is fixed before JAX starts); each test checks one part of its report.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from worker_util import run_worker

from moejax.models import CheckpointError
from moejax.models.safetensors_io import SafetensorsFile, save_file
from moejax.models.sharded_load import partition_spec

WORKER = Path(__file__).with_name("sharded_load_worker.py")
MESH = AbstractMesh((4, 2), ("expert", "model"))
TOL = 1e-5  # the same float ops, partitioned: f32 logits of order 1


@pytest.mark.parametrize("path,shape,spec", [
    ("layers/0/mlp/experts/w_up", (8, 32, 48), P("expert", None, None)),
    ("layers/mlp/experts/w_up", (2, 8, 32, 48), P(None, "expert", None, None)),  # stacked under scan
    ("layers/3/self_attn/q_proj/kernel", (32, 64), P(None, "model")),
    ("layers/3/self_attn/o_proj/kernel", (64, 32), P("model", None)),
    ("layers/0/mlp/shared/down_proj/kernel", (16, 32), P("model", None)),
    ("layers/0/mlp/gate/kernel", (32, 8), P()),  # routers stay replicated
    ("embed_tokens/embedding", (64, 32), P()),
    ("layers/0/mlp/experts/w_up", (6, 32, 48), P(None, None, None)),  # 4 does not divide 6: whole
])
def test_default_rules(path, shape, spec):
    assert partition_spec(path, shape, MESH) == spec


def test_axes_the_mesh_lacks_are_ignored():
    mesh = AbstractMesh((8,), ("expert",))
    assert partition_spec("layers/0/self_attn/q_proj/kernel", (32, 64), mesh) == P(None, None)
    assert partition_spec("layers/0/mlp/experts/w_up", (8, 32, 48), mesh) == P("expert", None, None)


def test_explicit_rules_are_strict():
    rules = [(r"experts/w_up$", ("expert", None, None))]
    with pytest.raises(ValueError, match="mesh axis 'expert' of size 4 does not divide its dimension 6"):
        partition_spec("layers/0/mlp/experts/w_up", (6, 32, 48), MESH, rules)
    with pytest.raises(ValueError, match="gives 2 axes for parameter"):
        partition_spec("layers/0/mlp/experts/w_up", (8, 32, 48), MESH, [(r"w_up$", ("expert", None))])
    assert partition_spec("norm/weight", (32,), MESH, rules) == P()  # unmatched: replicated


def test_read_returns_slices_and_reads_only_their_rows(tmp_path):
    a = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    save_file({"a": a, "s": np.float32(3.0).reshape(())}, str(tmp_path / "m.safetensors"))
    f = SafetensorsFile(str(tmp_path / "m.safetensors"))
    np.testing.assert_array_equal(f.read("a"), a)
    assert f.bytes_read == a.nbytes
    block = f.read("a", (slice(2, 4), slice(1, 3)))
    np.testing.assert_array_equal(block, a[2:4, 1:3])
    assert block.flags.c_contiguous
    assert f.bytes_read == a.nbytes + 2 * 5 * 4 * 4  # rows 2 and 3 only
    assert f.read("s").shape == ()
    with pytest.raises(ValueError, match="unit-step"):
        f.read("a", (slice(0, 6, 2),))


def test_read_of_a_truncated_file_is_one_clear_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": np.ones((64, 64), np.float32)}, str(path))
    f = SafetensorsFile(str(path))  # header checked against the size now
    os.truncate(path, path.stat().st_size - 100)  # ... and the file shrinks afterwards
    with pytest.raises(CheckpointError, match="ends early"):
        f.read("a")


def test_rules_without_a_mesh_are_refused(tmp_path):
    from flax import nnx

    from moejax.models import MoEDecoder, from_pretrained, save_pretrained_hf, tiny_mixtral

    save_pretrained_hf(MoEDecoder(tiny_mixtral(), rngs=nnx.Rngs(0)), str(tmp_path))
    with pytest.raises(ValueError, match="pass mesh= too"):
        from_pretrained(str(tmp_path), rules=[])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_worker(WORKER, (str(tmp_path_factory.mktemp("sharded")),), timeout=600)


def _case(report, name):
    res = report[name]
    assert "error" not in res, f"{name}: {res.get('error')}\n{res.get('trace', '')}"
    return res


@pytest.mark.parametrize("scan", [False, True])
def test_mixtral_onto_expert_by_model_mesh(report, scan):
    r = _case(report, "mixtral")[f"scan={scan}"]
    assert r["dev"] <= TOL
    prefix = "layers/" if scan else "layers/0/"
    assert r["specs"][f"{prefix}mlp/experts/w_up"] == ("P(None, 'expert')" if scan else "P('expert',)")
    assert r["specs"][f"{prefix}self_attn/q_proj/kernel"] == ("P(None, None, 'model')" if scan else
                                                              "P(None, 'model')")
    assert r["specs"][f"{prefix}mlp/gate/kernel"] == "P()"
    # one process holds every device: each stored byte is read exactly once (replicas share a read)
    assert r["bytes_read"] == r["stored_bytes"]


def test_ep_pipeline_on_a_sharded_load_matches(report):
    assert _case(report, "mixtral")["ep_dev"] <= TOL


def test_default_rules_replicate_what_the_mesh_does_not_divide_explicit_rules_refuse(report):
    r = _case(report, "mixtral")
    assert r["default_rules_on_3"] == "P(None, None, None)"
    assert "mesh axis 'expert' of size 3 does not divide its dimension 8" in r["indivisible_rule"]
    assert "gives 3 axes" in r["bad_rule"]


def test_deepseek_v3_mla_shared_and_dense_layers(report):
    r = _case(report, "deepseek_v3")
    if "skipped" in r:
        pytest.skip(r["skipped"])
    assert r["dev"] <= TOL
    specs = r["specs"]
    assert specs["layers/0/mlp/gate_proj/kernel"] == "P(None, 'model')"  # the dense layer: tensor parallel
    assert specs["layers/1/mlp/experts/w_gate"] == "P('expert',)"
    assert specs["layers/1/mlp/shared/down_proj/kernel"] == "P('model',)"
    assert specs["layers/1/self_attn/kv_b_proj/kernel"] == "P(None, 'model')"


def test_fp8_experts_load_onto_the_mesh_as_fp8(report):
    r = _case(report, "deepseek_v3_fp8")
    if "skipped" in r:
        pytest.skip(r["skipped"])
    assert r["dev"] <= TOL
    assert r["format"] == "fp8-e4m3-b8"
    assert r["leaf_dtypes"] == ["float8_e4m3fn", "float32"]  # values and block scales, no float copy
    assert all(spec.startswith("P('expert'") for spec in r["leaf_specs"])
