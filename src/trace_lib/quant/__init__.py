"""Building quantized variants of a reference model."""

from trace_lib.quant.apply import quantize, storage_report
from trace_lib.quant.config import QuantizationConfig, QuantizationType, parse_config, valid_names

__all__ = ["QuantizationConfig", "QuantizationType", "parse_config", "quantize", "storage_report", "valid_names"]
