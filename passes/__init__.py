"""Model-level passes (survey section 3). Importing this package registers them.

=============  ===========================================================
``profile``    routing profile on calibration data (analysis)
``select-impl`` expert-FFN implementation choice (exact)
``gating``     dynamic gating: top-p / threshold / skip (lossy)
``prune``      expert pruning by REAP, NAEE, frequency or mass; uniform or global budget (lossy)
``merge``      expert merging by clustering, optional least-squares refit (lossy)
``recalibrate-router`` router-only distillation from the source program (lossy)
``distill``    routers and kept experts distilled from the source program (lossy)
``quantize``   weight-only int8 / int4 / mixed-precision experts (lossy)
``offload``    experts in a slow tier, resident cache, prefetch (exact)
=============  ===========================================================
"""
from moejax.passes.distill import Distill
from moejax.passes.gating import DynamicGating
from moejax.passes.merge import MergeExperts
from moejax.passes.offload import Offload
from moejax.passes.profile import ProfileRouting
from moejax.passes.prune import PruneExperts
from moejax.passes.quantize import QuantizeExperts
from moejax.passes.recalibrate import RecalibrateRouter
from moejax.passes.select_impl import SelectImpl

__all__ = ["SelectImpl", "ProfileRouting", "DynamicGating", "PruneExperts", "MergeExperts", "QuantizeExperts",
           "Offload", "RecalibrateRouter", "Distill"]
