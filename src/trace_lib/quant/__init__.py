"""Building quantized variants of a reference model.

Config names (:mod:`trace_lib.quant.config`) import without torch, so the CLI checks them before any model
loads; :func:`quantize` and :func:`storage_report` load the backends on first use.
"""

from typing import Any

from trace_lib.quant.config import QuantizationConfig, QuantizationType, parse_config, valid_names

__all__ = ["QuantizationConfig", "QuantizationType", "parse_config", "quantize", "storage_report", "valid_names"]


def __getattr__(name: str) -> Any:
    if name in ("quantize", "storage_report"):
        from trace_lib.quant import apply

        return getattr(apply, name)
    raise AttributeError(f"module 'trace_lib.quant' has no attribute {name!r}")
