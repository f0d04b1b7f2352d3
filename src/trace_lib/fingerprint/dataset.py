"""Fitting a fingerprint on one split of a registered prompt dataset."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trace_lib.errors import DatasetError
from trace_lib.fingerprint.fingerprint import SafetyFingerprint

if TYPE_CHECKING:
    from trace_lib.fingerprint.tracer import CircuitTracer

__all__ = ["fingerprint_from_dataset"]


def fingerprint_from_dataset(tracer: CircuitTracer, dataset_name_or_obj: Any, split: str = "train",
                             capability_dataset: Any = "capability_v1", **kw: Any) -> SafetyFingerprint:
    """Fit a fingerprint on one split of a prompt dataset.

    Safety categories are the dataset's behaviours (``harmful_refusal_v1``: one category ``refusal``;
    ``safety_comprehensive_v1``: ``refusal``, ``uncertainty`` and ``safety_warning``), each contrasted with the
    baseline prompts of the same behaviour (all baseline prompts when a behaviour has none of its own).
    Capability categories are ``capability_dataset``'s categories on the same split (None: none), contrasted
    with all the baseline prompts. ``kw`` goes to :meth:`CircuitTracer.create_fingerprint`.
    """
    from trace_lib.datasets import get_dataset

    full = get_dataset(dataset_name_or_obj)
    ds = full.split(split)
    safety = ds.by_behaviour()
    if not safety:
        raise DatasetError(f"dataset {full.name!r} has no safety prompts in its {split!r} split")
    all_baseline = ds.baseline_prompts
    if not all_baseline:
        raise DatasetError(f"dataset {full.name!r} has no baseline prompts in its {split!r} split")
    baselines: dict[str, list[str]] = {}
    for behaviour in safety:
        own = [p.text for p in ds if p.label == "baseline" and p.behaviour == behaviour]
        baselines[behaviour] = own or all_baseline
    capability = None
    cap_meta = None
    if capability_dataset is not None:
        cap_full = get_dataset(capability_dataset)
        cap_ds = cap_full.split(split)
        capability = cap_ds.by_category("capability")
        if not capability:
            raise DatasetError(f"capability dataset {cap_full.name!r} has no capability prompts in {split!r}")
        cap_meta = {"name": cap_full.name, "split": split, "sha256": cap_ds.sha256()}
    fp = tracer.create_fingerprint(safety, baselines, capability, **kw)
    fp.metadata["dataset"] = {"name": full.name, "split": split, "sha256": ds.sha256()}
    fp.metadata["capability_dataset"] = cap_meta
    return fp
