"""Linear probes: a second measurement basis, fitted on the reference, that needs no SAE (docs/metrics.md,
"Linear probes").

Per safety category and hook, an L2-regularised logistic-regression probe (:func:`fit_logistic`, Newton's method,
deterministic) and the difference-in-means direction, both fitted on the reference's train-split last-token
residuals of safety vs baseline prompts (:func:`fit_probe`), then scored on the test split through the reference
and through a variant with a seeded, paired bootstrap (:func:`audit_probe` -> :class:`ProbeAudit`).

Modules: ``logistic`` (the fit), ``fit`` (:class:`FittedProbe`), ``score`` (AUROC, accuracy, bootstrap),
``records`` (:class:`ProbeScore`, :class:`ProbeAudit`).
"""

from trace_lib.probes.fit import L2, FittedProbe, fit_probe
from trace_lib.probes.logistic import LogisticFit, fit_logistic
from trace_lib.probes.records import ProbeAudit, ProbeScore
from trace_lib.probes.score import N_RESAMPLES, audit_probe, auroc_pairs, bootstrap_counts

__all__ = ["L2", "N_RESAMPLES", "FittedProbe", "LogisticFit", "ProbeAudit", "ProbeScore", "audit_probe",
           "auroc_pairs", "bootstrap_counts", "fit_logistic", "fit_probe"]
