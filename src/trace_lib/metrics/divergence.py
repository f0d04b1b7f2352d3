"""KL divergence of two categorical distributions: the one formula every KL in trace goes through.

``KL(p || q) = sum_v p_v (ln p_v - ln q_v)`` in nats, over the vocabulary axis ``dim``, with ``ln p`` and
``ln q`` from ``log_softmax`` of the logits. Bitwise-equal inputs give exactly 0. Nothing is clamped: rounding
can leave a KL a hair below 0, and callers that report a mean clamp each position at 0 themselves.

The dtype is a choice of each caller, so it is an argument: llama.cpp-style output statistics and the tracer
work in float64, the organism's answer KL in float32.
"""

from __future__ import annotations

import torch

__all__ = ["kl_divergence", "kl_from_log_probs"]


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor, dim: int = -1, reduction: str = "none"
                      ) -> torch.Tensor:
    """``KL(p || q)`` from normalised log-probabilities: one value per position (``reduction="none"``), or
    their total over every position (``"sum"``, summed over all terms at once)."""
    terms = log_p.exp() * (log_p - log_q)
    if reduction == "sum":
        return terms.sum()
    if reduction != "none":
        raise ValueError(f"reduction must be 'none' or 'sum', got {reduction!r}")
    return terms.sum(dim=dim)


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor, dim: int = -1, *, dtype: torch.dtype,
                  reduction: str = "none") -> torch.Tensor:
    """``KL(p || q)`` of the distributions ``softmax(logits_p)`` and ``softmax(logits_q)`` along ``dim``,
    computed in ``dtype`` (see :func:`kl_from_log_probs` for ``reduction``)."""
    log_p = torch.log_softmax(logits_p.to(dtype), dim)
    log_q = torch.log_softmax(logits_q.to(dtype), dim)
    return kl_from_log_probs(log_p, log_q, dim, reduction)
