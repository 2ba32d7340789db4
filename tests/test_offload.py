"""Expert offloading is exact: every budget, policy, tier and prefetch setting decodes the same bits."""
import numpy as np
import pytest

from moejax import offload
from moejax.passes.offload import resident_bytes
from offload_util import STEPS, _decode, _model, _optimize


@pytest.fixture(scope="module")
def unrolled():
    return _model()


@pytest.fixture(scope="module")
def reference(unrolled):
    """Decode logits of the program run as parts with every expert resident (no reads, no prefetch)."""
    opt = _optimize(unrolled, "select-impl,offload(resident=1.0,prefetch=false)", check_exact=False)
    plain = _decode(_optimize(unrolled, "select-impl", check_exact=False), unrolled)
    logits = _decode(opt, unrolled)
    # cutting the program into parts moves outputs by at most the pass's declared tolerance...
    tol = type(opt.passes[-1]).tolerance
    assert np.max(np.abs(logits - plain)) <= tol.atol + tol.rtol * np.max(np.abs(plain))
    return logits


# ...and offloading itself (budget, policy, tier, prefetch) changes no bit.
@pytest.mark.parametrize("options", [
    "resident=0.25", "resident=0.25,policy=lfu,tier=host", "resident=0.125,policy=next-use,prefetch_k=3",
    "resident=0,prefetch=false"])
def test_offload_is_bit_exact(unrolled, reference, options):
    checked = options == "resident=0.25"  # the pass manager's own check (all signatures) once; it is slow
    opt = _optimize(unrolled, f"select-impl,offload({options})", check_exact=checked)
    assert (opt.stages[-1].max_deviation is not None) == checked
    offload.reset_counters(opt)
    assert np.array_equal(_decode(opt, unrolled), reference)
    fields = offload.report_fields(opt)
    assert fields["tokens"] == STEPS  # the decode program's calls
    assert fields["resident_expert_bytes"] == resident_bytes(float(options.split(",")[0].split("=")[1]),
                                                             opt.program.metadata["offload"]["expert_bytes"])


