"""Expert offloading at run time: scanned layers, quantized experts, counters, no recompilation, the pass's
errors and its CLI columns."""
import jax
import numpy as np
import pytest

import moejax
from moejax import offload
from moejax.pipeline import PassError
from offload_util import PROMPT, _decode, _model, _optimize, _tokens


@pytest.fixture(scope="module")
def unrolled():
    return _model()


def test_offload_profile_policy_and_scanned_layers():
    model = _model(scan_layers=True)
    ref = _decode(_optimize(model, "select-impl,offload(resident=1.0,prefetch=false)", check_exact=False), model)
    opt = _optimize(model, "profile,select-impl,offload(resident=0.25,policy=profile,pin=2)",
                    calibration=[_tokens(32, 5)], check_exact=False)
    assert np.array_equal(_decode(opt, model), ref)
    runtime = offload.offloaded_programs(opt)[0].runtime
    assert len(runtime.cache.pinned) == 2 and runtime.cache.pinned <= set(runtime.resident)
    assert len(offload.report_fields(opt)["hit_rate_per_layer"]) == 3  # one per unrolled layer


def test_offload_quantized_stacked_experts_and_dropped_slots():
    """int4 experts in the stacked layout, and skip gating (dropped slots; a layer may route nowhere)."""
    model = _model()
    spec = "gating(skip_ratio=0.9),quantize(bits=4,group_size=16),select-impl(layout=stacked),offload"
    ref = _decode(_optimize(model, spec + "(resident=1.0,prefetch=false)", check_exact=False), model)
    opt = _optimize(model, spec + "(resident=0.25)", check_exact=False)
    assert np.array_equal(_decode(opt, model), ref)


def test_offload_counts_hits_and_prefetch(unrolled):
    opt = _optimize(unrolled, "select-impl,offload(resident=1.0,prefetch_k=8)", check_exact=False)
    _decode(opt, unrolled)  # warm-up: every expert becomes resident
    offload.reset_counters(opt)
    _decode(opt, unrolled)
    f = offload.report_fields(opt)
    assert f["expert_cache_hit_rate"] == 1.0 and f["bytes_moved"] == 0  # everything was resident after warm-up
    assert f["prefetch_recall"] == 1.0  # predicting all 8 experts cannot miss
    naive = _optimize(unrolled, "select-impl,offload(resident=0,prefetch=false)", check_exact=False)
    offload.reset_counters(naive)
    _decode(naive, unrolled)
    f = offload.report_fields(naive)
    assert f["expert_cache_hit_rate"] == 0.0 and f["prefetch_recall"] is None
    per_expert = naive.program.metadata["offload"]["expert_bytes"] // (3 * 8)
    assert f["bytes_moved_per_token"] == 3 * 2 * per_expert  # 3 layers x top-2, every step


# --------------------------------------------------------------------------
# No recompilation after warm-up.
# --------------------------------------------------------------------------
def test_offloaded_decode_does_not_recompile(unrolled):
    opt = _optimize(unrolled, "select-impl,offload(resident=0.25)", check_exact=False)
    _decode(opt, unrolled, seed=3)  # warm-up: compiles every part once
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        _decode(opt, unrolled, seed=4)  # other tokens: other experts, evictions, prefetches
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


# --------------------------------------------------------------------------
# Errors and the CLI columns.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("spec, match", [
    ("offload(policy=fifo)", "policy='fifo' is not one of"),
    ("offload(tier=ssd)", "tier='ssd' is not one of"),
    ("offload(resident=-1)", "resident must be >= 0"),
    ("offload(policy=profile)", "policy=profile needs a routing profile; add profile before offload"),
    ("offload(pin=2)", "pin needs a routing profile"),
    ("profile,offload(resident=1KB,pin=2)", "pinned experts do not fit the resident budget"),
    ("offload,offload", "already offloaded"),
    ("offload,select-impl", "offload as the last pass"),
    ("profile,quantize(bits=4,mixed=true,group_size=16),offload", "mixed-precision"),
])
def test_offload_errors(unrolled, spec, match):
    with pytest.raises(PassError, match=match):
        moejax.optimize(unrolled, (_tokens(PROMPT),), spec, calibration=[_tokens(32, 5)], check_exact=False)


def test_cli_table_shows_the_offload_fields():
    from moejax import cli

    rows = [{"pass": "select-impl", "expert_bytes": 8e6, "total_bytes": 9e6, "active_expert_flops_per_token": 1e6,
             "bits_per_byte": 1.6, "prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 50.0},
            {"pass": "offload", "expert_bytes": 8e6, "total_bytes": 9e6, "active_expert_flops_per_token": 1e6,
             "bits_per_byte": 1.6, "prefill_tokens_per_s": 90.0, "decode_tokens_per_s": 40.0,
             "resident_expert_bytes": 2e6, "expert_cache_hit_rate": 0.625, "prefetch_recall": 0.8,
             "bytes_moved_per_token": 1.5e6}]
    table = cli._fmt_table(rows)
    assert "hit rate" in table and "prefetch recall" in table and "MB moved/tok" in table
    assert "0.625" in table and "1.500" in table and "2.000" in table
