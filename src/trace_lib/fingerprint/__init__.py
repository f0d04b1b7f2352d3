"""Safety fingerprints: which SAE features and which residual directions carry a model's safety behaviours.

:class:`CircuitTracer` reads prompts through a model and one SAE per hook point (the reference SAEs are the
fixed measurement basis, see ``DESIGN.md``) and contrasts *safety* prompts (harmful requests, unanswerable
questions, requests needing a warning) with matched *baseline* prompts. The result, a
:class:`SafetyFingerprint`, lists the features that are reliably **more** active on the safety prompts (a
refusal feature is one that fires when the model is about to refuse) and, per hook, the difference-in-means
direction. Audits later read a quantized variant through the same features and directions.

Per prompt, a feature's value is its SAE code reduced (``max`` by default, or ``mean``) over a set of token
positions, by default the *post-instruction* template tokens where the model has read the whole request
(Arditi et al. 2024; see :mod:`trace_lib.capture.prompts`). For each category and each feature, over the
``n1`` safety and ``n2`` baseline prompts (:func:`trace_lib.metrics.stats.contrast_statistics`):

* ``U`` -- the Mann-Whitney U statistic of the safety sample: the number of (safety, baseline) pairs in which
  the safety prompt's value is larger, ties counted one half;
* ``auroc = U / (n1 * n2)`` -- the probability that a random safety prompt out-scores a random baseline prompt;
* ``p_value`` -- two-sided Mann-Whitney p-value from ``scipy.stats.mannwhitneyu(axis=0)`` (method ``"auto"``:
  exact for samples of at most 8 without ties, else the normal approximation with tie correction and
  continuity correction); 1 for a feature that is constant over all prompts (e.g. dead);
* ``p_adjusted`` -- Benjamini-Hochberg adjusted p-values (``scipy.stats.false_discovery_control``) over all
  features of all hooks of that category;
* ``effect_size`` -- Cohen's d ``(mean_s - mean_b) / s_pooled`` with
  ``s_pooled = sqrt(((n1 - 1) s1^2 + (n2 - 1) s2^2) / (n1 + n2 - 2))`` (sample variances); 0 when
  ``s_pooled`` is 0;
* ``mean_safety`` / ``mean_baseline`` and ``fire_rate_*`` -- the fraction of prompts with a value above 0.

A feature is *selected* for a category when ``p_adjusted < alpha`` and ``auroc >= min_auroc``; the selected
features are ranked by AUROC, then effect size, and at most ``top_k`` are kept per category (over all hooks).
Directions (Arditi et al. 2024, arXiv:2406.11717): ``d = mean(a_safety) - mean(a_baseline)`` of the
activation at the hook at the last prompt token, with its norm and the train AUROC of the projection
``<a, d / ||d||>``.

The package, one concept per module: :mod:`.tracer` (:class:`CircuitTracer`, :func:`reduce_prompt_acts`),
:mod:`.fingerprint` (:class:`SafetyFingerprint`: views, held-out check, file), :mod:`.records` (its rows),
:mod:`.groups` (prompt groups), :mod:`.identity` (SAE identity for metadata and cache keys) and
:mod:`.dataset` (:func:`fingerprint_from_dataset`).
"""

from __future__ import annotations

from trace_lib.fingerprint.dataset import fingerprint_from_dataset
from trace_lib.fingerprint.fingerprint import SafetyFingerprint
from trace_lib.fingerprint.identity import _sae_identity as _sae_identity  # audit's and sweep's cache keys
from trace_lib.fingerprint.records import DirectionRecord, FeatureRecord
from trace_lib.fingerprint.tracer import CircuitTracer
from trace_lib.fingerprint.tracer import reduce_prompt_acts as reduce_prompt_acts  # audit, redteam

__all__ = [
    "CircuitTracer",
    "DirectionRecord",
    "FeatureRecord",
    "SafetyFingerprint",
    "fingerprint_from_dataset",
]
