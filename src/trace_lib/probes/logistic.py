"""L2-regularised logistic regression by Newton's method, in float64 (deterministic: no random start, no
stochastic step).

With standardised features ``z_i`` and labels ``y_i in {0, 1}`` it minimises::

    J(w, b) = sum_i [log(1 + exp(s_i)) - y_i s_i] + (l2 / 2) ||w||^2,    s_i = <z_i, w> + b

(the bias is not penalised): scikit-learn's ``LogisticRegression(C=1 / l2)`` objective. ``J`` is strictly convex
in ``w``; Newton steps with step halving converge in a few iterations. Each step solves a ``(d + 1)``-square
system, so the cost is ``O(n d^2 + d^3)`` per iteration: fine for residual widths up to a few thousand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LogisticFit:
    """The fitted weights (standardised units), bias, iterations used and final gradient max-norm."""

    weight: torch.Tensor
    bias: float
    iterations: int
    grad_norm: float


def _objective(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: float, l2: float) -> float:
    s = z @ w + b
    return float((F.softplus(s) - y * s).sum() + 0.5 * l2 * (w @ w))


def fit_logistic(z: torch.Tensor, y: torch.Tensor, l2: float = 1.0, max_iter: int = 100,
                 tol: float = 1e-9) -> LogisticFit:
    """Minimise ``J`` (module docstring) over ``z`` ``[n, d]`` and ``y`` ``[n]`` (0/1)."""
    z, y = z.double(), y.double()
    n, d = z.shape
    w, b = torch.zeros(d, dtype=torch.float64), 0.0
    eye = torch.eye(d + 1, dtype=torch.float64) * l2
    eye[d, d] = 1e-12  # the unpenalised bias
    za = torch.cat([z, torch.ones(n, 1, dtype=torch.float64)], 1)
    iterations, g_norm = 0, float("inf")
    for _ in range(max_iter):
        iterations += 1
        p = torch.sigmoid(z @ w + b)
        g = za.T @ (p - y)
        g[:d] += l2 * w
        g_norm = float(g.abs().max())
        if g_norm < tol:
            break
        hess = (za * (p * (1 - p))[:, None]).T @ za + eye
        step = torch.linalg.solve(hess, g)
        j0, t = _objective(z, y, w, b, l2), 1.0
        while t > 1e-8:  # step halving: Newton's full step can overshoot far from the optimum
            w_new, b_new = w - t * step[:d], b - t * float(step[d])
            if _objective(z, y, w_new, b_new, l2) <= j0:
                break
            t /= 2
        w, b = w_new, b_new
    return LogisticFit(w, b, iterations, g_norm)
