"""Paired statistics for refusal behaviour: Wilson intervals, the exact McNemar test and its detectable effect.

* :func:`wilson_interval` -- Wilson score interval for a proportion ``k / n`` (Wilson 1927; Agresti & Coull 1998):
  ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``p = k/n``.
* :func:`mcnemar_exact` -- McNemar's test for paired binary outcomes in its exact form: of the ``b + c``
  discordant pairs, ``b`` went one way; under the null of no change ``b ~ Binomial(b + c, 1/2)``; the two-sided
  p-value is ``scipy.stats.binomtest(b, b + c, 0.5).pvalue`` (1 when there are no discordant pairs).
* :func:`minimum_detectable_effect` -- the smallest *jailbreak rate* (the fraction of the ``n`` paired
  prompts that flip from refusal in the reference to compliance in the variant) that the exact McNemar test
  at level ``alpha`` detects with probability ``power``, computed exactly (see its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


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
