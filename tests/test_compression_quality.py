"""Quality bounds of every lossy expert-compression method on both bundled models.

Each pipeline runs on the model's traced forward program (calibrated on the first
16 KB of the training text) and is scored on held-out windows the methods never
saw. The bounds are the measured costs (``python benchmarks/compression_quality.py``,
``benchmarks/results/compression_quality.json``) with a margin for the shorter
text scored here; where the bound is above issue 15's goal the README says so.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import data
from moejax.models import load_bundled_model
from moejax.pipeline import PassContext, PassManager

pytestmark = pytest.mark.full_optimization  # runtime-bound: training and scoring the bundled models

WINDOWS, SEQ = 8, 256
PREFIX = ["select-impl(layout=stacked)", "profile"]

# model -> pipeline after PREFIX -> the largest relative increase of held-out bits per byte allowed per stage
BOUNDS = {
    "default": {
        "gating(top_p=0.5)": [0.03],
        # Issue 15's gating goal (-25% active expert FLOPs at <= +1%): +0.49% on these windows
        "gating(skip_ratio=0.3,renormalize=false)": [0.01],
        # Issue 15's goal for 25% fewer experts (<= +6%) is met only by the benchmark's longer run
        # (64 KB calibration, 200 steps: +5.61%); these 20 steps on 16 KB measured +7.78%.
        "prune(keep=0.75,method=reap,budget=global),recalibrate-router(target=logits,steps=20)": [0.10, 0.085],
        "merge(keep=0.75,refit=true)": [0.12],
        # starting from the dominant member: +8.67% on these windows (+9.13% from the average)
        "merge(keep=0.75,refit=true,weights=dominant)": [0.10],
    },
    "fine-grained": {
        # Issue 15's gating goal here is <= +0.5% at -25%: +0.27% on these windows, +0.54% on the
        # benchmark's 32 KB of held-out text (missed there by 0.04 points)
        "gating(min_weight=0.145,renormalize=false)": [0.005],
        # Issue 15's goal here is <= +2%: the benchmark's distill (200 steps on 256 KB) measured +2.68%.
        # These 20 steps on 16 KB measured +12.63% after pruning and +9.70% after distilling.
        "prune(keep=0.75,method=reap,budget=global),distill(steps=20)": [0.14, 0.11],
        # REAP-guided merging, spread over layers: +15.69% on these windows (average linkage: +21.86%)
        "merge(keep=0.75,method=reap,budget=global,refit=true,weights=dominant,distinct=true)": [0.18],
    },
}


def _bits_per_byte(program, windows: np.ndarray) -> float:
    logits = program(jnp.asarray(windows[:, :-1]))
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(windows[:, 1:, None]), axis=-1)
    return float(jnp.mean(nll)) / np.log(2)


@pytest.fixture(scope="module")
def heldout_windows() -> np.ndarray:
    tokens = data.encode(data.heldout_bytes())
    stride = len(tokens) // WINDOWS  # spread over the whole held-out text
    return np.stack([tokens[i * stride: i * stride + SEQ + 1] for i in range(WINDOWS)])


@pytest.fixture(scope="module")
def profiled():
    """Each bundled model's forward program, profiled once on 16 KB of training text, and its float quality."""
    cache = {}

    def get(name: str):
        if name not in cache:
            program = moejax.trace(load_bundled_model(name), jnp.zeros((WINDOWS, SEQ), jnp.int32))
            ctx = PassContext(calibration=[data.calibration_tokens(16384, SEQ)])
            cache[name] = PassManager(PREFIX, check_exact=False).run(program, ctx)[-1].program
        return cache[name]

    return get


@pytest.mark.parametrize("model_name,pipeline", [(m, p) for m, b in BOUNDS.items() for p in b])
def test_lossy_method_stays_within_its_quality_bound(model_name, pipeline, profiled, heldout_windows):
    program = profiled(model_name)
    ctx = PassContext(calibration=[data.calibration_tokens(16384, SEQ)])
    stages = PassManager([pipeline], check_exact=False).run(program, ctx)[1:]  # the source: the float program
    base = _bits_per_byte(program, heldout_windows)
    for stage, bound in zip(stages, BOUNDS[model_name][pipeline]):
        cost = _bits_per_byte(stage.program, heldout_windows) / base - 1
        assert cost <= bound, f"{model_name} {stage.name}: +{100 * cost:.2f}% bits per byte > +{100 * bound:.0f}%"
        assert cost > -0.05  # no method makes the model much *better*: a sign of a broken metric


def test_mixed_precision_beats_uniform_3_bits_in_fewer_bytes(profiled, heldout_windows):
    """Issue 15: widths from {2, 3, 4, 8} averaging <= 3 bits, placed by measured sensitivity, score better
    than every expert at 3 bits, in no more expert bytes (default model: measured +0.73% vs +0.96%)."""
    program = profiled("default")
    base = _bits_per_byte(program, heldout_windows)
    cost, size = {}, {}
    for pipeline in ("quantize(bits=3,group_size=64)", "quantize(bits=3,mixed=true,group_size=64)"):
        ctx = PassContext(calibration=[data.calibration_tokens(16384, SEQ)])
        stage = PassManager([pipeline], check_exact=False).run(program, ctx)[-1]
        cost[pipeline] = _bits_per_byte(stage.program, heldout_windows) / base - 1
        size[pipeline] = moejax.program_stats(stage.program)["expert_bytes"]
    uniform, mixed = cost.values()
    assert 0 < mixed < uniform < 0.05, cost
    assert size["quantize(bits=3,mixed=true,group_size=64)"] <= size["quantize(bits=3,group_size=64)"], size
