"""FP16 and BF16: plain casts of the whole model (PyTorch's own dtype conversion)."""

from __future__ import annotations

import torch
from torch import nn

from trace_lib.quant.config import QuantizationConfig, QuantizationType

CAST_DTYPES = {QuantizationType.FP32: torch.float32, QuantizationType.FP16: torch.float16,
               QuantizationType.BF16: torch.bfloat16}


def apply_cast(model: nn.Module, config: QuantizationConfig) -> dict:
    dtype = CAST_DTYPES[config.type]
    model.to(dtype)
    return {"library": f"torch {torch.__version__}", "path": f"cast to {str(dtype).replace('torch.', '')}"}
