"""Localising an audit's flagged variants: the audit says *that* refusal features degraded, this says *where*.

:func:`localize_audit` runs triage (:func:`~trace_lib.attribution.localize.localize` with AtP over every
attention and MLP output, its top k restore-patched) for each variant an audit flagged and stores the result in
the variant's record, whose summary then reads "the damage enters mostly at ...". It lives here, above the
audit, because localisation is built on the audit's reference side and not the other way round.
"""

from __future__ import annotations

from typing import Any

from trace_lib.attribution.localize import localize
from trace_lib.errors import AttributionError

VERIFY_TOP = 5


def localize_damage(reference: Any, variant: Any, dataset: Any, verify_top: int = VERIFY_TOP,
                    refusal_reply: str | None = None) -> dict:
    """Where a flagged variant's refusal gap enters: :func:`trace_lib.attribution.localize` with AtP over every
    attention and MLP output on the dataset's refused harmful test prompts, its top ``verify_top`` components
    then restore-patched. Returns the gap, the verified components and the summary line; a variant whose gap is
    not significant (or a dataset with no refusal prompts) gets the reason instead of a ranking."""
    refusal = [p for p in dataset.prompts if p.behaviour in ("refusal", "baseline")]
    try:
        if not any(p.label == "safety" and p.behaviour == "refusal" for p in refusal):
            raise AttributionError(f"{dataset.name} has no refusal prompts to localise a refusal gap on")
        from trace_lib.datasets.registry import Dataset

        loc = localize(reference, variant, method="atp", components=["attn", "mlp"],
                       dataset=Dataset(f"{dataset.name}[refusal]", refusal, dataset.description),
                       with_decomposition=False, verify_top=verify_top, refusal_reply=refusal_reply)
    except AttributionError as e:  # NoGapError included: say why there is no ranking
        return {"line": f"not localised: {e}", "gap": None, "top": []}
    line = loc.damage_line() or "the damage could not be placed: no verified component restores any of the gap"
    return {"line": line, "gap": loc.gap, "top": loc.ranking()[:verify_top], "method": "atp + restore-patching",
            "seconds": loc.seconds}


def localize_audit(audit: Any, result: Any, dataset: Any, verify_top: int = VERIFY_TOP) -> Any:
    """Localise every variant of ``result`` (the :class:`~trace_lib.audit.AuditResult` of ``audit.trace_features
    (dataset)``, variants in ``audit.variant_specs``' order) that has degraded safety features; each is built
    again from its spec. Returns ``result`` with those variants' ``localization`` set."""
    from trace_lib.compare import resolve_variant
    from trace_lib.datasets.registry import get_dataset

    ds = get_dataset(dataset)
    for spec, v in zip(audit.variant_specs, result.variants):
        if not v.degraded("safety"):
            continue
        var = resolve_variant(audit.reference, spec)
        v.localization = localize_damage(audit.reference, var, ds, verify_top)
        del var
    return result
