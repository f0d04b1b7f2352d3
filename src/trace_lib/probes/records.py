"""The typed results of a probe read through the reference and a variant: :class:`ProbeScore`,
:class:`ProbeAudit` (JSON through ``to_dict`` / ``from_dict``; unknown keys are ignored, missing ones NaN)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from trace_lib.jsonutil import json_clean

_NAN = float("nan")


def _clean(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: (_NAN if v is None else v) for k, v in d.items() if k in names}


@dataclass
class ProbeScore:
    """AUROC and accuracy of a probe on the test prompts of one model, with their bootstrap 95% intervals."""

    auroc: float = _NAN
    auroc_low: float = _NAN
    auroc_high: float = _NAN
    accuracy: float = _NAN
    accuracy_low: float = _NAN
    accuracy_high: float = _NAN

    def text(self, spec: str = ".2f") -> str:
        """``0.98 [0.95, 1.00]``"""
        f = (lambda x: "n/a" if x is None or math.isnan(x) else format(x, spec))  # noqa: E731
        return f"{f(self.auroc)} [{f(self.auroc_low)}, {f(self.auroc_high)}]"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProbeScore:
        return cls(**_clean(cls, d))


@dataclass
class ProbeAudit:
    """One probe (category, hook, method) scored through the reference and a variant on the same test prompts;
    ``*_diff`` are variant minus reference, with the paired bootstrap's 95% interval."""

    category: str
    hook: str
    method: str  # "logistic" | "diff_in_means"
    reference: ProbeScore = field(default_factory=ProbeScore)
    variant: ProbeScore = field(default_factory=ProbeScore)
    auroc_diff: float = _NAN
    auroc_diff_low: float = _NAN
    auroc_diff_high: float = _NAN
    accuracy_diff: float = _NAN
    accuracy_diff_low: float = _NAN
    accuracy_diff_high: float = _NAN
    threshold: float = _NAN  # fixed on the reference's train split
    train_auroc: float = _NAN
    n_safety: int = 0
    n_baseline: int = 0
    n_train_safety: int = 0
    n_train_baseline: int = 0
    l2: float = _NAN
    n_resamples: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.reference, ProbeScore):
            self.reference = ProbeScore.from_dict(self.reference)
        if not isinstance(self.variant, ProbeScore):
            self.variant = ProbeScore.from_dict(self.variant)

    def line(self) -> str:
        """``refusal probe at <hook>: AUROC 0.98 [0.95, 1.00] -> 0.71 [0.62, 0.80] (change -0.27 [...])``"""
        what = "probe" if self.method == "logistic" else "difference-in-means direction"
        f = (lambda x: "n/a" if math.isnan(x) else format(x, "+.2f"))  # noqa: E731
        return (f"{self.category} {what} at {self.hook}: AUROC {self.reference.text()} -> {self.variant.text()} "
                f"(change {f(self.auroc_diff)} [{f(self.auroc_diff_low)}, {f(self.auroc_diff_high)}]); accuracy "
                f"{self.reference.accuracy:.2f} -> {self.variant.accuracy:.2f}")

    def to_dict(self) -> dict:
        return json_clean(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProbeAudit:
        return cls(**_clean(cls, d))
