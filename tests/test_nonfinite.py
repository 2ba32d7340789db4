"""NaN/Inf: found in traced weights, checkpoints, every pipeline stage and generation, with errors saying where."""
import dataclasses
import glob
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import cli, dialect, models
from moejax.numerics import NonFiniteError
from moejax.pipeline import NonFiniteStageError, PassContext, PassError, PassManager
from moejax.program import path_to_str

EXPERT = "layers/0/mlp/experts/w_up"


@pytest.fixture(scope="module")
def model():
    return models.MoEDecoder(models.tiny_mixtral(), rngs=nnx.Rngs(0))


def with_nan(model, target: str, index=(1,)):
    """A copy of ``model`` whose weight ``target`` has NaN at ``index`` (expert 1 by default)."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    assert target in [path_to_str(p) for p, _ in leaves]
    new = [x.at[index].set(jnp.nan) if path_to_str(p) == target else x for p, x in leaves]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, new))


@dataclasses.dataclass(frozen=True)
class _NaNExperts(moejax.Pass):
    """Declared exact, but its expert outputs are NaN."""

    name: ClassVar[str] = "nan-experts"

    def run(self, program, ctx):
        return program.rewrite({dialect.expert_ffn_p.name: lambda rc: rc.bind() * jnp.nan})


@dataclasses.dataclass(frozen=True)
class _NaNWeight(moejax.Pass):
    """A lossy pass that writes a NaN into an expert weight."""

    name: ClassVar[str] = "nan-weight"
    exact: ClassVar[bool] = False

    def run(self, program, ctx):
        return program.rewrite(weights={EXPERT: program.weights[EXPERT].at[1].set(jnp.nan)})


# --------------------------------------------------------------------------
# Weights coming in.
# --------------------------------------------------------------------------
def test_trace_names_the_nan_weight(model, tokens):
    with pytest.raises(NonFiniteError, match=rf"weight '{EXPERT}' \(\d+ NaN/Inf values\) of the traced model: the "
                                             r"weights are corrupt"):
        moejax.trace(with_nan(model, EXPERT), tokens)


def test_checkpoint_with_nan_is_rejected_naming_the_tensor(model, tmp_path):
    from safetensors.numpy import load_file, save_file

    models.save_pretrained_hf(model, str(tmp_path))
    [path] = glob.glob(str(tmp_path / "*.safetensors"))
    tensors = load_file(path)
    name = next(k for k in sorted(tensors) if "experts.1." in k)
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0] = np.inf
    save_file(tensors, path)
    with pytest.raises(models.CheckpointError, match=rf"tensor '{name}' \(parameter .*\) holds 1 NaN/Inf values: "
                                                     r"the checkpoint .* is corrupt"):
        models.from_pretrained(str(tmp_path))


# --------------------------------------------------------------------------
# Pipeline stages.
# --------------------------------------------------------------------------
def _nan_program(model, tokens):
    """The traced program with NaN put into expert 1 afterwards (past trace's own check)."""
    program = moejax.trace(model, tokens)
    return program.replace(weights={**program.weights, EXPERT: program.weights[EXPERT].at[1].set(jnp.nan)})


@pytest.mark.parametrize("check_exact", [True, False])
def test_nan_expert_weight_then_quantize_is_named(model, tokens, check_exact):
    """quantize would turn the NaN into finite garbage: the input stage's weight check stops it first."""
    with pytest.raises(NonFiniteStageError, match=rf"weight '{EXPERT}' \(\d+ NaN/Inf values\) of the input program"):
        PassManager("quantize(bits=8)", check_exact=check_exact).run(_nan_program(model, tokens),
                                                                      PassContext(example_args=(tokens,)))


def test_nan_outputs_name_the_first_stage_not_a_changed_result(model, tokens):
    with pytest.raises(NonFiniteStageError) as info:
        moejax.optimize(model, (tokens,), ["select-impl(impl=ragged)", _NaNExperts()])
    msg = str(info.value)
    assert "NaN/Inf outputs first appear after pass nan-experts (#2, after select-impl(impl=ragged))" in msg
    assert "differ" not in msg and "exact" not in msg
    assert isinstance(info.value, PassError)


def test_nan_weight_written_by_a_pass_is_named(model, tokens):
    with pytest.raises(NonFiniteStageError, match=rf"weight '{EXPERT}' .* of the program after pass nan-weight "
                                                  r"\(#1, the first pass\)"):
        moejax.optimize(model, (tokens,), [_NaNWeight()])


def test_traced_program_already_producing_nan_says_so():
    def fn(params, x):
        return params["w"] * jnp.log(x)

    with pytest.raises(NonFiniteStageError, match=r"the traced program already produces NaN/Inf before any pass "
                                                  r"ran: output .* on the example inputs"):
        moejax.optimize(fn, (jnp.asarray([-1.0, 1.0]),), [], params={"w": jnp.ones(2)})


# --------------------------------------------------------------------------
# Generation.
# --------------------------------------------------------------------------
def test_generate_with_nan_weights_raises_instead_of_returning_garbage(model):
    prompt = jnp.asarray([[48, 49, 50]], jnp.int32)
    with pytest.raises(NonFiniteError, match=r"NaN/Inf logits at position 0 \(the prompt \(prefill\)\)"):
        models.generate(with_nan(model, "norm/weight", (0,)), prompt, 4)


def test_cli_generate_with_nan_weights_exits_nonzero_with_one_line(model, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", lambda spec: with_nan(model, "norm/weight", (0,)))
    assert cli.main(["generate", "--prompt", "0123", "--max-new-tokens", "4", "--quiet"]) == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "NaN/Inf logits" in err[0] and out.out == ""


def test_cli_generate_with_corrupt_checkpoint_exits_nonzero_with_one_line(model, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    models.save_pretrained_hf(model, str(tmp_path))
    [path] = glob.glob(str(tmp_path / "*.safetensors"))
    tensors = load_file(path)
    name = next(k for k in sorted(tensors) if "experts.1." in k)
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, path)
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "0123", "--max-new-tokens", "4", "--quiet"]) == 2
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0] and name in err[0] and "\x00" not in out.out


def test_out_of_vocabulary_prompt_is_named_not_blamed_on_weights(model, monkeypatch, capsys):
    """Ids past the vocabulary embed as NaN (jnp.take fills): that is a prompt error, caught before running."""
    with pytest.raises(ValueError, match=r"prompt_ids hold id 105, but the model's vocabulary has 64 tokens"):
        models.generate(model, jnp.asarray([[104, 105]], jnp.int32), 2)
    monkeypatch.setattr(cli, "load_model", lambda spec: model)
    assert cli.main(["generate", "--prompt", "hi", "--max-new-tokens", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocabulary has only 64 tokens" in err[0]
