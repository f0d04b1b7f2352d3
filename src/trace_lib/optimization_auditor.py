"""The seed's import path: ``from trace_lib.optimization_auditor import QuantizationType, QuantizationConfig``."""

from trace_lib.quant.config import QuantizationConfig, QuantizationType
from trace_lib.sweep import LADDERS, OptimizationAuditor, SweepResult

__all__ = ["LADDERS", "OptimizationAuditor", "QuantizationConfig", "QuantizationType", "SweepResult"]
