"""GPTQ and AWQ: calibrated 4-bit weight quantization (pending the choice of a CPU-capable library)."""

from __future__ import annotations

from torch import nn

from trace_lib.errors import QuantizationError
from trace_lib.quant.config import QuantizationConfig


def apply_calibrated(model: nn.Module, config: QuantizationConfig, linears: list[tuple[str, nn.Linear]],
                     reference) -> dict:
    raise QuantizationError(f"{config.name} needs a GPTQ/AWQ library that runs on this CPU; none is wired in yet")
