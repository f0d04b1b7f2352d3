"""Feature-level metrics: how well a variant preserves the reference model's SAE features.

Every metric here reads the SAE codes of the *same tokens* from the reference model and from the variant
(quantized, cast, ...), both encoded with the *reference* SAE (the fixed measurement basis), and compares them
column by column (one column per SAE latent):

``features_ref``, ``features_quant``
    float tensors (or numpy arrays) of shape ``[n_tokens, n_features]``, padding already removed.
``feature_ids``
    optional list of the SAE latent indices the columns are (default ``0..n_features-1``); results and
    summaries name features by these ids.
``feature_names``
    optional names, either a list aligned with the columns or a mapping ``feature_id -> name``; only used in
    summaries ("Feature #772 (Refusal) degraded by 22% in INT8").

Conventions shared by all metrics (the formulas are in each class's docstring and in ``docs/metrics.md``):

* A feature is **active in the reference** when ``||f_ref||_2 > eps`` over the tokens (``eps = 1e-8``).
  Per-feature values that need a reference signal are NaN for inactive features; means skip them.
* A feature **fires** on a token when its activation is ``> activity_threshold`` (default 0, i.e. the ReLU /
  TopK / JumpReLU code is non-zero).
* Per-feature statistics are computed in float64, in column blocks, so memory stays bounded for wide SAEs.
* Results are dataclasses with ``summary()``, ``to_dict()`` (JSON-safe: NaN/Inf become ``None``) and
  ``to_json()``; they also support ``result["key"]`` access, as the seed API uses for smearing and muting.

One module per metric: :mod:`~trace_lib.metrics.cpfr`, :mod:`~trace_lib.metrics.drift`,
:mod:`~trace_lib.metrics.smearing` and :mod:`~trace_lib.metrics.muting`; this module gathers them.
"""

from __future__ import annotations

from trace_lib.metrics.cpfr import CPFR, CPFRResult
from trace_lib.metrics.drift import DriftResult, FeatureDrift
from trace_lib.metrics.muting import ActivationMuting, MutingResult
from trace_lib.metrics.smearing import FeatureSmearing, SmearingResult

__all__ = [
    "CPFR",
    "CPFRResult",
    "FeatureDrift",
    "DriftResult",
    "FeatureSmearing",
    "SmearingResult",
    "ActivationMuting",
    "MutingResult",
]
