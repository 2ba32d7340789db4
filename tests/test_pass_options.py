"""Every option of every registered pass is documented (type, default, allowed, description), truthfully."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import pytest

import moejax
from moejax import dialect
from moejax.pass_options import (OptionDoc, docstring_options, first_sentence, format_pass_help, option_docs,
                                 render_default, render_type)
from moejax.pipeline import PassError, parse_pipeline

PASSES = moejax.registered_passes()

# Values for the options a pass cannot be built without: its required options, and one of a
# set of alternatives (gating needs exactly one of top_p/threshold/skip_ratio).
EXAMPLES: dict[str, dict[str, Any]] = {
    "prune": {"num_experts": 2},
    "merge": {"num_experts": 2},
    "gating": {"top_p": 0.6},
}


def _options(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.repr]


def _flat(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------
# Completeness: adding an undocumented option fails here.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_option_is_documented(name):
    cls = PASSES[name]
    docs = option_docs(cls)
    assert [d.name for d in docs] == _options(cls)
    for d in docs:
        assert isinstance(d, OptionDoc)
        assert d.type.strip(), f"{name}.{d.name}: no type"
        assert d.default.strip(), f"{name}.{d.name}: no default"
        assert d.allowed.strip(), f"{name}.{d.name}: declare it in {cls.__name__}.option_ranges"
        assert d.description.strip(), f"{name}.{d.name}: add it to the 'Options:' section of the docstring"


@pytest.mark.parametrize("name", sorted(PASSES))
def test_declarations_name_real_options(name):
    """No stale names: every declared range, requirement, override and docstring entry is an option."""
    cls = PASSES[name]
    options = set(_options(cls))
    declared = {
        "option_ranges": set(getattr(cls, "option_ranges", {})),
        "required_options": set(getattr(cls, "required_options", ())),
        "option_descriptions": set(getattr(cls, "option_descriptions", {})),
        "docstring Options:": set(docstring_options(cls.__doc__)),
    }
    for where, names in declared.items():
        assert names <= options, f"{name}: {where} names {sorted(names - options)}, not options of the pass"


@pytest.mark.parametrize("name", sorted(PASSES))
def test_required_options_render_required(name):
    cls = PASSES[name]
    required = set(getattr(cls, "required_options", ()))
    for d in option_docs(cls):
        assert d.required == (d.name in required)
        if d.required:
            assert d.default == "required" and "| None" not in d.type
    assert set(EXAMPLES.get(name, {})) >= required, f"{name}: give the required options an example in EXAMPLES"


def test_prune_and_merge_need_a_count_or_a_fraction():
    for name in ("prune", "merge"):
        docs = {d.name: d for d in option_docs(PASSES[name])}
        assert {"num_experts", "keep"} <= set(docs) and docs["keep"].allowed.startswith("number in (0, 1]")
        for spelling in (name, f"{name}(num_experts=4,keep=0.5)"):
            with pytest.raises(PassError, match="exactly one of num_experts=N .* or keep=FRACTION"):
                parse_pipeline(spelling)
        with pytest.raises(PassError, match="keep must be a fraction"):
            parse_pipeline(f"{name}(keep=1.5)")


# --------------------------------------------------------------------------
# The documented defaults are valid and read back as the real defaults.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PASSES))
def test_documented_defaults_are_valid(name):
    cls = PASSES[name]
    examples = EXAMPLES.get(name, {})
    base = cls(**examples)  # the defaults (plus the required values) pass __post_init__
    items = [f"{k}={render_default(v)}" for k, v in examples.items()]
    items += [f"{d.name}={d.default}" for d in option_docs(cls) if not d.required and d.name not in examples]
    (parsed,) = parse_pipeline(f"{name}({','.join(items)})")  # each default spelled as `moejax passes` shows it
    assert parsed.options() == base.options()


# --------------------------------------------------------------------------
# The allowed text agrees with what the passes accept.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("spec, ok", [
    ("quantize(bits=8)", True), ("quantize(bits=4)", True), ("quantize(bits=3)", True), ("quantize(bits=2)", True),
    ("quantize(bits=5)", False), ("quantize(bits=3.5)", False), ("quantize(bits=16)", False),
    ("quantize(bits=3.5,mixed=true)", True), ("quantize(bits=2,mixed=true)", True),
    ("quantize(bits=8,mixed=true)", True), ("quantize(bits=1.5,mixed=true)", False),
    ("quantize(bits=9,mixed=true)", False),
    ("quantize(group_size=2)", True), ("quantize(group_size=64)", True), ("quantize(group_size=none)", True),
    ("quantize(group_size=3)", False), ("quantize(group_size=0)", False), ("quantize(group_size=64.0)", False),
    ("quantize(symmetric=none)", True), ("quantize(symmetric=false)", True), ("quantize(symmetric=2)", False),
    ("gating(top_p=1.0)", True), ("gating(top_p=1.5)", False), ("gating(top_p=0)", False),
    ("gating(threshold=0)", True), ("gating(threshold=1)", False),
    ("gating(skip_ratio=1)", True), ("gating(skip_ratio=0)", False),
    ("gating", False), ("gating(top_p=0.5,threshold=0.2)", False),
    ("gating(top_p=0.5,max_k=1)", True), ("gating(top_p=0.5,max_k=0)", False),
    ("gating(skip_ratio=0.5,max_k=2)", False), ("gating(top_p=0.5,renormalize=1)", False),
    ("prune(num_experts=1)", True), ("prune(num_experts=0)", False), ("prune(num_experts=2.5)", False),
    ("prune(num_experts=2,exhaustive_limit=1)", True), ("prune(num_experts=2,exhaustive_limit=0)", False),
    ("merge(num_experts=1)", True), ("merge(num_experts=0)", False),
    ("profile(calibration_bytes=1)", True), ("profile(calibration_bytes=0)", False),
    ("profile(seq_len=1,batch=1)", True), ("profile(seq_len=0)", False), ("profile(batch=0)", False),
    ("offload(resident=0)", True), ("offload(resident=1)", True), ("offload(resident=64MB)", True),
    ("offload(resident=-0.5)", False), ("offload(prefetch_k=0,pin=0)", True),
    ("offload(prefetch_k=-1)", False), ("offload(pin=-1)", False),
    ("ep(overlap_chunks=1,replicate_hot=0,num_devices=1)", True), ("ep(overlap_chunks=0)", False),
    ("ep(replicate_hot=-1)", False), ("ep(num_devices=0)", False),
    ("ep(capacity_factor=0.5)", True), ("ep(capacity_factor=0)", False),
])
def test_numeric_ranges(spec, ok):
    if ok:
        parse_pipeline(spec)
    else:
        with pytest.raises(PassError):
            parse_pipeline(spec)


def _choices() -> list[tuple[str, str, tuple[str, ...]]]:
    from moejax.expert_cache import POLICIES
    from moejax.expert_store import TIERS
    from moejax.passes import merge, prune, select_impl
    from moejax.sharding import expert_parallel as ep

    return [("select-impl", "layout", select_impl.LAYOUTS), ("prune", "method", prune.PRUNE_METHODS),
            ("merge", "similarity", merge.SIMILARITIES), ("offload", "policy", POLICIES),
            ("offload", "tier", (*TIERS, "auto")), ("ep", "placement", ep.PLACEMENTS),
            ("ep", "layout", ep.LAYOUTS), ("ep", "exchange", ep.EXCHANGES)]


@pytest.mark.parametrize("name, option, values", _choices())
def test_listed_choices_match_the_accepted_ones(name, option, values):
    """Every value the pass accepts is listed in its allowed text; others are rejected."""
    (doc,) = [d for d in option_docs(PASSES[name]) if d.name == option]
    extra = ",".join(f"{k}={v}" for k, v in EXAMPLES.get(name, {}).items())
    for value in values:
        assert value in doc.allowed, f"{name}.{option}: {value!r} is accepted but not listed in {doc.allowed!r}"
        parse_pipeline(f"{name}({extra + ',' if extra else ''}{option}={value})")
    with pytest.raises(PassError):
        parse_pipeline(f"{name}({extra + ',' if extra else ''}{option}=bogus)")


def test_select_impl_lists_every_registered_implementation():
    (doc,) = [d for d in option_docs(PASSES["select-impl"]) if d.name == "impl"]
    for impl in ("auto", *dialect.ffn_impls()):
        assert impl in doc.allowed


# --------------------------------------------------------------------------
# The printed block.
# --------------------------------------------------------------------------
def test_quantize_help_shows_options_with_ranges():
    text = format_pass_help(PASSES["quantize"])
    lines = text.splitlines()
    assert lines[0] == "quantize  (lossy)"
    assert lines[1].strip().startswith("Weight-only quantization")
    flat = _flat(text)
    assert "bits float default 8 allowed: 8, 4, 3 or 2 (with mixed=true: a budget in [2, 8])" in flat
    assert "group_size int | None default none allowed: even integer >= 2" in flat
    assert "storage width 8, 4, 3 or 2" in flat


@pytest.mark.parametrize("name", sorted(PASSES))
def test_help_block_is_readable(name):
    cls = PASSES[name]
    text = format_pass_help(cls)
    assert all(len(line) <= 110 for line in text.splitlines()), text
    flat = _flat(text)
    for d in option_docs(cls):
        assert f"{d.name} {d.type} default {d.default} allowed: {_flat(d.allowed)}" in flat
        assert _flat(d.description) in flat
    if cls.tolerance is not None and moejax.pipeline.exactness_label(cls) != "lossy":
        assert "not bit-exact" in text


# --------------------------------------------------------------------------
# The helpers.
# --------------------------------------------------------------------------
def test_docstring_parsing_and_first_sentence():
    doc = """Summary.

    Options (pick one):
      alpha: the first option (e.g. 0.5, see
        :func:`moejax.x`). More text.
      beta: ``true`` keeps it.
    Notes: not an option.
    """
    opts = docstring_options(doc)
    assert set(opts) == {"alpha", "beta"}
    assert first_sentence(opts["alpha"]) == "the first option (e.g. 0.5, see moejax.x)"
    assert first_sentence(opts["beta"]) == "true keeps it"
    assert first_sentence("a range, e.g. 3.5 bits. Second") == "a range, e.g. 3.5 bits"


def test_render_type_and_default():
    assert render_type("int | None") == "int | None"
    assert render_type("Optional[int]") == "int | None"
    assert render_type("typing.Union[float, str]") == "float | str"
    assert render_type(int) == "int"
    assert render_type(Optional[float]) == "float | None"
    assert render_type(Union[int, str]) == "int | str"
    assert render_type(float | None) == "float | None"
    assert [render_default(v) for v in (True, False, None, 8, 0.25, "auto")] == [
        "true", "false", "none", "8", "0.25", "auto"]
    assert render_default("none") == "'none'" and render_default("8") == "'8'"  # would read back otherwise
