"""A probe fitted on the reference's train split: :class:`FittedProbe` and :func:`fit_probe`.

Both methods read one vector per prompt: the residual at the hook at the **last prompt token**, the pooling
of the fingerprint's difference-in-means directions (``fingerprint.reduce_prompt_acts``).

* ``logistic``: features standardised with the train split's mean and standard deviation (population std; a
  constant feature keeps std 1), then :func:`~trace_lib.probes.logistic.fit_logistic` with ``l2 = L2 = 1``
  (scikit-learn's default ``C = 1``). Score: the logit ``<(x - mean) / std, w> + b``.
* ``diff_in_means``: ``d = mean(train safety) - mean(train baseline)`` (the fingerprint's direction, Arditi et
  al. 2024); score: the projection ``<x, d / ||d||>``.

The decision threshold is fixed on the train split: the midpoint of the two classes' mean train scores. A
prompt is called a safety prompt when its score exceeds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trace_lib.metrics.directions import diff_in_means, unit
from trace_lib.metrics.stats import auroc
from trace_lib.probes.logistic import fit_logistic

__all__ = ["L2", "METHODS", "FittedProbe", "fit_probe"]

L2 = 1.0
METHODS = ("logistic", "diff_in_means")


@dataclass(frozen=True)
class FittedProbe:
    """One probe of one category at one hook, fitted on the reference's train split (module docstring)."""

    category: str
    hook: str
    method: str  # "logistic" | "diff_in_means"
    weight: torch.Tensor  # [d] float64: standardised units (logistic) or the unit direction (diff_in_means)
    bias: float
    mean: torch.Tensor  # [d] train mean (zeros for diff_in_means)
    std: torch.Tensor  # [d] train std (ones for diff_in_means)
    threshold: float
    n_train_safety: int
    n_train_baseline: int
    train_auroc: float
    l2: float = L2

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of prompts ``x`` ``[n, d]`` (float64; larger = more like the safety prompts)."""
        return ((x.double().cpu() - self.mean) / self.std) @ self.weight + self.bias

    @property
    def raw_direction(self) -> torch.Tensor:
        """The direction in activation space the score reads: ``w / std`` (a ``[d]`` float64 vector)."""
        return self.weight / self.std


def fit_probe(x_safety: torch.Tensor, x_baseline: torch.Tensor, category: str, hook: str,
              method: str = "logistic", l2: float = L2) -> FittedProbe:
    """Fit a probe on train-split prompt vectors of the safety ``[n1, d]`` and baseline ``[n2, d]`` prompts."""
    pos, neg = x_safety.double().cpu(), x_baseline.double().cpu()
    d = pos.shape[1]
    if method == "logistic":
        x = torch.cat([pos, neg])
        mean, std = x.mean(0), x.std(0, unbiased=False)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
        fit = fit_logistic((x - mean) / std, y, l2=l2)
        weight, bias = fit.weight, fit.bias
    elif method == "diff_in_means":
        mean, std = torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
        weight, bias = unit(diff_in_means(pos, neg)).double(), 0.0
    else:
        raise ValueError(f"unknown probe method {method!r}; choose one of {METHODS}")
    probe = FittedProbe(category, hook, method, weight, bias, mean, std, 0.0, len(pos), len(neg), float("nan"), l2)
    sp, sn = probe.score(pos), probe.score(neg)
    threshold = 0.5 * (float(sp.mean()) + float(sn.mean()))
    return FittedProbe(category, hook, method, weight, bias, mean, std, threshold, len(pos), len(neg),
                       auroc(sp.numpy(), sn.numpy()), l2)
