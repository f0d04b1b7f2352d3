"""Where a variant's damage enters: activation patching, attribution patching and weight-error attribution.

:func:`localize` runs everything on a reference and a variant; the pieces work on token-level inputs
(:class:`MetricBatch`) for any two models that share a tokenizer and a block structure. Definitions and
formulas: ``docs/localize.md`` and each module's docstring.
"""

from trace_lib.attribution.atp import AtPResult, attribution_patch, false_negative_rate, spearman
from trace_lib.attribution.components import Component
from trace_lib.attribution.decompose import Decomposition, decompose
from trace_lib.attribution.inputs import Direction, fit_direction, make_batches, reference_refusals
from trace_lib.attribution.localize import LocalizeResult, localize
from trace_lib.attribution.metric import (
           Gap,
           Metric,
           MetricBatch,
           build_batch,
           gap_interval,
           metric_values,
           pack_batch,
)
from trace_lib.attribution.patching import PatchResult, PatchRun, activation_patch
from trace_lib.attribution.weights import WeightResult, differing_linears, first_order, weight_attribution

__all__ = ["AtPResult", "Component", "Decomposition", "Direction", "Gap", "LocalizeResult", "Metric",
           "MetricBatch", "PatchResult", "PatchRun", "WeightResult", "activation_patch", "attribution_patch",
           "build_batch", "decompose", "differing_linears", "false_negative_rate", "first_order",
           "fit_direction", "gap_interval", "localize", "make_batches", "metric_values", "pack_batch", "reference_refusals",
           "spearman", "weight_attribution"]
