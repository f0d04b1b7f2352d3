"""Difference-in-means directions and how a variant preserves them.

Source: Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction"
(arXiv:2406.11717). The refusal direction at a hook point is the difference between the mean activation on
harmful ("positive") prompts and on harmless ("negative") prompts, usually at the last prompt token::

    d = mean_i a_pos,i - mean_j a_neg,j          r_hat = d / ||d||

trace fits the direction on the reference model (the fixed measurement basis) and asks how much of it the
variant keeps. :func:`compare_directions` reports, with ``r_hat = unit(d_ref)``:

* ``cosine = <d_ref, d_q> / (||d_ref|| ||d_q||)``: whether the variant's own direction points the same way;
* ``norm_ratio = ||d_q|| / ||d_ref||``: whether its magnitude survived;
* ``contrast_kept = <d_q, r_hat> / ||d_ref||`` (= ``norm_ratio * cosine``): the fraction of the reference
  contrast the variant still expresses along the reference direction;
* ``projection_kept = sum_i <a_q,i, r_hat> / sum_i <a_ref,i, r_hat>`` over the same prompts (the positive
  ones when labels are given, else all rows): the ratio of mean projections onto the reference unit
  direction. A ratio of means rather than a mean of per-prompt ratios, so prompts whose reference projection
  is near zero cannot blow it up; NaN when the reference mean projection is (numerically) zero;
* ``separation_ref`` / ``separation_quant``: Cohen's d of the projections onto ``r_hat`` of positive vs
  negative prompts, in the reference and in the variant (``separation_quant_own`` projects the variant onto
  its own direction ``unit(d_q)`` instead). Cohen's d uses the pooled sample standard deviation
  ``sqrt(((n1 - 1) s1^2 + (n2 - 1) s2^2) / (n1 + n2 - 2))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trace_lib.errors import TraceError
from trace_lib.metrics._inputs import _check_finite, _to_tensor
from trace_lib.metrics._result import _fmt, _ResultBase
from trace_lib.metrics.stats import cohens_d

__all__ = ["diff_in_means", "unit", "DirectionComparison", "compare_directions"]

_NAN = float("nan")


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acts(x: Any, name: str) -> torch.Tensor:
    t = _to_tensor(x, name)
    if t.ndim != 2:
        raise TraceError(f"{name} must be 2-D [n_prompts, d_model], got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise TraceError(f"{name} is empty; pass at least one prompt's activations")
    _check_finite(t, name)
    return t


def _direction(x: Any, name: str) -> torch.Tensor:
    t = _to_tensor(x, name)
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1:
        raise TraceError(f"{name} must be a 1-D direction [d_model], got shape {tuple(t.shape)}")
    _check_finite(t, name)
    return t.to(torch.float64).cpu()


def diff_in_means(acts_pos: Any, acts_neg: Any) -> torch.Tensor:
    """``mean(acts_pos, dim=0) - mean(acts_neg, dim=0)`` (not normalised; see :func:`unit`).

    ``acts_pos`` is ``[n, d]`` (e.g. last-token activations on harmful prompts), ``acts_neg`` is ``[m, d]``
    (harmless prompts). Means are taken in float64; the result is float64 for float64 inputs, else float32.
    """
    pos = _acts(acts_pos, "acts_pos")
    neg = _acts(acts_neg, "acts_neg")
    if pos.shape[1] != neg.shape[1]:
        raise TraceError(
            f"acts_pos has shape {tuple(pos.shape)} but acts_neg has shape {tuple(neg.shape)}; "
            "both must be activations of the same hook point (same d_model)"
        )
    dtype = _out_dtype(pos, neg)
    neg = neg.to(pos.device)
    d = pos.to(torch.float64).mean(dim=0) - neg.to(torch.float64).mean(dim=0)
    return d.to(dtype)


def unit(v: Any, eps: float = 1e-12) -> torch.Tensor:
    """``v / ||v||_2``; raises :class:`TraceError` for a zero vector (no direction to normalise)."""
    t = _to_tensor(v, "v")
    norm = float(torch.linalg.vector_norm(t.to(torch.float64)).item())
    if not math.isfinite(norm):
        raise TraceError("the direction contains NaN/Inf values; recompute it from finite activations")
    if norm <= eps:
        raise TraceError(
            "the direction has zero norm (positive and negative prompts have the same mean activation); "
            "check the prompt sets and the hook point"
        )
    return t / norm


@dataclass(eq=False)
class DirectionComparison(_ResultBase):
    """How a variant preserves a reference difference-in-means direction (formulas in the module docstring).

    Fields that need activations (``projection_*``, ``separation_*``) are NaN when none were given.
    """

    cosine: float
    norm_ratio: float
    contrast_kept: float
    norm_ref: float
    norm_quant: float
    projection_kept: float = _NAN
    projection_ref_mean: float = _NAN
    projection_quant_mean: float = _NAN
    projection_prompts: str | None = None
    separation_ref: float = _NAN
    separation_quant: float = _NAN
    separation_quant_own: float = _NAN
    n_prompts: int = 0
    n_pos: int = 0
    n_neg: int = 0

    def summary(self, variant: str | None = None) -> str:
        where = f" in {variant}" if variant else ""
        lines = [
            f"Direction{where}: cosine to reference {_fmt(self.cosine)}, norm ratio {_fmt(self.norm_ratio)}, "
            f"contrast kept {_fmt(self.contrast_kept)}"
        ]
        if self.projection_prompts is not None:
            lines.append(f"  projection kept {_fmt(self.projection_kept)} (mean projection onto the reference "
                         f"direction, {self.projection_prompts} prompts: {_fmt(self.projection_ref_mean)} -> "
                         f"{_fmt(self.projection_quant_mean)})")
        if self.n_pos and self.n_neg:
            lines.append(f"  separation (Cohen's d, {self.n_pos} vs {self.n_neg} prompts): reference "
                         f"{_fmt(self.separation_ref, 2)}, variant {_fmt(self.separation_quant, 2)} "
                         f"(own direction {_fmt(self.separation_quant_own, 2)})")
        return "\n".join(lines)


def _split(acts: Any, labels: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(all_rows, positive_mask)`` from a ``(pos, neg)`` pair or a matrix plus optional labels."""
    if isinstance(acts, tuple) and len(acts) == 2 and all(isinstance(a, (torch.Tensor, np.ndarray)) for a in acts):
        if labels is not None:
            raise TraceError(f"pass {name} either as a (positive, negative) pair or with labels, not both")
        pos, neg = _acts(acts[0], f"{name}[0] (positive)"), _acts(acts[1], f"{name}[1] (negative)")
        if pos.shape[1] != neg.shape[1]:
            raise TraceError(f"{name}: positive activations have shape {tuple(pos.shape)} but negative ones "
                             f"{tuple(neg.shape)}; both must have the same d_model")
        rows = torch.cat([pos.to(torch.float64).cpu(), neg.to(torch.float64).cpu()])
        mask = torch.zeros(rows.shape[0], dtype=torch.bool)
        mask[: pos.shape[0]] = True
        return rows, mask
    rows = _acts(acts, name).to(torch.float64).cpu()
    if labels is None:
        return rows, None
    lab = _to_tensor(labels, "labels").flatten().cpu()
    if lab.numel() != rows.shape[0]:
        raise TraceError(f"labels has {lab.numel()} entries but {name} has {rows.shape[0]} rows; "
                         "pass one label per prompt (1/True = positive)")
    if not bool(((lab == 0) | (lab == 1)).all()):
        raise TraceError("labels must be 0/1 or booleans (1/True = positive prompt)")
    return rows, lab == 1


def compare_directions(dir_ref: Any, dir_quant: Any, acts_ref: Any = None, acts_quant: Any = None,
                       labels: Any = None) -> DirectionComparison:
    """Compare a reference direction with the variant's (both raw difference-in-means vectors ``[d]``).

    ``acts_ref`` / ``acts_quant`` (optional) are activations of the *same prompts* at the same hook point in
    the two models: either ``[n, d]`` matrices (with optional ``labels``, 1 = positive prompt) or
    ``(acts_pos, acts_neg)`` tuples of tensors/arrays. They give ``projection_kept`` (over positive prompts when labels are
    known, else over all rows) and, when both classes are present, the Cohen's d separations.
    """
    d_ref = _direction(dir_ref, "dir_ref")
    d_q = _direction(dir_quant, "dir_quant")
    if d_ref.shape != d_q.shape:
        raise TraceError(f"dir_ref has shape {tuple(d_ref.shape)} but dir_quant has shape {tuple(d_q.shape)}; "
                         "compare directions of the same hook point")
    r_hat = unit(d_ref)
    norm_ref = float(torch.linalg.vector_norm(d_ref))
    norm_q = float(torch.linalg.vector_norm(d_q))
    cosine = float(torch.dot(d_ref, d_q) / (norm_ref * norm_q)) if norm_q > 0 else 0.0
    result = DirectionComparison(
        cosine=max(-1.0, min(1.0, cosine)),
        norm_ratio=norm_q / norm_ref,
        contrast_kept=float(torch.dot(d_q, r_hat)) / norm_ref,
        norm_ref=norm_ref,
        norm_quant=norm_q,
    )
    if acts_ref is None and acts_quant is None:
        return result
    if acts_ref is None or acts_quant is None:
        raise TraceError("pass both acts_ref and acts_quant (activations of the same prompts in both models)")

    a_ref, pos_ref = _split(acts_ref, labels, "acts_ref")
    a_q, pos_q = _split(acts_quant, labels, "acts_quant")
    if a_ref.shape != a_q.shape:
        raise TraceError(f"acts_ref has shape {tuple(a_ref.shape)} but acts_quant has shape {tuple(a_q.shape)}; "
                         "pass activations of the same prompts from both models")
    if pos_ref is not None and pos_q is not None and not torch.equal(pos_ref, pos_q):
        raise TraceError("acts_ref and acts_quant split into positive/negative prompts differently; "
                         "pass the same prompts in the same order")
    if a_ref.shape[1] != d_ref.shape[0]:
        raise TraceError(f"activations have d_model {a_ref.shape[1]} but the directions have {d_ref.shape[0]}; "
                         "use activations of the hook point the directions were fitted on")
    pos = pos_ref if pos_ref is not None else pos_q

    proj_ref = a_ref @ r_hat
    proj_q = a_q @ r_hat
    sel = pos if (pos is not None and bool(pos.any())) else torch.ones(a_ref.shape[0], dtype=torch.bool)
    mean_ref = float(proj_ref[sel].mean())
    mean_q = float(proj_q[sel].mean())
    scale = float(proj_ref[sel].abs().mean())
    result.projection_ref_mean = mean_ref
    result.projection_quant_mean = mean_q
    result.projection_kept = mean_q / mean_ref if abs(mean_ref) > 1e-9 * scale and mean_ref != 0 else _NAN
    result.projection_prompts = "positive" if pos is not None and bool(pos.any()) else "all"
    result.n_prompts = int(a_ref.shape[0])

    if pos is not None:
        result.n_pos = int(pos.sum())
        result.n_neg = int((~pos).sum())
        if result.n_pos and result.n_neg:
            result.separation_ref = cohens_d(proj_ref[pos], proj_ref[~pos])
            result.separation_quant = cohens_d(proj_q[pos], proj_q[~pos])
            if norm_q > 0:
                proj_own = a_q @ (d_q / norm_q)
                result.separation_quant_own = cohens_d(proj_own[pos], proj_own[~pos])
    return result
