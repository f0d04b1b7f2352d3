"""JumpReLU's straight-through estimators (Rajamanoharan et al. 2024; SAELens ``saes/jumprelu_sae.py``).

``z = x * H(x - θ)`` has no gradient in θ almost everywhere. The estimators below give θ a pseudo-gradient
from a rectangle kernel of width ε (``jumprelu_bandwidth``): with ``K(u) = 1[|u| < 1/2]``,

* :class:`JumpReLU`: ``∂z/∂θ ≈ -(θ / ε) K((x - θ) / ε)``, ``∂z/∂x = H(x - θ)``;
* :class:`Step` (the L0 penalty ``H(x - θ)``): ``∂H/∂θ ≈ -(1 / ε) K((x - θ) / ε)``, no gradient in x.

Both sum θ's gradient over the batch dimension (θ is per latent). The model's inference-time encode
(:meth:`trace_lib.sae.SAE.activation`) is ``ReLU(pre) * (pre > θ)`` and needs none of this.
"""

from __future__ import annotations

from typing import Any

import torch


def rectangle(x: torch.Tensor) -> torch.Tensor:
    """The kernel ``K(u) = 1[-1/2 < u < 1/2]`` in ``x``'s dtype."""
    return ((x > -0.5) & (x < 0.5)).to(x)


class JumpReLU(torch.autograd.Function):
    """``x * (x > threshold)`` with a straight-through gradient for the threshold (SAELens ``JumpReLU``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold).to(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        x_grad = (x > threshold).to(grad) * grad
        t_grad = (-(threshold / bw) * rectangle((x - threshold) / bw) * grad).sum(dim=0)
        return x_grad, t_grad, None


class Step(torch.autograd.Function):
    """Heaviside ``x > threshold`` with a straight-through threshold gradient (SAELens ``Step``), for L0."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        t_grad = (-(1.0 / bw) * rectangle((x - threshold) / bw) * grad).sum(dim=0)
        return None, t_grad, None
