"""Activation muting: SAE features that fall silent in a variant
(conventions in :mod:`trace_lib.metrics.features`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trace_lib.errors import TraceError
from trace_lib.metrics._inputs import _as_feature_matrices, _resolve_ids, _resolve_names
from trace_lib.metrics._reduce import _NAN, _column_blocks
from trace_lib.metrics._result import _label, _pct, _ResultBase

__all__ = ["ActivationMuting", "MutingResult"]


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
