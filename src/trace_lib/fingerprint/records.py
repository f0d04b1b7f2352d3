"""The rows of a safety fingerprint: one selected feature (:class:`FeatureRecord`) or one direction
(:class:`DirectionRecord`), and their JSON form (NaN written as null)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trace_lib.errors import ResultFormatError

__all__ = ["DirectionRecord", "FeatureRecord"]


@dataclass
class FeatureRecord:
    """One selected SAE feature of one category (statistics as in the module docstring)."""

    category: str
    hook: str
    feature: int
    auroc: float
    effect_size: float
    u_statistic: float
    p_value: float
    p_adjusted: float
    mean_safety: float
    mean_baseline: float
    fire_rate_safety: float
    fire_rate_baseline: float
    label: str

    def describe(self) -> str:
        return f"{self.hook} #{self.feature} AUROC {self.auroc:.2f} d={self.effect_size:.1f}"


@dataclass
class DirectionRecord:
    """The difference-in-means direction of one category at one hook (last prompt token), unnormalised."""

    category: str
    hook: str
    vector: list[float]
    norm: float
    auroc: float


def _f(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _record_to_dict(rec: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(rec):
        v = getattr(rec, f.name)
        if isinstance(v, float):
            v = _f(v)
        elif isinstance(v, list):
            v = [_f(x) for x in v]
        out[f.name] = v
    return out


def _record_from_dict(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, Mapping):
        raise ResultFormatError(f"fingerprint file: {where} is not an object")
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in d]
    if missing:
        raise ResultFormatError(f"fingerprint file: {where} lacks {', '.join(missing)}")
    kw: dict[str, Any] = {}
    try:
        for f in dataclasses.fields(cls):
            v = d[f.name]
            if f.name in ("category", "hook", "label"):
                if not isinstance(v, str):
                    raise TypeError(f.name)
            elif f.name == "feature":
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f.name)
            elif f.name == "vector":
                v = [math.nan if x is None else float(x) for x in v]
            else:
                v = math.nan if v is None else float(v)
            kw[f.name] = v
    except (TypeError, ValueError) as exc:
        raise ResultFormatError(f"fingerprint file: {where} has a bad value for {exc}") from None
    return cls(**kw)
