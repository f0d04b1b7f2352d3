"""FP16 and BF16: plain casts of the whole model (PyTorch's own dtype conversion), and of single Linear weights
for the fp32/fp16/bf16 overrides of a mixed-precision config."""

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


def keeps_weight(weight: torch.Tensor, config: QuantizationConfig) -> bool:
    """Whether a cast override leaves ``weight`` as it is: the same dtype, or fp32 (which holds every fp16 and
    bf16 value exactly). Such a weight keeps its parameter, and any tie with it."""
    dtype = CAST_DTYPES[config.type]
    return weight.dtype == dtype or dtype == torch.float32


def round_weights(linears: list[tuple[str, nn.Linear]], config: QuantizationConfig) -> dict:
    """Store each Linear's weight at the cast's precision: rounded to fp16/bf16 and back to the model's dtype,
    so the layer computes as the rest of the model does (as llama.cpp computes an F16 tensor in F32)."""
    dtype = CAST_DTYPES[config.type]
    for _, m in linears:
        if not keeps_weight(m.weight, config):
            w = m.weight
            m.weight = nn.Parameter(w.detach().to(dtype).to(w.dtype), requires_grad=False)
    return {"library": f"torch {torch.__version__}", "path": f"weights kept at {str(dtype).replace('torch.', '')} precision"}
