"""Feature drift: how each SAE feature's activation distribution and pattern moved in a variant
(conventions in :mod:`trace_lib.metrics.features`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trace_lib.errors import TraceError
from trace_lib.metrics._inputs import _as_feature_matrices, _resolve_ids, _resolve_names
from trace_lib.metrics._reduce import _NAN, _column_blocks, _nanmean
from trace_lib.metrics._result import _fmt, _label, _pct, _ResultBase

__all__ = ["FeatureDrift", "DriftResult"]


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
