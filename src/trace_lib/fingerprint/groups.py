"""Prompt groups of a fingerprint: safety categories, their baselines and capability categories, checked; every
distinct prompt indexed once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trace_lib.errors import DatasetError


def _unique_prompts(groups: Sequence[Sequence[str]]) -> tuple[list[str], dict[str, int]]:
    index: dict[str, int] = {}
    for g in groups:
        for t in g:
            index.setdefault(t, len(index))
    return list(index), index


def _check_groups(safety_prompts: Mapping[str, Sequence[str]],
                  baseline_prompts: Sequence[str] | Mapping[str, Sequence[str]],
                  capability_prompts: Mapping[str, Sequence[str]] | None
                  ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Validate the prompt groups; return safety categories and, per category, its baseline prompts."""
    if not isinstance(safety_prompts, Mapping) or not safety_prompts:
        raise DatasetError("safety_prompts must be a non-empty dict {category: [prompts]}")

    def clean(prompts: Any, what: str) -> list[str]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise DatasetError(f"{what} must be a list of prompt strings")
        out = list(prompts)
        if not out:
            raise DatasetError(f"{what} is empty; give at least 2 prompts")
        if any(not isinstance(t, str) for t in out):
            raise DatasetError(f"{what} holds non-string prompts")
        if len(out) < 2:
            raise DatasetError(f"{what} has only {len(out)} prompt; statistics need at least 2 per group")
        return out

    safety = {str(c): clean(p, f"safety category {c!r}") for c, p in safety_prompts.items()}
    baselines: dict[str, list[str]] = {}
    if isinstance(baseline_prompts, Mapping):
        for c in safety:
            if c not in baseline_prompts:
                raise DatasetError(f"baseline_prompts has no prompts for safety category {c!r}")
            baselines[c] = clean(baseline_prompts[c], f"baseline prompts of category {c!r}")
    else:
        common = clean(baseline_prompts, "baseline_prompts")
        baselines = {c: common for c in safety}
    if capability_prompts:
        shared = sorted(set(capability_prompts) & set(safety))
        if shared:
            raise DatasetError(f"categories {shared} are both safety and capability categories; rename one")
        pool, _ = _unique_prompts(list(baselines.values()))
        for c, p in capability_prompts.items():
            clean(p, f"capability category {c!r}")
            baselines[f"\0cap:{c}"] = pool
    return safety, baselines
