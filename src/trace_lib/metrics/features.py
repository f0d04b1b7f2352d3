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
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from trace_lib.errors import TraceError
from trace_lib.jsonutil import json_clean

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

#: per-feature statistics are computed on column blocks of at most this many elements (float64: 128 MiB).
_BLOCK_ELEMENTS = 1 << 24
_NAN = float("nan")


# ----------------------------------------------------------------------------------------------------------
# shared helpers (also used by trace_lib.metrics.directions)
# ----------------------------------------------------------------------------------------------------------


def _to_tensor(x: Any, name: str) -> torch.Tensor:
    """A detached floating tensor from a torch tensor, numpy array or nested list."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TraceError(
                f"{name} must be a torch tensor or numpy array of numbers, got {type(x).__name__}"
            ) from exc
    if t.is_complex():
        raise TraceError(f"{name} is complex; pass real-valued activations")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


def _check_finite(t: torch.Tensor, name: str) -> None:
    bad = int((~torch.isfinite(t)).sum().item())
    if bad:
        raise TraceError(
            f"{name} contains {bad} NaN/Inf value(s); fix the model run that produced it "
            "(e.g. fp16 overflow in the variant) before comparing"
        )


def _as_feature_matrices(
    ref: Any, quant: Any, ref_name: str = "features_ref", quant_name: str = "features_quant"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a reference/variant pair of ``[n_tokens, n_features]`` matrices and return them as tensors."""
    r = _to_tensor(ref, ref_name)
    q = _to_tensor(quant, quant_name)
    if tuple(r.shape) != tuple(q.shape):
        raise TraceError(
            f"{ref_name} has shape {tuple(r.shape)} but {quant_name} has shape {tuple(q.shape)}; "
            "pass [n_tokens, n_features] codes of the same tokens through the same SAE for both models"
        )
    if r.ndim != 2:
        raise TraceError(
            f"{ref_name} and {quant_name} must be 2-D [n_tokens, n_features], got shape {tuple(r.shape)}; "
            "remove padding and flatten batch and sequence dimensions first"
        )
    if r.shape[0] == 0 or r.shape[1] == 0:
        raise TraceError(f"{ref_name} is empty (shape {tuple(r.shape)}); pass at least one token and one feature")
    _check_finite(r, ref_name)
    _check_finite(q, quant_name)
    if r.dtype != q.dtype:
        common = torch.promote_types(r.dtype, q.dtype)
        r, q = r.to(common), q.to(common)
    if q.device != r.device:
        q = q.to(r.device)
    return r, q


def _resolve_ids(feature_ids: Any, n_features: int) -> list[int]:
    if feature_ids is None:
        return list(range(n_features))
    if isinstance(feature_ids, (torch.Tensor, np.ndarray)):
        feature_ids = feature_ids.tolist()
    ids = list(feature_ids)
    if len(ids) != n_features:
        raise TraceError(
            f"feature_ids has {len(ids)} entries but the inputs have {n_features} feature columns; "
            "pass one SAE latent index per column"
        )
    try:
        ids = [operator.index(i) for i in ids]
    except TypeError as exc:
        raise TraceError("feature_ids must be integers (the SAE latent index of each column)") from exc
    if len(set(ids)) != len(ids):
        raise TraceError("feature_ids contains duplicates; pass each SAE latent index once")
    return ids


def _resolve_names(feature_names: Any, ids: list[int]) -> dict[int, str]:
    if feature_names is None:
        return {}
    if isinstance(feature_names, Mapping):
        return {int(k): str(v) for k, v in feature_names.items()}
    names = list(feature_names)
    if len(names) != len(ids):
        raise TraceError(
            f"feature_names has {len(names)} entries but there are {len(ids)} features; "
            "pass one name per column or a mapping {feature_id: name}"
        )
    return {fid: str(n) for fid, n in zip(ids, names, strict=True) if n is not None and str(n) != ""}


def _column_blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(n_rows, 1))
    for start in range(0, n_cols, step):
        yield slice(start, min(start + step, n_cols))


def _label(fid: int, names: Mapping[int, str]) -> str:
    name = names.get(fid)
    return f"Feature #{fid} ({name})" if name else f"Feature #{fid}"


def _pct(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.0f}%" if abs(x) >= 10 else f"{x:.1f}%"


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean().item()) if finite.numel() else _NAN


class _ResultBase:
    """Dict-style access, ``to_dict()`` and ``to_json()`` for result dataclasses.

    ``result["num_smeared_pairs"]`` and ``result.num_smeared_pairs`` are the same thing. Keys are the
    dataclass fields plus the derived properties named in ``_extra_keys``.
    """

    _extra_keys: tuple[str, ...] = ()

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)] + list(self._extra_keys)  # type: ignore[arg-type]

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: tensors become lists, NaN/Inf become ``None``."""
        return {k: json_clean(getattr(self, k)) for k in self.keys()}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def _ids_where(mask: torch.Tensor, ids: Sequence[int]) -> list[int]:
    return [ids[i] for i in torch.nonzero(mask).flatten().tolist()]


# ----------------------------------------------------------------------------------------------------------
# CPFR
# ----------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class CPFRResult(_ResultBase):
    """Cross-Precision Feature Recovery of one reference/variant pair.

    ``per_feature[i]`` is the CPFR of column ``i`` (feature id ``feature_ids[i]``), NaN where the feature is
    inactive in the reference. ``degradation`` is ``100 * (1 - CPFR)`` per feature (percent; it exceeds 100
    when CPFR is negative).
    """

    score: float
    per_feature: torch.Tensor = field(repr=False)
    degraded_features: list[int]
    num_active: int
    num_inactive: int
    feature_ids: list[int] = field(repr=False)
    newly_active_features: list[int] = field(repr=False)
    degradation_threshold: float = 0.8
    eps: float = 1e-8
    feature_names: dict[int, str] = field(default_factory=dict, repr=False)

    _extra_keys = ("num_features", "degradation")

    @property
    def num_features(self) -> int:
        return len(self.feature_ids)

    @property
    def degradation(self) -> torch.Tensor:
        """Per-feature degradation in percent: ``100 * (1 - CPFR(f))`` (NaN for inactive features)."""
        return 100.0 * (1.0 - self.per_feature)

    def _index(self, feature_id: int) -> int:
        try:
            return self.feature_ids.index(feature_id)
        except ValueError:
            raise TraceError(f"feature {feature_id} is not among this result's feature_ids") from None

    def cpfr_of(self, feature_id: int) -> float:
        """CPFR of one feature, by SAE latent id (NaN if inactive in the reference)."""
        return float(self.per_feature[self._index(feature_id)].item())

    def degradation_percent(self, feature_id: int) -> float:
        """``100 * (1 - CPFR)`` of one feature, by SAE latent id: the "degraded by X%" figure."""
        return 100.0 * (1.0 - self.cpfr_of(feature_id))

    def summary(self, variant: str | None = None, max_listed: int = 10) -> str:
        where = f" in {variant}" if variant else ""
        if self.num_active == 0:
            return (f"CPFR undefined: none of the {self.num_features} features is active in the reference "
                    "(pass codes of tokens on which the features fire)")
        lines = [
            f"CPFR {_fmt(self.score)}{where} (mean over {self.num_active} features active in the reference"
            + (f"; {self.num_inactive} inactive excluded)" if self.num_inactive else ")")
        ]
        if self.degraded_features:
            lines.append(f"{len(self.degraded_features)} of {self.num_active} active features below CPFR "
                         f"{self.degradation_threshold:g}:")
            for fid in self.degraded_features[:max_listed]:
                c = self.cpfr_of(fid)
                lines.append(f"Warning: {_label(fid, self.feature_names)} degraded by "
                             f"{_pct(100.0 * (1.0 - c))}{where} (CPFR {c:.3f})")
            if len(self.degraded_features) > max_listed:
                lines.append(f"... and {len(self.degraded_features) - max_listed} more")
        else:
            lines.append(f"No feature below CPFR {self.degradation_threshold:g}.")
        if self.newly_active_features:
            shown = ", ".join(f"#{f}" for f in self.newly_active_features[:max_listed])
            more = " ..." if len(self.newly_active_features) > max_listed else ""
            lines.append(f"{len(self.newly_active_features)} feature(s) silent in the reference fire in the "
                         f"variant: {shown}{more}")
        return "\n".join(lines)


class CPFR:
    """Cross-Precision Feature Recovery (seed definition).

    For feature ``f`` over the tokens::

        CPFR(f) = 1 - ||f_ref - f_q||_2 / (||f_ref||_2 + eps)

    * 1 means the variant reproduces the feature exactly; 0 means the error is as large as the feature itself
      (e.g. the feature is silenced, or doubled); it is **not clipped** and goes negative when the variant's
      error exceeds the reference signal (a sign flip gives -1; firing strongly where the reference is quiet
      gives large negative values).
    * A feature is active in the reference when ``||f_ref||_2 > eps``; inactive features get NaN (CPFR is
      undefined without a reference signal), are excluded from ``score`` and counted in ``num_inactive``.
      Those that nevertheless fire in the variant (``||f_q||_2 > eps``) are listed in
      ``newly_active_features``.
    * ``score`` is the mean CPFR over active features.
    * ``degraded_features`` are the active features with ``CPFR < degradation_threshold``, worst first.
    * The summary's "degraded by X%" is ``100 * (1 - CPFR(f))``.
    """

    def __init__(self, degradation_threshold: float = 0.8, eps: float = 1e-8):
        if not math.isfinite(degradation_threshold):
            raise TraceError("degradation_threshold must be a finite number (e.g. 0.8)")
        if not eps > 0:
            raise TraceError("eps must be a positive number (e.g. 1e-8)")
        self.degradation_threshold = float(degradation_threshold)
        self.eps = float(eps)

    def compute(self, features_ref: Any, features_quant: Any, feature_ids: Sequence[int] | None = None,
                feature_names: Any = None) -> CPFRResult:
        ref, quant = _as_feature_matrices(features_ref, features_quant)
        n_tokens, n_features = ref.shape
        ids = _resolve_ids(feature_ids, n_features)
        names = _resolve_names(feature_names, ids)

        norm_ref, norm_q, norm_diff = [], [], []
        for sl in _column_blocks(n_tokens, n_features):
            r = ref[:, sl].to(torch.float64)
            q = quant[:, sl].to(torch.float64)
            norm_ref.append(torch.linalg.vector_norm(r, dim=0))
            norm_q.append(torch.linalg.vector_norm(q, dim=0))
            norm_diff.append(torch.linalg.vector_norm(q - r, dim=0))
        nr = torch.cat(norm_ref).cpu()
        nq = torch.cat(norm_q).cpu()
        nd = torch.cat(norm_diff).cpu()

        active = nr > self.eps
        cpfr = 1.0 - nd / (nr + self.eps)
        cpfr = torch.where(active, cpfr, torch.full_like(cpfr, _NAN))
        score = float(cpfr[active].mean().item()) if bool(active.any()) else _NAN

        degraded_idx = torch.nonzero(active & (cpfr < self.degradation_threshold)).flatten().tolist()
        values = cpfr.tolist()
        degraded_idx.sort(key=lambda i: (values[i], ids[i]))
        return CPFRResult(
            score=score,
            per_feature=cpfr,
            degraded_features=[ids[i] for i in degraded_idx],
            num_active=int(active.sum().item()),
            num_inactive=int((~active).sum().item()),
            feature_ids=ids,
            newly_active_features=_ids_where(~active & (nq > self.eps), ids),
            degradation_threshold=self.degradation_threshold,
            eps=self.eps,
            feature_names=names,
        )


# ----------------------------------------------------------------------------------------------------------
# Drift
# ----------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class DriftResult(_ResultBase):
    """How each feature's activation distribution and pattern moved (per-feature tensors, one per column)."""

    mean_drift: float
    mean_cosine: float
    num_active: int
    relative_mean_change: torch.Tensor = field(repr=False)
    firing_rate_ref: torch.Tensor = field(repr=False)
    firing_rate_quant: torch.Tensor = field(repr=False)
    firing_rate_change: torch.Tensor = field(repr=False)
    wasserstein: torch.Tensor = field(repr=False)
    normalized_wasserstein: torch.Tensor = field(repr=False)
    cosine: torch.Tensor = field(repr=False)
    feature_ids: list[int] = field(repr=False)
    activity_threshold: float = 0.0
    eps: float = 1e-8
    feature_names: dict[int, str] = field(default_factory=dict, repr=False)

    _extra_keys = ("num_features",)

    @property
    def num_features(self) -> int:
        return len(self.feature_ids)

    def most_drifted(self, k: int = 10) -> list[int]:
        """Feature ids of the ``k`` active features with the largest normalised Wasserstein drift."""
        values = self.normalized_wasserstein.tolist()
        order = [i for i in range(len(values)) if not math.isnan(values[i])]
        order.sort(key=lambda i: (-values[i], self.feature_ids[i]))
        return [self.feature_ids[i] for i in order[:k]]

    def summary(self, variant: str | None = None, max_listed: int = 5) -> str:
        where = f" in {variant}" if variant else ""
        if self.num_active == 0:
            return f"Drift undefined: none of the {self.num_features} features is active in the reference"
        lines = [
            f"Mean drift{where} {_fmt(self.mean_drift)} (Wasserstein-1 / reference mean |activation|, "
            f"over {self.num_active} active features); mean pattern cosine {_fmt(self.mean_cosine)}"
        ]
        index = {fid: i for i, fid in enumerate(self.feature_ids)}
        for fid in self.most_drifted(max_listed):
            i = index[fid]
            lines.append(
                f"  {_label(fid, self.feature_names)}: drift {self.normalized_wasserstein[i].item():.3f}, "
                f"mean {_pct(100 * self.relative_mean_change[i].item())}, firing rate "
                f"{100 * self.firing_rate_ref[i].item():.1f}% -> {100 * self.firing_rate_quant[i].item():.1f}%, "
                f"cosine {self.cosine[i].item():.3f}"
            )
        return "\n".join(lines)


class FeatureDrift:
    """Per-feature shift of activation statistics between reference and variant.

    For feature ``f`` with reference activations ``a`` and variant activations ``b`` over ``n`` tokens:

    * ``relative_mean_change = (mean(b) - mean(a)) / (|mean(a)| + eps)`` (for non-negative SAE codes this is
      ``(mean_q - mean_ref) / (mean_ref + eps)``); NaN for features inactive in the reference.
    * ``firing_rate_ref/quant`` = fraction of tokens with activation ``> activity_threshold``;
      ``firing_rate_change = firing_rate_quant - firing_rate_ref`` (absolute, in [-1, 1]).
    * ``wasserstein`` = 1-Wasserstein distance between the two empirical distributions of the feature's
      activation over tokens. With equal sample sizes this is ``mean_i |sort(a)_i - sort(b)_i|``
      (identical to ``scipy.stats.wasserstein_distance(a, b)``).
    * ``normalized_wasserstein = wasserstein / (mean(|a|) + eps)``: scale-free; 0 for identical
      distributions, 1 for a feature silenced everywhere (or doubled), ``|c - 1|`` for a rescale by ``c >= 0``.
      NaN for inactive features.
    * ``cosine = <a, b> / (||a|| ||b||)``: similarity of the activation *pattern* over tokens (insensitive to
      a rescale); 0 when the variant's feature is all zero, NaN when inactive in the reference.
    * ``mean_drift`` = mean of ``normalized_wasserstein`` over features active in the reference
      (``||a||_2 > eps``); ``mean_cosine`` likewise.
    """

    def __init__(self, activity_threshold: float = 0.0, eps: float = 1e-8):
        if not math.isfinite(activity_threshold):
            raise TraceError("activity_threshold must be a finite number (e.g. 0.0)")
        if not eps > 0:
            raise TraceError("eps must be a positive number (e.g. 1e-8)")
        self.activity_threshold = float(activity_threshold)
        self.eps = float(eps)

    def compute(self, features_ref: Any, features_quant: Any, feature_ids: Sequence[int] | None = None,
                feature_names: Any = None) -> DriftResult:
        ref, quant = _as_feature_matrices(features_ref, features_quant)
        n_tokens, n_features = ref.shape
        ids = _resolve_ids(feature_ids, n_features)
        names = _resolve_names(feature_names, ids)
        thr = self.activity_threshold

        parts: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("mean_r", "mean_q", "mabs_r", "norm_r", "norm_q", "dot", "rate_r", "rate_q", "w1")
        }
        for sl in _column_blocks(n_tokens, n_features):
            r = ref[:, sl].to(torch.float64)
            q = quant[:, sl].to(torch.float64)
            parts["mean_r"].append(r.mean(dim=0))
            parts["mean_q"].append(q.mean(dim=0))
            parts["mabs_r"].append(r.abs().mean(dim=0))
            parts["norm_r"].append(torch.linalg.vector_norm(r, dim=0))
            parts["norm_q"].append(torch.linalg.vector_norm(q, dim=0))
            parts["dot"].append((r * q).sum(dim=0))
            parts["rate_r"].append((r > thr).to(torch.float64).mean(dim=0))
            parts["rate_q"].append((q > thr).to(torch.float64).mean(dim=0))
            # sort in the input dtype (exact: sorting does not round), along contiguous rows (2x faster)
            sr = torch.sort(ref[:, sl].T.contiguous(), dim=1).values.to(torch.float64)
            sq = torch.sort(quant[:, sl].T.contiguous(), dim=1).values.to(torch.float64)
            parts["w1"].append((sr - sq).abs().mean(dim=1))
        s = {k: torch.cat(v).cpu() for k, v in parts.items()}

        active = s["norm_r"] > self.eps
        nan = torch.full((n_features,), _NAN, dtype=torch.float64)
        rel = torch.where(active, (s["mean_q"] - s["mean_r"]) / (s["mean_r"].abs() + self.eps), nan)
        norm_w1 = torch.where(active, s["w1"] / (s["mabs_r"] + self.eps), nan)
        q_alive = s["norm_q"] > self.eps
        denom = torch.where(q_alive, s["norm_r"] * s["norm_q"], torch.ones_like(s["norm_q"]))
        cos = torch.where(q_alive, (s["dot"] / denom).clamp(-1.0, 1.0), torch.zeros_like(denom))
        cos = torch.where(active, cos, nan)
        return DriftResult(
            mean_drift=_nanmean(norm_w1),
            mean_cosine=_nanmean(cos),
            num_active=int(active.sum().item()),
            relative_mean_change=rel,
            firing_rate_ref=s["rate_r"],
            firing_rate_quant=s["rate_q"],
            firing_rate_change=s["rate_q"] - s["rate_r"],
            wasserstein=s["w1"],
            normalized_wasserstein=norm_w1,
            cosine=cos,
            feature_ids=ids,
            activity_threshold=thr,
            eps=self.eps,
            feature_names=names,
        )


# ----------------------------------------------------------------------------------------------------------
# Smearing
# ----------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SmearingResult(_ResultBase):
    """Pairs of features that were distinct in the reference and fire together in the variant.

    ``pairs`` holds at most ``max_pairs`` pairs, largest cosine increase first (``pairs_truncated`` says
    whether some were left out); ``num_smeared_pairs`` counts all of them.
    """

    num_smeared_pairs: int
    pairs: list[dict[str, Any]] = field(repr=False)
    num_pairs_considered: int
    num_features_considered: int
    num_smeared_pairs_jaccard: int
    smeared_features: list[int] = field(repr=False)
    pairs_truncated: bool = False
    primary_similarity: str = "cosine"
    similarity_threshold: float = 0.5
    min_increase: float = 0.3
    min_active_tokens: int = 5
    feature_names: dict[int, str] = field(default_factory=dict, repr=False)

    def summary(self, variant: str | None = None, max_listed: int = 5) -> str:
        where = f" in {variant}" if variant else ""
        lines = [
            f"Smearing{where}: {self.num_smeared_pairs} of {self.num_pairs_considered} feature pairs merged "
            f"(activation cosine < {self.similarity_threshold:g} in the reference, rising by >= "
            f"{self.min_increase:g} to > {self.similarity_threshold:g}); {self.num_smeared_pairs_jaccard} by "
            f"co-activation Jaccard; {self.num_features_considered} features with >= {self.min_active_tokens} "
            "firing tokens considered"
        ]
        for p in self.pairs[:max_listed]:
            lines.append(
                f"  {_label(p['feature_a'], self.feature_names)} + {_label(p['feature_b'], self.feature_names)}: "
                f"cosine {p['similarity_ref']:.2f} -> {p['similarity_quant']:.2f}, "
                f"Jaccard {p['jaccard_ref']:.2f} -> {p['jaccard_quant']:.2f}"
            )
        if self.num_smeared_pairs > max_listed:
            lines.append(f"  ... and {self.num_smeared_pairs - max_listed} more")
        return "\n".join(lines)


class FeatureSmearing:
    """Detect feature pairs that are distinct in the reference but merge in the variant (seed: "distinct
    safety features merge into a single noisy signal").

    For features ``i, j`` with activation columns ``a_i, a_j`` over tokens:

    * primary similarity: activation-pattern cosine ``cos(a_i, a_j) = <a_i, a_j> / (||a_i|| ||a_j||)``;
    * also reported: co-activation Jaccard ``J = |F_i ∩ F_j| / |F_i ∪ F_j|`` where ``F_i`` is the set of
      tokens on which feature ``i`` fires (``> activity_threshold``).

    A pair is **smeared** when ``s_ref < similarity_threshold``, ``s_quant > similarity_threshold`` and
    ``s_quant - s_ref >= min_increase`` with ``s`` the cosine (``num_smeared_pairs``, ``pairs``); the same
    rule on Jaccard gives ``num_smeared_pairs_jaccard``.

    Only features that fire on at least ``min_active_tokens`` tokens in the reference are considered
    (a pair of features that never fire has no meaningful reference similarity), so
    ``num_pairs_considered = k (k - 1) / 2`` for ``k`` such features. The similarity matrices are computed
    with float32 matrix products in row blocks of ``block_size`` features, never with a Python loop over
    pairs: memory is ``4 * n_tokens * k`` floats (normalised and binary copies of both inputs) plus
    ``O(block_size * k)``; 20k tokens x 1000 features take about 2 s on two CPU cores.
    """

    def __init__(self, similarity_threshold: float = 0.5, min_increase: float = 0.3, min_active_tokens: int = 5,
                 activity_threshold: float = 0.0, max_pairs: int = 1000, block_size: int = 1024):
        if not -1.0 <= similarity_threshold <= 1.0:
            raise TraceError("similarity_threshold must lie in [-1, 1] (e.g. 0.5)")
        if not (math.isfinite(min_increase) and min_increase >= 0):
            raise TraceError("min_increase must be a non-negative number (e.g. 0.3)")
        if int(min_active_tokens) < 1:
            raise TraceError("min_active_tokens must be at least 1 (e.g. 5)")
        if not math.isfinite(activity_threshold):
            raise TraceError("activity_threshold must be a finite number (e.g. 0.0)")
        if int(max_pairs) < 0 or int(block_size) < 1:
            raise TraceError("max_pairs must be >= 0 and block_size >= 1")
        self.similarity_threshold = float(similarity_threshold)
        self.min_increase = float(min_increase)
        self.min_active_tokens = int(min_active_tokens)
        self.activity_threshold = float(activity_threshold)
        self.max_pairs = int(max_pairs)
        self.block_size = int(block_size)

    def detect_smearing(self, features_ref: Any, features_quant: Any, feature_ids: Sequence[int] | None = None,
                        feature_names: Any = None) -> SmearingResult:
        ref, quant = _as_feature_matrices(features_ref, features_quant)
        n_tokens, n_features = ref.shape
        ids = _resolve_ids(feature_ids, n_features)
        names = _resolve_names(feature_names, ids)
        thr_act = self.activity_threshold

        counts = torch.cat([(ref[:, sl] > thr_act).sum(dim=0) for sl in _column_blocks(n_tokens, n_features)])
        cand = torch.nonzero(counts >= self.min_active_tokens).flatten()
        k = int(cand.numel())
        base = dict(
            similarity_threshold=self.similarity_threshold, min_increase=self.min_increase,
            min_active_tokens=self.min_active_tokens, feature_names=names,
        )
        if k < 2:
            return SmearingResult(num_smeared_pairs=0, pairs=[], num_pairs_considered=0,
                                  num_features_considered=k, num_smeared_pairs_jaccard=0, smeared_features=[],
                                  **base)

        R = ref[:, cand].to(torch.float32)
        Q = quant[:, cand].to(torch.float32)
        Rb = (R > thr_act).to(torch.float32)
        Qb = (Q > thr_act).to(torch.float32)
        cR, cQ = Rb.sum(dim=0), Qb.sum(dim=0)
        Rn, Qn = self._normalise(R), self._normalise(Q)
        del R, Q

        thr, inc, tol = self.similarity_threshold, self.min_increase, 1e-6
        device = Rn.device
        hit_i, hit_j, hit_sr, hit_sq, hit_jr, hit_jq = [], [], [], [], [], []
        n_jaccard = 0
        for i0 in range(0, k, self.block_size):
            i1 = min(k, i0 + self.block_size)
            rows = torch.arange(i0, i1, device=device)[:, None]
            cols = torch.arange(i0, k, device=device)[None, :]
            upper = cols > rows
            s_ref = Rn[:, i0:i1].T @ Rn[:, i0:]
            s_q = Qn[:, i0:i1].T @ Qn[:, i0:]
            j_ref = self._jaccard(Rb[:, i0:i1].T @ Rb[:, i0:], cR[i0:i1], cR[i0:])
            j_q = self._jaccard(Qb[:, i0:i1].T @ Qb[:, i0:], cQ[i0:i1], cQ[i0:])
            hits = upper & (s_ref < thr) & (s_q > thr) & (s_q - s_ref >= inc - tol)
            hits_j = upper & (j_ref < thr) & (j_q > thr) & (j_q - j_ref >= inc - tol)
            n_jaccard += int(hits_j.sum().item())
            ii, jj = torch.nonzero(hits, as_tuple=True)
            if ii.numel():
                hit_i.append(ii + i0)
                hit_j.append(jj + i0)
                hit_sr.append(s_ref[ii, jj])
                hit_sq.append(s_q[ii, jj])
                hit_jr.append(j_ref[ii, jj])
                hit_jq.append(j_q[ii, jj])

        cand_list = cand.tolist()
        if hit_i:
            hi, hj = torch.cat(hit_i).cpu(), torch.cat(hit_j).cpu()
            sr, sq = torch.cat(hit_sr).cpu().double(), torch.cat(hit_sq).cpu().double()
            jr, jq = torch.cat(hit_jr).cpu().double(), torch.cat(hit_jq).cpu().double()
        else:
            hi = hj = torch.zeros(0, dtype=torch.long)
            sr = sq = jr = jq = torch.zeros(0, dtype=torch.float64)
        n_smeared = int(hi.numel())

        # features taking part in smeared pairs, most pairs first
        involvement = torch.bincount(torch.cat([hi, hj]), minlength=k)
        involved = torch.nonzero(involvement).flatten().tolist()
        involved.sort(key=lambda c: (-int(involvement[c]), ids[cand_list[c]]))

        order = torch.argsort(sq - sr, descending=True, stable=True)[: self.max_pairs].tolist()
        pairs = []
        for p in order:
            a, b = ids[cand_list[int(hi[p])]], ids[cand_list[int(hj[p])]]
            pairs.append({
                "feature_a": a, "feature_b": b,
                "similarity_ref": float(sr[p]), "similarity_quant": float(sq[p]),
                "increase": float(sq[p] - sr[p]),
                "jaccard_ref": float(jr[p]), "jaccard_quant": float(jq[p]),
            })
        return SmearingResult(
            num_smeared_pairs=n_smeared,
            pairs=pairs,
            num_pairs_considered=k * (k - 1) // 2,
            num_features_considered=k,
            num_smeared_pairs_jaccard=n_jaccard,
            smeared_features=[ids[cand_list[c]] for c in involved],
            pairs_truncated=n_smeared > len(pairs),
            **base,
        )

    @staticmethod
    def _normalise(x: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(x, dim=0, keepdim=True)
        return torch.where(norms > 0, x / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(x))

    @staticmethod
    def _jaccard(inter: torch.Tensor, count_rows: torch.Tensor, count_cols: torch.Tensor) -> torch.Tensor:
        union = count_rows[:, None] + count_cols[None, :] - inter
        return torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))


# ----------------------------------------------------------------------------------------------------------
# Muting
# ----------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class MutingResult(_ResultBase):
    """Features that stop firing in the variant (per-feature tensors, one per column)."""

    muting_rate: float
    muted_features: list[int]
    num_muted: int
    num_considered: int
    token_muting_rate: float
    token_emergence_rate: float
    per_feature_token_muting: torch.Tensor = field(repr=False)
    firing_rate_ref: torch.Tensor = field(repr=False)
    firing_rate_quant: torch.Tensor = field(repr=False)
    feature_ids: list[int] = field(repr=False)
    activity_threshold: float = 0.0
    min_ref_rate: float = 0.01
    mute_ratio: float = 0.1
    feature_names: dict[int, str] = field(default_factory=dict, repr=False)

    _extra_keys = ("num_features",)

    @property
    def num_features(self) -> int:
        return len(self.feature_ids)

    def summary(self, variant: str | None = None, max_listed: int = 10) -> str:
        where = f" in {variant}" if variant else ""
        if self.num_considered == 0:
            return (f"Muting undefined: no feature fires on >= {100 * self.min_ref_rate:g}% of tokens in the "
                    "reference")
        lines = [
            f"Muting{where}: {self.num_muted} of {self.num_considered} reference-active features muted "
            f"({100 * self.muting_rate:.2f}%); {_pct(100 * self.token_muting_rate)} of reference firing events "
            f"are silent in the variant; {_pct(100 * self.token_emergence_rate)} of variant firing events are new"
        ]
        index = {fid: i for i, fid in enumerate(self.feature_ids)}
        for fid in self.muted_features[:max_listed]:
            i = index[fid]
            lines.append(f"Warning: {_label(fid, self.feature_names)} muted{where}: fires on "
                         f"{100 * self.firing_rate_ref[i].item():.1f}% of tokens in the reference, "
                         f"{100 * self.firing_rate_quant[i].item():.1f}% in the variant")
        if len(self.muted_features) > max_listed:
            lines.append(f"... and {len(self.muted_features) - max_listed} more")
        return "\n".join(lines)


class ActivationMuting:
    """Detect features that fall silent in the variant (seed: "refusal neurons falling below the
    quantization clipping threshold").

    A feature fires on a token when its activation is ``> activity_threshold``. Per feature, over ``n`` tokens:

    * ``firing_rate_ref = |F_ref| / n``, ``firing_rate_quant = |F_q| / n`` (``F`` = set of firing tokens);
    * ``per_feature_token_muting = |F_ref \\ F_q| / |F_ref|``: of the tokens where it fired in the reference,
      the fraction on which it is silent in the variant (NaN if it never fires in the reference);
    * the feature is **considered** when ``firing_rate_ref >= min_ref_rate`` (and it fires at least once), and
      **muted** when ``firing_rate_quant <= mute_ratio * firing_rate_ref``.

    Aggregates:

    * ``muting_rate = #muted / #considered`` (NaN if nothing is considered);
    * ``token_muting_rate = sum_f |F_ref \\ F_q| / sum_f |F_ref|``: fraction of all reference (token, feature)
      firing events that are silent in the variant;
    * ``token_emergence_rate = sum_f |F_q \\ F_ref| / sum_f |F_q|``: fraction of the variant's firing events
      that the reference does not have (new pathways).

    ``muted_features`` are sorted most-muted first (lowest ``firing_rate_quant / firing_rate_ref``, then highest
    reference rate).
    """

    def __init__(self, activity_threshold: float = 0.0, min_ref_rate: float = 0.01, mute_ratio: float = 0.1):
        if not math.isfinite(activity_threshold):
            raise TraceError("activity_threshold must be a finite number (e.g. 0.0)")
        if not 0.0 <= min_ref_rate <= 1.0:
            raise TraceError("min_ref_rate must lie in [0, 1] (e.g. 0.01)")
        if not 0.0 <= mute_ratio < 1.0:
            raise TraceError("mute_ratio must lie in [0, 1) (e.g. 0.1)")
        self.activity_threshold = float(activity_threshold)
        self.min_ref_rate = float(min_ref_rate)
        self.mute_ratio = float(mute_ratio)

    def detect_muting(self, activations_ref: Any, activations_quant: Any, feature_ids: Sequence[int] | None = None,
                      feature_names: Any = None) -> MutingResult:
        ref, quant = _as_feature_matrices(activations_ref, activations_quant, "activations_ref", "activations_quant")
        n_tokens, n_features = ref.shape
        ids = _resolve_ids(feature_ids, n_features)
        names = _resolve_names(feature_names, ids)
        thr = self.activity_threshold

        c_ref, c_q, lost, gained = [], [], [], []
        for sl in _column_blocks(n_tokens, n_features):
            fr = ref[:, sl] > thr
            fq = quant[:, sl] > thr
            c_ref.append(fr.sum(dim=0))
            c_q.append(fq.sum(dim=0))
            lost.append((fr & ~fq).sum(dim=0))
            gained.append((fq & ~fr).sum(dim=0))
        c_ref_t = torch.cat(c_ref).cpu().to(torch.float64)
        c_q_t = torch.cat(c_q).cpu().to(torch.float64)
        lost_t = torch.cat(lost).cpu().to(torch.float64)
        gained_t = torch.cat(gained).cpu().to(torch.float64)

        rate_ref = c_ref_t / n_tokens
        rate_q = c_q_t / n_tokens
        considered = (rate_ref >= self.min_ref_rate) & (c_ref_t > 0)
        muted = considered & (rate_q <= self.mute_ratio * rate_ref)
        fired = c_ref_t > 0
        token_muting = torch.where(fired, lost_t / torch.where(fired, c_ref_t, torch.ones_like(c_ref_t)),
                                   torch.full_like(c_ref_t, _NAN))
        n_considered = int(considered.sum().item())
        n_muted = int(muted.sum().item())
        total_ref, total_q = float(c_ref_t.sum().item()), float(c_q_t.sum().item())

        muted_idx = torch.nonzero(muted).flatten().tolist()
        ratio = (rate_q / torch.where(fired, rate_ref, torch.ones_like(rate_ref))).tolist()
        rr = rate_ref.tolist()
        muted_idx.sort(key=lambda i: (ratio[i], -rr[i], ids[i]))
        return MutingResult(
            muting_rate=n_muted / n_considered if n_considered else _NAN,
            muted_features=[ids[i] for i in muted_idx],
            num_muted=n_muted,
            num_considered=n_considered,
            token_muting_rate=float(lost_t.sum().item()) / total_ref if total_ref else _NAN,
            token_emergence_rate=float(gained_t.sum().item()) / total_q if total_q else _NAN,
            per_feature_token_muting=token_muting,
            firing_rate_ref=rate_ref,
            firing_rate_quant=rate_q,
            feature_ids=ids,
            activity_threshold=thr,
            min_ref_rate=self.min_ref_rate,
            mute_ratio=self.mute_ratio,
            feature_names=names,
        )
