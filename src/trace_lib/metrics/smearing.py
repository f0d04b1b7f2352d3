"""Feature smearing: pairs of SAE features distinct in the reference that merge in a variant
(conventions in :mod:`trace_lib.metrics.features`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from trace_lib.errors import TraceError
from trace_lib.metrics._inputs import _as_feature_matrices, _resolve_ids, _resolve_names
from trace_lib.metrics._reduce import _column_blocks
from trace_lib.metrics._result import _label, _ResultBase

__all__ = ["FeatureSmearing", "SmearingResult"]


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
