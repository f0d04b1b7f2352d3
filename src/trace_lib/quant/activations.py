"""Fake-quantized activations: the inputs of every quantized Linear rounded to A bits.

Uses torchao's QAT fake quantizer (``IntxFakeQuantizer`` with ``IntxFakeQuantizeConfig(torch.int{A},
"per_token", is_symmetric=False)``): for each token's input vector x,

    scale = (max(x) - min(x)) / (2^A - 1),  zero = qmin - round(min(x) / scale),
    x_q = (clamp(round(x / scale) + zero, qmin, qmax) - zero) * scale,

with [qmin, qmax] = [-2^(A-1), 2^(A-1) - 1]. This is the dynamic per-token activation quantization of
W8A8 / W4A8 schemes, simulated in float so it combines with any weight type. The pre-hooks stay on the
variant's model and are listed by :func:`trace_lib.capture.registry.installed_hooks` (kind ``fake-quant``).
"""

from __future__ import annotations

import torch
from torch import nn

from trace_lib.capture.registry import register_hook


def make_fake_quantizer(bits: int):
    from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

    return IntxFakeQuantizer(IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"), "per_token", is_symmetric=False))


def add_activation_fake_quant(linears: list[tuple[str, nn.Linear]], bits: int) -> dict:
    """Register a forward pre-hook on each Linear that fake-quantizes its input to ``bits``."""
    fq = make_fake_quantizer(bits)

    def pre_hook(module, args):
        x = args[0]
        return (fq(x.float()).to(x.dtype), *args[1:])

    for name, m in linears:
        register_hook(m, pre_hook, hook_name=name, kind="fake-quant", owner="add_activation_fake_quant",
                      permanent=True, pre=True)
    return {"activations": f"{bits}-bit per-token asymmetric fake quantization (torchao IntxFakeQuantizer) "
                           f"at the input of {len(linears)} Linear layers"}
