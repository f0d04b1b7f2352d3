"""Cross-Precision Feature Recovery (CPFR): how much of each reference SAE feature a variant reproduces
(conventions in :mod:`trace_lib.metrics.features`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trace_lib.errors import TraceError
from trace_lib.metrics._inputs import _as_feature_matrices, _resolve_ids, _resolve_names
from trace_lib.metrics._reduce import _NAN, _column_blocks, _ids_where
from trace_lib.metrics._result import _fmt, _label, _pct, _ResultBase

__all__ = ["CPFR", "CPFRResult"]


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
