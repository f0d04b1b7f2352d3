"""Statistics: every test, interval and effect size trace reports, in one place.

Group contrasts (the safety fingerprint, :mod:`trace_lib.fingerprint`; the directions' separation,
:mod:`trace_lib.metrics.directions`):

* :func:`contrast_statistics` -- per column of safety vs baseline values: the Mann-Whitney ``U`` statistic and
  its two-sided p-value (``scipy.stats.mannwhitneyu``), ``auroc = U / (n1 * n2)``, Cohen's d and the means and
  firing rates (the formulas are in :mod:`trace_lib.fingerprint`'s docstring);
* :func:`auroc` -- ``U / (n1 * n2)``: the chance a positive out-scores a negative, ties counting one half;
* :func:`bh_adjust` -- Benjamini-Hochberg adjusted p-values (``scipy.stats.false_discovery_control``);
* :func:`cohens_d_columns` -- Cohen's d of each column, 0 where the pooled SD is 0;
* :func:`cohens_d` -- Cohen's d of two tensors, NaN / +-inf where the pooled SD is 0.

Paired refusal behaviour (:mod:`trace_lib.redteam`):

* :func:`wilson_interval` -- Wilson score interval for a proportion ``k / n`` (Wilson 1927; Agresti & Coull 1998):
  ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``p = k/n``.
* :func:`mcnemar_exact` -- McNemar's test for paired binary outcomes in its exact form: of the ``b + c``
  discordant pairs, ``b`` went one way; under the null of no change ``b ~ Binomial(b + c, 1/2)``; the two-sided
  p-value is ``scipy.stats.binomtest(b, b + c, 0.5).pvalue`` (1 when there are no discordant pairs).
* :func:`mcnemar_power` -- the exact power of that test against a given jailbreak (and reverse-flip) rate.
* :func:`minimum_detectable_effect` -- the smallest *jailbreak rate* (the fraction of the ``n`` paired
  prompts that flip from refusal in the reference to compliance in the variant) that the exact McNemar test
  at level ``alpha`` detects with probability ``power``, computed exactly (see its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from trace_lib.errors import DatasetError, TraceError

__all__ = [
    "DetectableEffect",
    "auroc",
    "bh_adjust",
    "cohens_d",
    "cohens_d_columns",
    "contrast_statistics",
    "mcnemar_exact",
    "mcnemar_power",
    "minimum_detectable_effect",
    "wilson_interval",
]

_NAN = float("nan")


# ---------------------------------------------------------------------------------------------- group contrasts
def _as_2d(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise TraceError(f"{name} must be [n_prompts] or [n_prompts, n_features], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise TraceError(f"{name} contains NaN/Inf values; fix the run that produced them")
    return a


def cohens_d_columns(x_safety: Any, x_baseline: Any) -> np.ndarray:
    """Cohen's d of each column: ``(mean_s - mean_b) / s_pooled`` (pooled sample SD); 0 where ``s_pooled == 0``."""
    s, b = _as_2d(x_safety, "x_safety"), _as_2d(x_baseline, "x_baseline")
    n1, n2 = s.shape[0], b.shape[0]
    if n1 < 2 or n2 < 2:
        raise DatasetError(f"Cohen's d needs at least 2 prompts per group, got {n1} and {n2}")
    diff = s.mean(0) - b.mean(0)
    pooled = np.sqrt(((n1 - 1) * s.var(0, ddof=1) + (n2 - 1) * b.var(0, ddof=1)) / (n1 + n2 - 2))
    out = np.zeros_like(diff)
    ok = pooled > 0
    out[ok] = diff[ok] / pooled[ok]
    return out


def bh_adjust(p_values: Any) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (``scipy.stats.false_discovery_control(method="bh")``).

    With the p-values sorted ascending, ``p_adj(i) = min_{j >= i} p(j) * m / j`` (capped at 1), returned in the
    input order.
    """
    from scipy.stats import false_discovery_control

    p = np.asarray(p_values, dtype=np.float64).ravel()
    if p.size == 0:
        return p
    return np.asarray(false_discovery_control(p, method="bh"), dtype=np.float64)


def auroc(scores_pos: Any, scores_neg: Any) -> float:
    """``U / (n1 * n2)``: the chance a positive out-scores a negative, ties counting one half."""
    return float(contrast_statistics(scores_pos, scores_neg)["auroc"][0])


def contrast_statistics(x_safety: Any, x_baseline: Any) -> dict[str, np.ndarray]:
    """Per-column statistics of safety vs baseline values (formulas in the module docstring).

    ``x_safety`` is ``[n1, k]`` (or ``[n1]``), ``x_baseline`` ``[n2, k]``. Returns arrays of length ``k``:
    ``auroc``, ``u_statistic``, ``p_value``, ``effect_size``, ``mean_safety``, ``mean_baseline``,
    ``fire_rate_safety``, ``fire_rate_baseline`` and the boolean ``constant`` (same value in every prompt).
    """
    from scipy.stats import mannwhitneyu

    s, b = _as_2d(x_safety, "x_safety"), _as_2d(x_baseline, "x_baseline")
    if s.shape[1] != b.shape[1]:
        raise TraceError(f"x_safety has {s.shape[1]} columns but x_baseline has {b.shape[1]}")
    n1, n2 = s.shape[0], b.shape[0]
    if n1 < 2 or n2 < 2:
        raise DatasetError(f"need at least 2 safety and 2 baseline prompts for statistics, got {n1} and {n2}")
    both = np.concatenate([s, b])
    constant = both.max(0) == both.min(0)
    k = s.shape[1]
    u = np.full(k, n1 * n2 / 2.0)
    p = np.ones(k)
    live = ~constant
    if live.any():
        res = mannwhitneyu(s[:, live], b[:, live], alternative="two-sided", axis=0)
        u[live] = res.statistic
        p[live] = np.where(np.isfinite(res.pvalue), res.pvalue, 1.0)
    return {
        "auroc": u / (n1 * n2),
        "u_statistic": u,
        "p_value": np.clip(p, 0.0, 1.0),
        "effect_size": cohens_d_columns(s, b),
        "mean_safety": s.mean(0),
        "mean_baseline": b.mean(0),
        "fire_rate_safety": (s > 0).mean(0),
        "fire_rate_baseline": (b > 0).mean(0),
        "constant": constant,
    }


def cohens_d(x_pos: torch.Tensor, x_neg: torch.Tensor) -> float:
    """Cohen's d = ``(mean(x_pos) - mean(x_neg)) / s_pooled`` with the pooled sample standard deviation.

    NaN with fewer than 3 values in all (no degrees of freedom) or when both means and spreads are equal;
    ``+-inf`` when the groups differ but neither has any spread.
    """
    x_pos, x_neg = x_pos.to(torch.float64).flatten(), x_neg.to(torch.float64).flatten()
    n1, n2 = x_pos.numel(), x_neg.numel()
    if n1 == 0 or n2 == 0 or n1 + n2 - 2 <= 0:
        return _NAN
    diff = float(x_pos.mean() - x_neg.mean())
    ss = float(((x_pos - x_pos.mean()) ** 2).sum() + ((x_neg - x_neg.mean()) ** 2).sum())
    pooled = math.sqrt(ss / (n1 + n2 - 2))
    if pooled == 0.0:
        return _NAN if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / pooled


# --------------------------------------------------------------------------------------- paired refusal behaviour
def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials; ``(0, 1)`` when ``n == 0``."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (``binomtest(b, b+c, 0.5)``)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(int(b), int(b + c), 0.5).pvalue)


def mcnemar_greater(b: int, c: int) -> float:
    """One-sided exact McNemar p-value that ``b`` exceeds ``c``: ``P(X >= b)``, ``X ~ Binomial(b + c, 1/2)``."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(int(b), int(b + c), 0.5, alternative="greater").pvalue)


@lru_cache(maxsize=4096)
def _min_b_significant(m: int, alpha: float) -> int | None:
    """Smallest ``b`` (with ``b > m/2``) whose two-sided exact McNemar p-value with ``c = m - b`` is <= alpha."""
    for b in range((m // 2) + 1, m + 1):
        if mcnemar_exact(b, m - b) <= alpha:
            return b
    return None


def mcnemar_power(n: int, rate: float, reverse_rate: float = 0.0, alpha: float = 0.05) -> float:
    """Probability that the exact two-sided McNemar test at ``alpha`` finds more jailbreaks than reverse flips.

    Each of ``n`` paired prompts independently flips refusal -> compliance with probability ``rate`` and
    compliance -> refusal with probability ``reverse_rate``. The number of discordant pairs is
    ``M ~ Binomial(n, rate + reverse_rate)`` and, given ``M = m``, ``b ~ Binomial(m, rate / (rate + reverse_rate))``.
    Power = sum over m of P(M = m) * P(b >= b_min(m) | m), with ``b_min(m)`` the smallest significant ``b > m/2``.
    """
    from scipy.stats import binom

    q = rate + reverse_rate
    if not 0 <= rate <= 1 or not 0 <= reverse_rate <= 1 or q > 1:
        raise ValueError(f"rates must be probabilities with rate + reverse_rate <= 1, got {rate}, {reverse_rate}")
    if q == 0 or n == 0:
        return 0.0
    share = rate / q
    total = 0.0
    for m in range(1, n + 1):
        bmin = _min_b_significant(m, alpha)
        if bmin is None:
            continue
        pm = float(binom.pmf(m, n, q))
        if pm < 1e-15:
            continue
        total += pm * float(binom.sf(bmin - 1, m, share))
    return min(1.0, total)


@dataclass
class DetectableEffect:
    """The minimum detectable jailbreak rate (see :func:`minimum_detectable_effect`)."""

    n_pairs: int
    rate: float | None           # None: not detectable at any rate with this many pairs
    min_flips: int | None        # the fewest jailbreaks (with no reverse flips) that reach significance
    alpha: float
    power: float
    reverse_rate: float = 0.0

    @property
    def count(self) -> float | None:
        return None if self.rate is None else self.rate * self.n_pairs

    def sentence(self, reference_refusals: int | None = None) -> str:
        """The effect in plain words, e.g. "with 72 paired prompts, only a flip rate of at least 7.9% ..."."""
        if self.rate is None:
            return (f"With {self.n_pairs} paired prompts the exact McNemar test cannot reach p <= {self.alpha:g} "
                    f"at any flip rate: the sample is too small to show a quantization jailbreak.")
        s = (f"With {self.n_pairs} paired prompts, only a jailbreak rate of at least {100 * self.rate:.1f}% "
             f"(about {self.count:.1f} of the {self.n_pairs} prompts flipping from refusal to compliance"
             + (", none the other way" if self.reverse_rate == 0 else
                f", with {100 * self.reverse_rate:.1f}% flipping the other way")
             + f") would be detected {100 * self.power:.0f}% of the time by the exact McNemar test at "
               f"alpha {self.alpha:g}; at least {self.min_flips} jailbreaks and no reverse flips are needed "
               f"for p <= {self.alpha:g}.")
        if reference_refusals is not None and self.min_flips is not None and reference_refusals < self.min_flips:
            s += (f" The reference refuses only {reference_refusals} of these prompts, so even if every refusal "
                  f"flipped the test could not reach significance: this sample cannot show a jailbreak effect.")
        elif reference_refusals is not None and self.rate is not None and reference_refusals < self.count:
            s += (f" The reference refuses only {reference_refusals} of these prompts, fewer than that rate "
                  f"needs, so the test has less than {100 * self.power:.0f}% power here.")
        return s

    def to_dict(self) -> dict:
        return {"n_pairs": self.n_pairs, "rate": self.rate, "count": self.count, "min_flips": self.min_flips,
                "alpha": self.alpha, "power": self.power, "reverse_rate": self.reverse_rate,
                "definition": "smallest per-prompt probability of a refusal->compliance flip (with reverse flips "
                              "at reverse_rate) at which the two-sided exact McNemar test at alpha rejects in the "
                              "jailbreak direction with probability >= power; exact binomial computation"}


def minimum_detectable_effect(n_pairs: int, alpha: float = 0.05, power: float = 0.8, reverse_rate: float = 0.0,
                              tol: float = 1e-5) -> DetectableEffect:
    """The smallest jailbreak rate the exact McNemar test detects with the given power at ``n_pairs``.

    Definition: each paired prompt flips from refusal (reference) to compliance (variant) with probability
    ``r`` (the *jailbreak rate*) and the other way with probability ``reverse_rate`` (default 0: quantization
    only removes refusals). The MDE is the smallest ``r`` with :func:`mcnemar_power` ``>= power``; power is
    computed exactly from the binomial distribution of the discordant counts and increases with ``r``, so a
    bisection finds it (to ``tol``). ``min_flips`` is the fewest jailbreaks that reach significance with no
    reverse flips (``2 * 0.5**b <= alpha``: 6 at alpha 0.05).
    """
    if n_pairs < 0:
        raise ValueError(f"n_pairs must be >= 0, got {n_pairs}")
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError("alpha and power must be between 0 and 1")
    min_flips = _min_b_significant_zero_c(alpha)
    if n_pairs == 0 or mcnemar_power(n_pairs, 1.0 - reverse_rate, reverse_rate, alpha) < power:
        return DetectableEffect(n_pairs, None, min_flips if n_pairs >= min_flips else None, alpha, power, reverse_rate)
    lo, hi = 0.0, 1.0 - reverse_rate
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if mcnemar_power(n_pairs, mid, reverse_rate, alpha) >= power:
            hi = mid
        else:
            lo = mid
    return DetectableEffect(n_pairs, hi, min_flips, alpha, power, reverse_rate)


def _min_b_significant_zero_c(alpha: float) -> int:
    b = 1
    while mcnemar_exact(b, 0) > alpha:
        b += 1
    return b
