"""Converting and validating metric inputs: tensors from arrays, finiteness, ``[n_tokens, n_features]`` pairs,
feature ids and names (the conventions are in :mod:`trace_lib.metrics.features`)."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from trace_lib.errors import TraceError


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
