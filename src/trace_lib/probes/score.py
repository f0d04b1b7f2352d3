"""Scoring a fitted probe on the test prompts through the reference and a variant: AUROC, accuracy and a
seeded, paired, stratified bootstrap.

* AUROC ``= U / (n1 n2)``: the chance a safety prompt out-scores a baseline prompt, ties counting 1/2
  (Mann-Whitney; :func:`auroc_pairs` builds the ``[n1, n2]`` matrix of pair outcomes once).
* accuracy: the fraction of test prompts on the right side of the probe's train-split threshold.
* bootstrap: ``n_resamples`` (1000) resamples of the prompts with replacement, within each class (so every
  resample has ``n1`` safety and ``n2`` baseline prompts), the **same** resample for the reference and the
  variant, so the difference's interval is paired. A resample is a vector of counts ``c`` per prompt; its AUROC
  is ``c_pos^T M c_neg / (n1 n2)`` with ``M`` the pair matrix. Intervals: the 2.5% and 97.5% percentiles
  (``torch.quantile``, linear interpolation). ``torch.Generator`` seeded with ``seed``: the same seed gives
  the same intervals.
"""

from __future__ import annotations

import torch

from trace_lib.probes.fit import FittedProbe
from trace_lib.probes.records import ProbeAudit, ProbeScore

__all__ = ["N_RESAMPLES", "audit_probe", "auroc_pairs", "bootstrap_counts"]

N_RESAMPLES = 1000


def auroc_pairs(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``M[i, j] = 1[pos_i > neg_j] + 1/2 1[pos_i = neg_j]`` (float64); ``M.mean()`` is the AUROC."""
    p, n = pos.double()[:, None], neg.double()[None, :]
    return (p > n).double() + 0.5 * (p == n).double()


def bootstrap_counts(n: int, n_resamples: int, gen: torch.Generator) -> torch.Tensor:
    """``[n_resamples, n]`` counts of each of ``n`` items in resamples of size ``n`` drawn with replacement."""
    idx = torch.randint(n, (n_resamples, n), generator=gen)
    return torch.zeros(n_resamples, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))


def _stats(probe: FittedProbe, pos: torch.Tensor, neg: torch.Tensor, cp: torch.Tensor, cn: torch.Tensor
           ) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    sp, sn = probe.score(pos), probe.score(neg)
    m = auroc_pairs(sp, sn)
    right_p, right_n = (sp > probe.threshold).double(), (sn <= probe.threshold).double()
    n1, n2 = len(sp), len(sn)
    auc = float(m.mean())
    acc = float((right_p.sum() + right_n.sum()) / (n1 + n2))
    auc_b = torch.einsum("bi,ij,bj->b", cp, m, cn) / (n1 * n2)
    acc_b = (cp @ right_p + cn @ right_n) / (n1 + n2)
    return auc, acc, auc_b, acc_b


def _ci(x: torch.Tensor) -> tuple[float, float]:
    q = torch.quantile(x, torch.tensor([0.025, 0.975], dtype=x.dtype))
    return float(q[0]), float(q[1])


def audit_probe(probe: FittedProbe, ref_pos: torch.Tensor, ref_neg: torch.Tensor, var_pos: torch.Tensor,
                var_neg: torch.Tensor, n_resamples: int = N_RESAMPLES, seed: int = 0) -> ProbeAudit:
    """Score ``probe`` on the same test prompts read through the reference (``ref_pos`` safety ``[n1, d]``,
    ``ref_neg`` baseline ``[n2, d]``) and the variant (``var_pos``, ``var_neg``), with the paired bootstrap."""
    gen = torch.Generator().manual_seed(seed)
    cp = bootstrap_counts(len(ref_pos), n_resamples, gen)
    cn = bootstrap_counts(len(ref_neg), n_resamples, gen)
    ra, rc, rab, rcb = _stats(probe, ref_pos, ref_neg, cp, cn)
    va, vc, vab, vcb = _stats(probe, var_pos, var_neg, cp, cn)
    ref = ProbeScore(ra, *_ci(rab), rc, *_ci(rcb))
    var = ProbeScore(va, *_ci(vab), vc, *_ci(vcb))
    return ProbeAudit(probe.category, probe.hook, probe.method, ref, var, va - ra, *_ci(vab - rab), vc - rc,
                      *_ci(vcb - rcb), threshold=probe.threshold, train_auroc=probe.train_auroc,
                      n_safety=len(ref_pos), n_baseline=len(ref_neg), n_train_safety=probe.n_train_safety,
                      n_train_baseline=probe.n_train_baseline, l2=probe.l2 if probe.method == "logistic" else float("nan"),
                      n_resamples=n_resamples, seed=seed)
