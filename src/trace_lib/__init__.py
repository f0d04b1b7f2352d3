"""trace: mechanistic interpretability under precision constraints.

Import as ``import trace_lib as trace`` (``trace`` is a standard-library module).

The public names below load on first use (PEP 562), so ``import trace_lib`` and the ``trace`` command's
argument checks start without importing torch; ``trace_lib._env`` (offline mode, quiet start-up) still runs
first, before any library that reads its settings.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import trace_lib._env  # noqa: F401  (offline mode, quiet start-up; must run first)

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "Audit": "trace_lib.audit", "AuditResult": "trace_lib.audit",
    "HookConfig": "trace_lib.capture.hooks", "HookManager": "trace_lib.capture.hooks",
    "TraceError": "trace_lib.errors",
    "CircuitTracer": "trace_lib.fingerprint", "SafetyFingerprint": "trace_lib.fingerprint",
    "Loaded": "trace_lib.models", "load_model": "trace_lib.models",
    "QuantizationConfig": "trace_lib.quant.config", "QuantizationType": "trace_lib.quant.config",
    "quantize": "trace_lib.quant.apply",
    "OptimizationAuditor": "trace_lib.sweep", "SweepResult": "trace_lib.sweep",
    "ModelTracer": "trace_lib.tracer", "ModelTracerConfig": "trace_lib.tracer",
    "RedTeam": "trace_lib.redteam", "RedTeamResult": "trace_lib.redteam",
    "SAE": "trace_lib.sae", "SAEConfig": "trace_lib.sae", "load_sae": "trace_lib.sae", "save_sae": "trace_lib.sae",
    "CompareResult": "trace_lib.compare", "compare_outputs": "trace_lib.compare",
}

__all__ = sorted([*_PUBLIC, "__version__"])

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from trace_lib.audit import Audit, AuditResult  # noqa: F401
    from trace_lib.capture.hooks import HookConfig, HookManager  # noqa: F401
    from trace_lib.compare import CompareResult, compare_outputs  # noqa: F401
    from trace_lib.errors import TraceError  # noqa: F401
    from trace_lib.fingerprint import CircuitTracer, SafetyFingerprint  # noqa: F401
    from trace_lib.models import Loaded, load_model  # noqa: F401
    from trace_lib.quant.apply import quantize  # noqa: F401
    from trace_lib.quant.config import QuantizationConfig, QuantizationType  # noqa: F401
    from trace_lib.redteam import RedTeam, RedTeamResult  # noqa: F401
    from trace_lib.sae import SAE, SAEConfig, load_sae, save_sae  # noqa: F401
    from trace_lib.sweep import OptimizationAuditor, SweepResult  # noqa: F401
    from trace_lib.tracer import ModelTracer, ModelTracerConfig  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'trace_lib' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
