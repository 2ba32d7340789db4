"""``moejax tune``: the search picks the cheapest measured pipeline within the budget; clear errors."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import cli
from moejax.models import MoEDecoder, tiny_mixtral
from moejax.tune import Candidate, pareto_front, search_space, tune

CANDIDATES = ["", "quantize(bits=8)", "quantize(bits=4,group_size=16)", "prune(num_experts=3,method=reap)"]


@pytest.fixture(scope="module")
def tuned():
    model = MoEDecoder(tiny_mixtral(), rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 64, 4 * 33)
    calibration = [jnp.asarray(tokens[:64].reshape(2, 32), jnp.int32)]
    return {loss: tune(model, tokens, max_loss=loss, calibration=calibration, seq_len=32, batch=2,
                       proxy_windows=2, eval_windows=4, candidates=CANDIDATES) for loss in (0.5, 1e-9)}


def test_tune_picks_the_cheapest_pipeline_within_the_budget(tuned):
    loose = tuned[0.5]
    costs = {c.pipeline: c.cost for c in loose.candidates}
    assert costs["quantize(bits=4,group_size=16)"] < costs["quantize(bits=8)"] < costs[""] == loose.base_cost
    assert loose.chosen is not None and loose.chosen.bpb is not None
    assert loose.chosen.loss(loose.base_bpb, full=True) <= 0.5
    within = [c for c in loose.candidates if c.bpb is not None and c.loss(loose.base_bpb, full=True) <= 0.5]
    assert loose.chosen.cost == min(c.cost for c in within)
    # every cheaper candidate the proxy did not rule out (within 3x the budget) was measured, and missed the budget
    for c in loose.candidates:
        if c.cost < loose.chosen.cost and c.loss(loose.base_proxy_bpb) <= 1.5:
            assert c.bpb is not None and c.loss(loose.base_bpb, full=True) > 0.5
    # a near-zero budget: only what does not lose quality qualifies (at worst the float model itself)
    strict = tuned[1e-9]
    assert strict.chosen is not None and strict.chosen.loss(strict.base_bpb, full=True) <= 1e-9
    assert strict.chosen.cost >= loose.chosen.cost
    assert "chosen:" in loose.summary() and "+" in loose.table()


def test_pareto_front_and_search_space():
    cands = [Candidate("a", 1.0, 2.0), Candidate("b", 2.0, 1.5), Candidate("c", 3.0, 1.8), Candidate("d", 1.0, 2.5)]
    assert [c.pipeline for c in pareto_front(cands)] == ["a", "b"]
    space = search_space("expert-bytes")
    assert "prune(keep=0.75,method=reap,budget=global),quantize(bits=3,mixed=true,group_size=64)" in space and "" in space
    assert all("gating" in s or "prune" in s or s == "" for s in search_space("active-flops"))
    with pytest.raises(ValueError, match="target must be one of"):
        search_space("decode-tokens-per-s")


@pytest.mark.parametrize("argv,match", [
    (["tune", "--max-loss", "0"], "--max-loss must be a percentage"),
    (["tune", "--model", "/nonexistent"], "does not exist"),
    (["tune", "--target", "speed"], "invalid choice"),
])
def test_tune_cli_errors_are_one_line(argv, match, capsys):
    assert cli.main(argv + ["--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert match in err and "Traceback" not in err
