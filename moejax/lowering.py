"""The final lowering: inline every remaining ``moe_*`` op into plain JAX."""
from __future__ import annotations

from moejax import dialect, rewrite
from moejax.program import Program

__all__ = ["inline_dialect"]


def inline_dialect(program: Program) -> Program:
    """A program without dialect ops: each op is replaced by its selected implementation.

    The result is an ordinary jaxpr every JAX transformation understands. A
    program that runs through its own runtime (``delivers_itself``, e.g. an
    offloaded program, whose parts compile the ops' implementations) is returned as is.
    """
    if getattr(program, "delivers_itself", False):
        return program
    # Memoised on the program: the pipeline's checks, every stage's evaluation and the delivered
    # model then run one Program object, so each signature compiles once per stage.
    if "_inlined" not in program.__dict__:
        rules = {p.name: rewrite.inline_dialect_rule for p in dialect.DIALECT_PRIMITIVES}
        program.__dict__["_inlined"] = program.rewrite(rules)
    return program.__dict__["_inlined"]
