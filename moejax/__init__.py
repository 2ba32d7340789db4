"""moejax: a compiler-pass framework for Mixture-of-Experts inference in JAX.

Public API::

    program = moejax.trace(model, tokens)            # a Program: jaxpr + weights
    opt = moejax.optimize(model, (tokens,), "...,select-impl")
    opt(tokens); opt.stages; opt.report()
"""
from moejax import blocked_ffn, dialect, native_ffn  # these register the fast CPU expert implementations
from moejax import tokamax_ffn  # noqa: F401  registers impl="tokamax" when tokamax is installed
from moejax.dialect import Routing
from moejax.inspection import diff_programs, moe_graph_dot
from moejax.lowering import inline_dialect
from moejax.optimize import OptimizedModel, optimize
from moejax import weight_formats
from moejax.analysis import AnalysisStore
from moejax.numerics import NonFiniteError
from moejax.pipeline import (Pass, PassContext, PassError, PassManager, Stage, Tolerance, parse_pipeline,
                             pipeline_to_str, register_pass, registered_passes)
from moejax.program import InputSignatureError, Program, trace
from moejax.stats import program_stats

__version__ = "0.1.0"

__all__ = [
    "dialect", "Routing", "trace", "Program", "InputSignatureError", "optimize", "OptimizedModel", "Pass",
    "PassContext", "PassError", "PassManager", "Stage", "Tolerance", "NonFiniteError", "AnalysisStore",
    "weight_formats", "parse_pipeline", "pipeline_to_str", "register_pass", "registered_passes",
    "inline_dialect", "diff_programs", "moe_graph_dot", "program_stats",
]
