"""Pipeline strings, the pass manager's checks, optimize, inspection and the CLI."""
import dataclasses
import json
import re
import subprocess
import sys
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import cli, dialect, expert_layout, pipeline, rewrite, stats
from moejax.passes import SelectImpl


def test_parse_pipeline_round_trips_and_rejects_bad_specs():
    [p] = moejax.parse_pipeline("select-impl(impl=ragged)")
    assert isinstance(p, SelectImpl) and p.impl == "ragged" and str(p) == "select-impl(impl=ragged)"
    assert str(moejax.parse_pipeline("select-impl")[0]) == "select-impl"
    with pytest.raises(moejax.PassError, match=r"unknown pass 'selct-impl' \(did you mean 'select-impl'\?\); "
                                               r"registered passes: .*select-impl"):
        moejax.parse_pipeline("selct-impl")
    with pytest.raises(moejax.PassError, match=r"unknown option 'imp' \(did you mean 'impl'\?\); valid options: impl"):
        moejax.parse_pipeline("select-impl(imp=ragged)")
    with pytest.raises(moejax.PassError, match="unbalanced"):
        moejax.parse_pipeline("select-impl(impl=ragged")
    with pytest.raises(moejax.PassError, match="key=value"):
        moejax.parse_pipeline("select-impl(ragged)")


def test_select_impl_rejects_unknown_impl(tiny_model, tokens):
    with pytest.raises(moejax.PassError, match="unknown impl 'fast'; available: reference, ragged"):
        moejax.optimize(tiny_model, (tokens,), "select-impl(impl=fast)")


def test_empty_pipeline_reproduces_model_exactly(tiny_model, tokens):
    opt = moejax.optimize(tiny_model, (tokens,), [])
    want = nnx.jit(lambda m, t: m(t))(tiny_model, tokens)
    np.testing.assert_array_equal(opt(tokens), want)
    assert len(opt.stages) == 1 and "moe_" not in str(opt.lowered.jaxpr)


@pytest.mark.parametrize("impl", ["reference", "ragged"])
def test_select_impl_is_exact_and_reported(tiny_model, tokens, impl):
    opt = moejax.optimize(tiny_model, (tokens,), [f"select-impl(impl={impl})"])
    stage = opt.stages[1]
    assert stage.exact and stage.max_deviation is not None and stage.max_deviation < 1e-4
    assert stage.stats["ffn_impls"] == {impl: 2}
    assert f"impl={impl}" in str(stage.program)
    report = opt.report(print_it=False)
    assert "select-impl" in report and "input" in report
    np.testing.assert_allclose(opt(tokens), tiny_model(tokens), atol=1e-4)


def test_select_impl_on_cpu_stores_experts_per_expert(tiny_model, tokens, tmp_path):
    """impl=blocked: one buffer per expert (unrolled layers) on auto layout, exactly the same function."""
    opt = moejax.optimize(tiny_model, (tokens,),
                          "quantize(bits=8),select-impl(impl=blocked),select-impl(impl=blocked,layout=stacked)")
    quantized, split, stacked = (s.program for s in opt.stages[1:])
    scanned = tiny_model.config.scan_layers
    paths = list(stats.expert_weight_sites(split))
    assert paths and all(expert_layout.is_split(split.weights[p]) != scanned for p in paths)
    assert opt.stages[2].stats["ffn_impls"] == {"blocked": 2}
    text = str(split)
    if not scanned:
        assert "weight_format=int8/per-expert" in text and "one buffer per expert" in text
        assert split.metadata["expert_layout"] == {p: "per-expert" for p in paths}
    np.testing.assert_array_equal(split(tokens), quantized(tokens))
    assert opt.stages[2].max_deviation == 0.0
    # layout=stacked restores the quantized arrays bit for bit
    for p in paths:
        for a, b in zip(jax.tree_util.tree_leaves(stacked.weights[p]), jax.tree_util.tree_leaves(quantized.weights[p])):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(stacked(tokens), quantized(tokens))
    split.save(tmp_path / "split")
    np.testing.assert_array_equal(moejax.Program.restore(tmp_path / "split")(tokens), split(tokens))


def test_select_impl_keeps_expert_parallel_weights_stacked(tiny_model, tokens):
    """Inside shard_map each device sees a slice of the experts: those weights must stay stacked."""
    program = moejax.trace(tiny_model, tokens)
    marked = program.replace(metadata={**program.metadata, "expert_parallel": {}})
    ctx = pipeline.PassContext(platform="cpu")
    out = SelectImpl(layout="per-expert").run(marked, ctx)
    assert not any(expert_layout.is_split(w) for w in out.weights.values())
    assert any(expert_layout.is_split(w) for w in SelectImpl(layout="per-expert").run(program, ctx).weights.values()) \
        != tiny_model.config.scan_layers


def test_passes_that_need_stacked_experts_refuse_split_weights(tiny_model, tokens):
    if tiny_model.config.scan_layers:
        pytest.skip("scanned layers keep stacked weights")
    with pytest.raises(moejax.PassError, match=r"pass quantize \(#2\) needs stacked expert weights.*"
                                               r"run quantize before select-impl"):
        moejax.optimize(tiny_model, (tokens,), "select-impl,quantize(bits=8)")
    with pytest.raises(moejax.PassError, match=r"layout='diagonal' is not one of auto, per-expert, stacked"):
        moejax.parse_pipeline("select-impl(layout=diagonal)")


def test_decode_program_optimised_alongside(tiny_model, tokens):
    cache = tiny_model.init_cache(2, 9)
    opt = moejax.optimize(tiny_model, (tokens,), "select-impl(impl=ragged)",
                          decode_example=((tokens[:, :1],), {"cache": cache, "cache_index": jnp.int32(7)}))
    assert len(opt.decode_stages) == 2
    got, _ = opt(tokens[:, :1], cache=cache, cache_index=jnp.int32(7))
    want, _ = tiny_model(tokens[:, :1], cache=cache, cache_index=7)
    np.testing.assert_allclose(got, want, atol=1e-5)


@dataclasses.dataclass(frozen=True)
class _BrokenExact(moejax.Pass):
    """Claims exactness but doubles every combine output."""

    name: ClassVar[str] = "broken-exact"

    def run(self, program, ctx):
        return program.rewrite({"moe_combine": lambda c: 2.0 * c.bind()})


@dataclasses.dataclass(frozen=True)
class _NeedsProfile(moejax.Pass):
    name: ClassVar[str] = "needs-profile"
    needs: ClassVar[tuple] = ("routing_profile",)

    def run(self, program, ctx):  # pragma: no cover - never reached
        return program


def test_exactness_check_names_pass_and_deviation(tiny_model, tokens):
    with pytest.raises(moejax.PassError, match=r"exactness check of pass broken-exact: outputs differ by up to"):
        moejax.optimize(tiny_model, (tokens,), [_BrokenExact()])


def test_unmet_needs_stop_the_pipeline(tiny_model, tokens):
    with pytest.raises(moejax.PassError, match=r"needs-profile \(#1\) needs 'routing_profile'"):
        moejax.optimize(tiny_model, (tokens,), [_NeedsProfile()])


def test_stats_count_bytes_and_flops(tiny_model, tokens):
    st = moejax.program_stats(moejax.trace(tiny_model, tokens))
    cfg = tiny_model.config
    expert = cfg.n_layers * cfg.n_experts * 3 * cfg.d_model * cfg.d_ff_expert * 4
    assert st["expert_bytes"] == expert
    assert st["total_bytes"] > expert
    assert st["active_expert_flops_per_token"] == cfg.n_layers * cfg.routing.k * 3 * 2 * cfg.d_model * cfg.d_ff_expert


def test_dump_inspect_diff_and_dot(tiny_model, tokens, tmp_path, capsys):
    opt = moejax.optimize(tiny_model, (tokens,), "select-impl(impl=ragged)", dump_dir=tmp_path)
    files = sorted(p.name for p in (tmp_path / "forward").iterdir())
    assert "00_input.txt" in files and "01_select-impl_impl_ragged.json" in files
    assert "01_select-impl_impl_ragged.dot" in files and (tmp_path / "manifest.json").exists()
    diff = moejax.diff_programs(opt.stages[0].program, opt.stages[1].program)
    assert "-      impl=reference" in diff and "+      impl=ragged" in diff
    dot = moejax.moe_graph_dot(opt.stages[1].program)
    assert dot.startswith("digraph") and "moe_expert_ffn" in dot and "impl=ragged" in dot
    assert cli.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "select-impl(impl=ragged)" in out and "expert_ffn:2" in out and "complete dump" in out
    assert cli.main(["inspect", str(tmp_path), "--stage", "1"]) == 0
    assert "impl=ragged" in capsys.readouterr().out
    assert cli.main(["inspect", str(tmp_path / "nothing")]) == 2


def test_cli_help_and_passes():
    out = subprocess.run([sys.executable, "-m", "moejax.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "optimize" in out.stdout and "inspect" in out.stdout
    out = subprocess.run([sys.executable, "-m", "moejax.cli", "passes"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "select-impl  (exact)" in out.stdout
    assert re.search(r"impl\s+str\s+default auto\s+allowed: ", out.stdout)


def test_cli_bad_pipeline_is_one_line_error(capsys):
    assert cli.main(["optimize", "--passes", "quantise(bits=4)"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown pass 'quantise'" in err[0]


def test_cli_missing_model_path(capsys):
    assert cli.main(["optimize", "--model", "/no/such/model", "--passes", "select-impl"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_calls_are_routed_by_signature(tiny_model, tokens):
    cache = tiny_model.init_cache(2, 9)
    opt = moejax.optimize(tiny_model, (tokens,), [], decode_example=((tokens[:, :1],), {"cache": cache,
                                                                                        "cache_index": jnp.int32(7)}),
                          extra_examples=[((tokens,), {"cache": cache, "cache_index": jnp.int32(0)})])
    logits, filled = opt(tokens, cache=cache, cache_index=jnp.int32(0))
    want, _ = tiny_model(tokens, cache=cache, cache_index=0)
    np.testing.assert_allclose(logits, want, atol=1e-5)
    assert len(opt.entries) == 3 and len(opt.at_stage(0).entries) == 3
    with pytest.raises(moejax.InputSignatureError, match="no optimised program takes these inputs"):
        opt(tokens[:1])


def test_cli_unknown_architecture_is_one_line_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"architectures": ["FooForCausalLM"]}')
    assert cli.main(["optimize", "--model", str(tmp_path), "--passes", "select-impl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unsupported architecture" in err[0] and "MixtralForCausalLM" in err[0]


def test_cli_optimize_hf_checkpoint_reports_speed_without_bpb(tmp_path, capsys):
    model = moejax.models.MoEDecoder(moejax.models.tiny_mixtral(), rngs=nnx.Rngs(0))
    moejax.models.save_pretrained_hf(model, str(tmp_path))
    assert cli.main(["optimize", "--model", str(tmp_path), "--passes", "select-impl(impl=ragged)", "--batch", "2",
                     "--seq-len", "16", "--decode-tokens", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["pass"] for r in rows] == ["input", "select-impl(impl=ragged)"]
    for r in rows:
        assert r["bits_per_byte"] is None and r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["expert_bytes"] == 2 * 4 * 3 * 32 * 48 * 4
