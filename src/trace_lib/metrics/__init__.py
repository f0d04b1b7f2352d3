"""Metrics: feature recovery across precision (CPFR, drift, smearing, muting), directions, output statistics."""

from trace_lib.metrics.directions import compare_directions, diff_in_means
from trace_lib.metrics.features import CPFR, ActivationMuting, FeatureDrift, FeatureSmearing
from trace_lib.metrics.outputs import OutputComparison, OutputStats, compare_logits

__all__ = ["CPFR", "ActivationMuting", "FeatureDrift", "FeatureSmearing", "OutputComparison", "OutputStats",
           "compare_directions", "compare_logits", "diff_in_means"]
