"""trace: mechanistic interpretability under precision constraints.

Import as ``import trace_lib as trace`` (``trace`` is a standard-library module).
"""

from __future__ import annotations

import trace_lib._env  # noqa: F401  (offline mode, quiet start-up; must run first)

__version__ = "0.1.0"

from trace_lib.audit import Audit, AuditResult
from trace_lib.capture.hooks import HookConfig, HookManager
from trace_lib.errors import TraceError
from trace_lib.fingerprint import CircuitTracer, SafetyFingerprint
from trace_lib.models import Loaded, load_model
from trace_lib.quant import QuantizationConfig, QuantizationType, quantize
from trace_lib.sweep import OptimizationAuditor, SweepResult

__all__ = ["Audit", "AuditResult", "CircuitTracer", "HookConfig", "HookManager", "Loaded", "OptimizationAuditor", "QuantizationConfig", "QuantizationType",
           "SafetyFingerprint", "SweepResult", "TraceError", "__version__", "load_model", "quantize"]
