"""Metrics: feature recovery across precision (CPFR, drift, smearing, muting), directions, output statistics."""

from trace_lib.metrics.cpfr import CPFR
from trace_lib.metrics.directions import compare_directions, diff_in_means
from trace_lib.metrics.drift import FeatureDrift
from trace_lib.metrics.muting import ActivationMuting
from trace_lib.metrics.outputs import OutputComparison, OutputStats, compare_logits
from trace_lib.metrics.smearing import FeatureSmearing

__all__ = ["CPFR", "ActivationMuting", "FeatureDrift", "FeatureSmearing", "OutputComparison", "OutputStats",
           "compare_directions", "compare_logits", "diff_in_means"]
