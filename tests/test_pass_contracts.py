"""Pass contracts the pass manager enforces: exactness (bit-exact, two batches, inlining),
``provides``, signatures, ``check``/``ensures`` errors, built-in pass loading and labels."""
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import cli, dialect, lowering, models, pipeline
from moejax.pipeline import PassContext, PassError, PassManager, Tolerance, check_batches, exactness_label, is_exact
from moejax.sharding import ExpertParallel


@pytest.fixture(scope="module")
def model():
    # One layer form is enough here: these tests are about the pass manager, not the model.
    return models.MoEDecoder(models.tiny_mixtral(), rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------
# Test passes.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _ScaleExperts(moejax.Pass):
    """Claims exactness but scales every expert output by (1 + 1e-6): a tiny, real change."""

    name: ClassVar[str] = "scale-experts"

    def run(self, program, ctx):
        return program.rewrite({dialect.expert_ffn_p.name: lambda rc: rc.bind() * (1 + 1e-6)})


@dataclasses.dataclass(frozen=True)
class _ScaleExpertsTolerated(_ScaleExperts):
    name: ClassVar[str] = "scale-experts-tolerated"
    tolerance: ClassVar[Tolerance] = Tolerance(rtol=1e-4, atol=0.0, reason="test: a declared rescaling")


@dataclasses.dataclass(frozen=True)
class _ExampleOnly(moejax.Pass):
    """Exact on the example tokens only: any other batch gets +1 on every output."""

    name: ClassVar[str] = "example-only"

    def run(self, program, ctx):
        example = jnp.asarray(ctx.example_args[0])
        f = program.as_function()

        def fn(params, tokens):
            outs = f(params, tokens)
            same = jnp.all(tokens == example)
            return jax.tree_util.tree_unflatten(program.out_tree, [jnp.where(same, o, o + 1) for o in outs])

        return moejax.trace(fn, example, params=program.weight_leaves)


@dataclasses.dataclass(frozen=True)
class _KeyErrorCheck(moejax.Pass):
    name: ClassVar[str] = "keyerror-check"

    def check(self, program, ctx):
        _ = program.metadata["no_such_key"]

    def run(self, program, ctx):  # pragma: no cover - never reached
        return program


@dataclasses.dataclass(frozen=True)
class _FailingEnsures(moejax.Pass):
    name: ClassVar[str] = "failing-ensures"

    def run(self, program, ctx):
        return program

    def ensures(self, before, after, ctx):
        raise ValueError("promise broken")


@dataclasses.dataclass(frozen=True)
class _DropsProvides(moejax.Pass):
    name: ClassVar[str] = "drops-provides"
    provides: ClassVar[tuple[str, ...]] = ("my_analysis",)

    def run(self, program, ctx):
        return program.replace(metadata={**program.metadata, "other_key": 1})


@dataclasses.dataclass(frozen=True)
class _ShortensInputs(moejax.Pass):
    """A lossy pass that re-traces the model for shorter sequences (changes the input signature)."""

    name: ClassVar[str] = "shortens-inputs"
    exact: ClassVar[bool] = False
    model: object = dataclasses.field(default=None, repr=False, compare=False)

    def run(self, program, ctx):
        return moejax.trace(self.model, jnp.asarray(ctx.example_args[0])[:, :4])


@dataclasses.dataclass(frozen=True)
class _ShortensInputsDeclared(_ShortensInputs):
    name: ClassVar[str] = "shortens-inputs-declared"
    changes_signature: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class _CastsOutputs(moejax.Pass):
    """A lossy pass that returns bfloat16 logits (changes the output signature)."""

    name: ClassVar[str] = "casts-outputs"
    exact: ClassVar[bool] = False

    def run(self, program, ctx):
        f = program.as_function()

        def fn(params, tokens):
            return jax.tree_util.tree_unflatten(program.out_tree,
                                                [o.astype(jnp.bfloat16) for o in f(params, tokens)])

        return moejax.trace(fn, jnp.asarray(ctx.example_args[0]), params=program.weight_leaves)


# --------------------------------------------------------------------------
# Exactness.
# --------------------------------------------------------------------------
def test_exact_pass_scaling_expert_outputs_by_1e6_is_caught(model, tokens):
    with pytest.raises(PassError, match=r"exactness check of pass scale-experts: outputs differ by up to .*"
                                        r"not bit-equal.*\(pass scale-experts \(#2, after select-impl\(impl=ragged\)\)\)"):
        moejax.optimize(model, (tokens,), ["select-impl(impl=ragged)", _ScaleExperts()])


def test_declared_tolerance_is_honoured_and_needs_a_reason(model, tokens):
    opt = moejax.optimize(model, (tokens,), [_ScaleExpertsTolerated()])
    assert 0.0 < opt.stages[1].max_deviation < 1e-4
    with pytest.raises(ValueError, match="Tolerance needs a reason"):
        Tolerance(1e-6, 0.0, " ")


def test_exactness_is_checked_on_a_second_derived_batch(model, tokens):
    with pytest.raises(PassError, match=r"exactness check of pass example-only: .* on a batch derived from the example"):
        moejax.optimize(model, (tokens,), [_ExampleOnly()])


def test_derived_batch_permutes_tokens_and_keeps_cache_and_index(model, tokens):
    cache = model.init_cache(2, 9)
    program = moejax.trace(model, tokens[:, :1], cache=cache, cache_index=jnp.int32(7))
    ctx = PassContext(example_args=(tokens[:, :1],), example_kwargs={"cache": cache, "cache_index": jnp.int32(7)})
    (_, first), (_, (args, kwargs)) = check_batches(program, ctx)
    assert first[0][0] is ctx.example_args[0]
    assert not np.array_equal(args[0], tokens[:, :1])
    assert sorted(np.asarray(args[0]).ravel()) == sorted(np.asarray(tokens[:, :1]).ravel())
    assert kwargs["cache_index"] is ctx.example_kwargs["cache_index"]
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(kwargs["cache"]), jax.tree_util.tree_leaves(cache)))


def test_keyword_only_example_is_checked(model, tokens):
    ctx = PassContext(example_kwargs={"tokens": tokens})
    batches = check_batches(moejax.trace(model, tokens=tokens), ctx)
    assert len(batches) == 2 and not np.array_equal(batches[1][1][1]["tokens"], tokens)
    with pytest.raises(PassError, match=r"exactness check of pass scale-experts"):
        moejax.optimize(model, (), [_ScaleExperts()], example_kwargs={"tokens": tokens})


def test_existing_exact_passes_are_checked_on_two_batches(model, tokens):
    cache = model.init_cache(2, 9)
    opt = moejax.optimize(model, (tokens,), "profile,select-impl",
                          decode_example=((tokens[:, :1],), {"cache": cache, "cache_index": jnp.int32(7)}))
    for stages in opt.entries:
        assert [s.checked_batches for s in stages] == [2, 2, 2]
        assert stages[1].max_deviation == 0.0  # profile only adds metadata
        assert opt.delivered(opt.signatures[opt.entries.index(stages)]) is lowering.inline_dialect(stages[-1].program)


def test_wrong_inlining_of_the_delivered_program_is_caught(model, tokens, monkeypatch):
    real = lowering.inline_dialect

    def scaled(program):
        return real(program.rewrite({dialect.expert_ffn_p.name: lambda rc: rc.bind() * (1 + 1e-6)}))

    monkeypatch.setattr(lowering, "inline_dialect", scaled)
    with pytest.raises(PassError, match=r"the delivered \(inlined\) program differs from the last stage 'input'"):
        moejax.optimize(model, (tokens,), [])


def test_missing_examples_warn_instead_of_skipping_silently(model, tokens):
    with pytest.warns(UserWarning, match="exactness and NaN/Inf output checks skipped"):
        PassManager([_ScaleExperts()]).run(moejax.trace(model, tokens), PassContext())


# --------------------------------------------------------------------------
# Contracts: check/ensures errors, provides, signatures.
# --------------------------------------------------------------------------
def test_check_raising_keyerror_becomes_pass_error_naming_pass_and_predecessors(model, tokens):
    with pytest.raises(PassError, match=r"pass keyerror-check \(#3, after profile, select-impl\(impl=ragged\)\): "
                                        r"check\(\) raised KeyError: 'no_such_key'"):
        moejax.optimize(model, (tokens,), ["profile", "select-impl(impl=ragged)", _KeyErrorCheck()])


def test_pass_error_from_check_names_earlier_passes(model, tokens):
    with pytest.raises(PassError, match=r"pass select-impl\(impl=fast\) \(#2, after profile\): select-impl: "
                                        r"unknown impl 'fast'"):
        moejax.optimize(model, (tokens,), "profile,select-impl(impl=fast)")


def test_ensures_runs_after_the_pass(model, tokens):
    with pytest.raises(PassError, match=r"pass failing-ensures \(#1, the first pass\): ensures\(\) raised "
                                        r"ValueError: promise broken"):
        moejax.optimize(model, (tokens,), [_FailingEnsures()])


def test_dropped_provides_key_is_caught(model, tokens):
    with pytest.raises(PassError, match=r"drops-provides \(#1, the first pass\) declares provides=\('my_analysis',\) "
                                        r"but its program has no metadata 'my_analysis'"):
        moejax.optimize(model, (tokens,), [_DropsProvides()])


def test_lossy_pass_changing_the_input_signature_is_caught(model, tokens):
    with pytest.raises(PassError, match=r"shortens-inputs.* changed the program's input signature from "
                                        r"\(arg0: int32\[2,7\]\).* to \(arg0: int32\[2,4\]\)"):
        moejax.optimize(model, (tokens,), [_ShortensInputs(model=model)])


def test_declared_signature_change_is_allowed_and_stops_the_checks(model, tokens):
    with pytest.warns(UserWarning, match="changed the program's signature; later stages are not checked"):
        opt_stages = PassManager([_ShortensInputsDeclared(model=model)]).run(
            moejax.trace(model, tokens), PassContext(example_args=(tokens,)))
    assert opt_stages[-1].program.in_avals[0].shape == (2, 4) and opt_stages[-1].checked_batches == 0


def test_lossy_pass_changing_the_output_dtype_is_caught(model, tokens):
    with pytest.raises(PassError, match=r"casts-outputs.* changed the program's output signature from "
                                        r"float32\[2,7,64\] to bfloat16\[2,7,64\]"):
        moejax.optimize(model, (tokens,), [_CastsOutputs()])


# --------------------------------------------------------------------------
# Built-in pass loading and the `moejax passes` labels.
# --------------------------------------------------------------------------
def test_broken_pass_module_surfaces_its_import_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_kernels_mod.py").write_text("import moejax_missing_dependency_xyz  # noqa\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(pipeline, "BUILTIN_PASS_MODULES", pipeline.BUILTIN_PASS_MODULES + ("broken_kernels_mod",))
    with pytest.raises(ModuleNotFoundError, match="moejax_missing_dependency_xyz"):
        moejax.parse_pipeline("pallas")
    assert cli.main(["passes"]) == 70  # not a user error: the traceback, and a line saying it is a bug
    err = capsys.readouterr().err
    assert "ModuleNotFoundError" in err and "moejax_missing_dependency_xyz" in err and "bug in moejax" in err


def test_passes_lists_the_right_exactness_for_every_pass(capsys):
    assert cli.main(["passes"]) == 0
    lines = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines()
             if line and not line.startswith(" ")}
    assert lines["ep"] == "ep  (exact; lossy with capacity_factor)"
    assert lines["profile"] == "profile  (exact)"
    assert lines["select-impl"].startswith("select-impl  (exact")
    assert lines["pallas"].startswith("pallas  (exact")
    for name in ("gating", "quantize", "prune", "merge"):
        assert lines[name].startswith(f"{name}  (lossy"), lines[name]
    assert set(lines) == set(moejax.registered_passes())


def test_exactness_of_pass_objects_and_computed_declarations():
    assert is_exact(ExpertParallel()) and not is_exact(ExpertParallel(capacity_factor=2.0))

    @dataclasses.dataclass(frozen=True)
    class Computed(moejax.Pass):
        name: ClassVar[str] = "computed"
        lossy: bool = True

        @property
        def exact(self) -> bool:  # type: ignore[override]
            return not self.lossy

    assert exactness_label(Computed) == "lossy"
    assert not is_exact(Computed()) and is_exact(Computed(lossy=False))


def test_output_comparison_counts_outputs_and_fails_nan_within_a_tolerance():
    one, two = (np.ones(3, np.float32),), (np.ones(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(PassError, match="number of outputs changed from 1 to 2"):
        pipeline.check_outputs_close(one, two, "x")
    nan = (np.array([1.0, np.nan, 1.0], np.float32),)
    with pytest.raises(PassError, match="exceeds the declared tolerance"):
        pipeline.check_outputs_close(one, nan, "x", Tolerance(1e-3, 1e-3, "test"))
    with pytest.raises(PassError, match="not bit-equal"):
        pipeline.check_outputs_close((np.zeros(2, np.float32),), (-np.zeros(2, np.float32),), "x")
