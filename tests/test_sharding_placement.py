"""Placement, cost model, option/mesh errors and tpu/cuda export of ep programs (single process, no devices needed)."""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import moejax
from moejax.models import MoEDecoder, tiny_mixtral
from moejax.pipeline import PassError, parse_pipeline
from moejax.sharding import (ExpertParallel, PlacementError, abstract_expert_mesh, balanced_placement,
                             contiguous_placement, count_collectives, device_loads, expert_parallel_program,
                             export_program, load_summary, overlap_time, suggest_overlap_chunks)


def test_contiguous_placement_is_identity_and_rejects_uneven_split():
    p = contiguous_placement(8, 4)
    assert p.is_identity and p.slots_per_device == 2 and p.device_experts() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(PlacementError, match=r"6 experts do not divide evenly over 4 devices.*replicate_hot >= 2"):
        contiguous_placement(6, 4)


def test_balanced_placement_lowers_the_busiest_device():
    loads = [50, 40, 30, 20, 5, 3, 2, 1]
    before = load_summary(contiguous_placement(8, 4), loads)
    p = balanced_placement(loads, 4)
    after = load_summary(p, loads)
    assert before["max"] == 90 and after["max"] == 51  # LPT: 50+1, 40+2, 30+3, 20+5 (hot experts on separate devices)
    assert after["mean"] == before["mean"] == sum(loads) / 4
    assert sorted(p.slot_expert) == list(range(8)) and p.slots_per_device == 2


def test_replicas_split_the_hottest_expert():
    loads = [100, 10, 10, 10]
    # 8 slots: expert 0 gets 4 replicas (25 each; never more than one per device), the last extra slot
    # goes to the next hottest per replica (expert 1: 2 x 5)
    p = balanced_placement(loads, 4, replicate_hot=4)
    reps = p.replicas()
    assert len(reps[0]) == 4 and {s // 2 for s in reps[0]} == {0, 1, 2, 3}  # one replica per device
    np.testing.assert_allclose(sorted(device_loads(p, loads)), [30, 30, 35, 35])
    count, slots = p.tables()
    assert list(count) == [4, 2, 1, 1] and slots.shape == (4, 4)


def test_cost_model_prefers_overlap_only_when_it_pays():
    # Mixtral-sized layer, bf16, 25 GB/s links: exchange is ~2/3 of compute, chunking hides most of it
    c, info = suggest_overlap_chunks(4096, 4096, 2, 2 * 3 * 4096 * 14336 * 2, 25, 400, k=2, num_devices=8)
    assert c > 1 and info["speedup"] > 1.2
    assert info["time_s"] == pytest.approx(overlap_time(c, info["exchange_s"], info["compute_s"], info["overhead_s"]))
    # a few decode tokens: fixed per-chunk latency dominates, no chunking
    c1, _ = suggest_overlap_chunks(8, 4096, 2, 1e9, 100, 400)
    assert c1 == 1
    with pytest.raises(ValueError, match="link_GBps"):
        suggest_overlap_chunks(8, 4096, 2, 1e9, 0, 400)


def test_pass_options_and_mesh_errors():
    (p,) = parse_pipeline("ep(num_devices=2,overlap_chunks=2,capacity_factor=1.5)")
    assert isinstance(p, ExpertParallel) and p.overlap_chunks == 2 and p.exact is False
    assert ExpertParallel().exact is True
    with pytest.raises(ValueError, match="no axis named 'expert'"):
        ExpertParallel(mesh=abstract_expert_mesh(2, axis="model"))
    with pytest.raises(PassError, match="overlap_chunks must be >= 1"):
        parse_pipeline("ep(overlap_chunks=0)")
    with pytest.raises(PassError, match="placement must be one of"):
        parse_pipeline("ep(placement=random)")


@pytest.fixture(scope="module")
def program():
    model = MoEDecoder(tiny_mixtral(n_layers=2, n_experts=4), rngs=nnx.Rngs(0))
    return moejax.trace(model, np.zeros((2, 8), np.int32))


def test_experts_not_divisible_by_devices(program):
    with pytest.raises(PassError, match=r"4 experts do not divide evenly over 3 devices.*replicate_hot >= 2"):
        expert_parallel_program(program, abstract_expert_mesh(3))
    ep = expert_parallel_program(program, abstract_expert_mesh(3), replicate_hot=2)  # 6 slots: allowed
    assert ep.metadata["expert_parallel"]["layers"]["layers/0/mlp"]["slots_per_device"] == 2


@pytest.mark.parametrize("chunks", [1, 2])
def test_export_for_tpu_and_cuda_shows_2c_all_to_all_per_layer(program, chunks):
    ep = expert_parallel_program(program, abstract_expert_mesh(8, data=1), overlap_chunks=chunks, replicate_hot=4,
                                 layout="shard")
    text = str(ep)
    assert text.count("shard_map[") == 2 and "AbstractMesh('expert': 8" in text
    for platform in ("tpu", "cuda"):
        exported = export_program(ep, [platform])
        assert exported.nr_devices == 8 and exported.platforms == (platform,)
        counts = count_collectives(exported)
        assert counts["all_to_all"] == 2 * chunks * 2, counts  # 2 MoE layers


def test_export_ragged_exchange_for_gpu_and_tpu(program):
    ep = expert_parallel_program(program, abstract_expert_mesh(4), overlap_chunks=2, layout="shard",
                                 exchange="ragged")
    for platform in ("tpu", "cuda"):
        counts = count_collectives(export_program(ep, [platform]))
        # per layer and chunk: one all_gather of the send counts, two ragged_all_to_all
        assert counts["ragged_all_to_all"] == 2 * 2 * 2 and counts["all_gather"] == 2 * 2
        assert counts["all_to_all"] == 0


def test_ragged_exchange_needs_gpu_or_tpu():
    p = ExpertParallel(exchange="ragged")
    with pytest.raises(PassError, match="exchange=ragged needs a GPU or TPU"):
        p.resolve_exchange("cpu")
    assert ExpertParallel().resolve_exchange("tpu") == "ragged"
    assert ExpertParallel().resolve_exchange("cpu") == "dense"


def test_mixed_precision_experts_are_refused_with_the_fix():
    model = MoEDecoder(tiny_mixtral(), rngs=nnx.Rngs(0))
    tokens = (np.arange(14, dtype=np.int32).reshape(2, 7) * 5) % 64
    mixed = moejax.optimize(model, (tokens,), "profile,quantize(bits=3.5,mixed=true,group_size=16)",
                            calibration=[tokens], check_exact=False).program
    with pytest.raises(PassError, match=r"width per expert \(mixed\(.*run ep before quantize\(mixed=true\)"):
        ExpertParallel(mesh=abstract_expert_mesh(2)).check(mixed, moejax.PassContext())
