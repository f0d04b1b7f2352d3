"""llama.cpp's GGUF block formats (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1) via gguf-py's reference quantizer.

``gguf.quants.quantize`` and ``dequantize`` are the numpy ports of ggml's reference code and are
bit-exact with it. Each Linear weight [out, in] is quantized row by row in blocks of 32 consecutive
input-dimension values (as ggml stores rows), then de-quantized back to float: the variant computes with
exactly the weights a GGUF file of that type holds. (llama.cpp's CPU matmul additionally rounds the
activations to Q8 blocks; combine with ``-a8`` to approximate that.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from trace_lib.errors import QuantizationError
from trace_lib.quant.config import GGUF_TYPES, QuantizationConfig
from trace_lib.quant.linears import check_group_size

GGUF_BLOCK = 32


def gguf_roundtrip(weight: torch.Tensor, type_name: str) -> tuple[torch.Tensor, np.ndarray]:
    """Quantize a [rows, cols] weight to a GGUF block type and back; returns (de-quantized, raw bytes)."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[type_name]
    w = weight.detach().to(torch.float32).cpu().numpy()
    if w.shape[-1] % GGUF_BLOCK:
        raise QuantizationError(f"GGUF {type_name} needs rows that are a multiple of {GGUF_BLOCK}, not {w.shape[-1]}")
    raw = quants.quantize(w, qtype)
    deq = quants.dequantize(raw, qtype).reshape(w.shape)
    return torch.from_numpy(np.ascontiguousarray(deq)), raw


def apply_gguf(model: nn.Module, config: QuantizationConfig, linears: list[tuple[str, nn.Linear]]) -> dict:
    import gguf

    type_name = GGUF_TYPES[config.type]
    check_group_size(linears, GGUF_BLOCK, f"{config.name} (GGUF blocks hold {GGUF_BLOCK} weights)")
    for _, m in linears:
        deq, _ = gguf_roundtrip(m.weight, type_name)
        m.weight = nn.Parameter(deq.to(device=m.weight.device, dtype=m.weight.dtype), requires_grad=False)
    version = getattr(gguf, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v

        version = _v("gguf")
    return {"library": f"gguf-py {version}", "path": f"weights round-tripped through GGUF {type_name}"}
