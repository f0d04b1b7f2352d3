"""Building quantized variants of a reference model.

Config names (:mod:`trace_lib.quant.config`) import without torch, so the CLI checks them before any model
loads; :func:`quantize` and :func:`storage_report` load the backends on first use, and
:func:`write_mixed_gguf` / :func:`llama_quantize_args` (:mod:`trace_lib.quant.gguf_write`) write a GGUF config's
real file and the llama.cpp command that makes it.
"""

from typing import Any

from trace_lib.quant.config import QuantizationConfig, QuantizationType, parse_config, valid_names

__all__ = ["QuantizationConfig", "QuantizationType", "llama_quantize_args", "parse_config", "quantize",
           "storage_report", "valid_names", "write_mixed_gguf"]


def __getattr__(name: str) -> Any:
    if name in ("quantize", "storage_report"):
        from trace_lib.quant import apply

        return getattr(apply, name)
    if name in ("write_mixed_gguf", "llama_quantize_args"):
        from trace_lib.quant import gguf_write

        return getattr(gguf_write, name)
    raise AttributeError(f"module 'trace_lib.quant' has no attribute {name!r}")
