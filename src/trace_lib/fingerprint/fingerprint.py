"""The fitted result, :class:`SafetyFingerprint`: its selected features and directions, the held-out check
(:meth:`~SafetyFingerprint.evaluate`) and its JSON file (save / load). How it is fitted: :mod:`.tracer`."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trace_lib.cache import atomic_write_json
from trace_lib.errors import DatasetError, ResultFormatError, SAEError, TraceError
from trace_lib.fingerprint.groups import _check_groups, _unique_prompts
from trace_lib.fingerprint.identity import _sae_identity
from trace_lib.fingerprint.records import DirectionRecord, FeatureRecord, _record_from_dict, _record_to_dict
from trace_lib.metrics.stats import auroc

if TYPE_CHECKING:
    from trace_lib.fingerprint.tracer import CircuitTracer

__all__ = ["SafetyFingerprint"]

KIND = "trace.fingerprint"
VERSION = 1


def _unit_or_zero(v: torch.Tensor) -> torch.Tensor:
    n = float(v.norm())
    return v / n if n > 0 and math.isfinite(n) else torch.zeros_like(v)


@dataclass(eq=False)
class SafetyFingerprint:
    """Selected SAE features and difference-in-means directions of each safety (and capability) category.

    ``metadata`` records what is needed to recompute it: model hash and name, hooks, SAE identities
    (hook, d_sae, architecture, :meth:`~trace_lib.sae.SAE.content_hash`, sha256 of ``W_enc``), positions,
    reduction, prompt counts, the selection parameters, seed and a sha256 of the prompt texts.
    """

    categories: list[str]
    features: list[FeatureRecord]
    capability_features: list[FeatureRecord]
    directions: list[DirectionRecord]
    metadata: dict[str, Any] = field(default_factory=dict)
    capability_categories: list[str] = field(default_factory=list)

    # ---- views ---------------------------------------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        return list(self.metadata.get("hooks", []))

    def features_for(self, category: str | None = None, hook: str | None = None,
                     kind: str | None = None) -> list[FeatureRecord]:
        """Selected features, best first, filtered by category and hook.

        ``kind`` is ``"safety"``, ``"capability"`` or ``"all"``; by default the capability list when
        ``category`` is a capability category, else the safety list.
        """
        if kind is None:
            kind = "capability" if category is not None and category in self.capability_categories else "safety"
        pool = self._pool(kind)
        return [r for r in pool if (category is None or r.category == category) and (hook is None or r.hook == hook)]

    def feature_ids(self, hook: str, kind: str = "safety") -> list[int]:
        """Sorted unique feature indices selected at ``hook`` (over all categories of ``kind``)."""
        return sorted({r.feature for r in self._pool(kind) if r.hook == hook})

    def _pool(self, kind: str) -> list[FeatureRecord]:
        if kind == "safety":
            return self.features
        if kind == "capability":
            return self.capability_features
        if kind == "all":
            return self.features + self.capability_features
        raise TraceError(f"unknown feature kind {kind!r}: use safety, capability or all")

    def direction(self, category: str, hook: str) -> torch.Tensor:
        """The (unnormalised) difference-in-means direction of ``category`` at ``hook``, float32."""
        for d in self.directions:
            if d.category == category and d.hook == hook:
                return torch.tensor(d.vector, dtype=torch.float32)
        have = sorted({(d.category, d.hook) for d in self.directions})
        raise TraceError(f"the fingerprint has no direction for category {category!r} at {hook!r}; it has {have}")

    # ---- held-out check ------------------------------------------------------------------------------------
    def evaluate(self, tracer: CircuitTracer, safety_prompts: Mapping[str, Sequence[str]],
                 baseline_prompts: Sequence[str] | Mapping[str, Sequence[str]]) -> dict[str, Any]:
        """AUROCs of the fingerprint on held-out prompts (e.g. the test split), read through ``tracer``.

        Per category: ``score_auroc`` of the fingerprint score (the mean over the category's selected features
        of ``activation / train mean_safety``, so features on different scales weigh alike; None when the
        category has no selected feature), ``direction_auroc[hook]`` of the projection onto each unit
        direction, and ``features``: each selected feature's train and test AUROC. Features are read with the
        fingerprint's own positions and reduction. ``tracer`` may wrap a variant of the model, but its SAEs
        must be the ones the fingerprint was fitted with.
        """
        self._check_tracer(tracer)
        safety, baselines = _check_groups(safety_prompts, baseline_prompts, None)
        unknown = [c for c in safety if c not in self.categories]
        if unknown:
            raise DatasetError(f"categories {unknown} are not in the fingerprint (it has {self.categories})")
        texts, index = _unique_prompts(list(safety.values()) + list(baselines.values()))
        feats, resid = tracer._read(texts, positions=self.metadata.get("positions"),
                                    reduce=self.metadata.get("reduce"))
        groups = {cat: (torch.tensor([index[t] for t in prompts]), torch.tensor([index[t] for t in baselines[cat]]))
                  for cat, prompts in safety.items()}
        out = self.evaluate_codes(feats, resid, groups)
        out["model"] = {"name": tracer.loaded.name, "content_hash": tracer.loaded.content_hash}
        return out

    def evaluate_codes(self, feats: Mapping[str, torch.Tensor], resid: Mapping[str, torch.Tensor],
                       groups: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
        """:meth:`evaluate` on per-prompt codes already computed (see :func:`reduce_prompt_acts`).

        ``groups[category] = (safety_rows, baseline_rows)``: row indices into ``feats``/``resid``.
        """
        out: dict[str, Any] = {"categories": {}}
        for cat, (si, bi) in groups.items():
            recs = self.features_for(cat, kind="safety")
            entry: dict[str, Any] = {"n_safety": len(si), "n_baseline": len(bi), "n_features": len(recs)}
            if recs:
                cols = [feats[r.hook][:, r.feature] / max(r.mean_safety, 1e-12) for r in recs]
                score = torch.stack(cols, 1).mean(1)
                entry["score_auroc"] = auroc(score[si], score[bi])
            else:
                entry["score_auroc"] = None
            entry["direction_auroc"] = {}
            for d in self.directions:
                if d.category != cat:
                    continue
                proj = resid[d.hook].to(torch.float64) @ _unit_or_zero(torch.tensor(d.vector, dtype=torch.float64))
                entry["direction_auroc"][d.hook] = auroc(proj[si], proj[bi])
            entry["features"] = [
                {"hook": r.hook, "feature": r.feature, "train_auroc": r.auroc,
                 "test_auroc": auroc(feats[r.hook][si, r.feature], feats[r.hook][bi, r.feature])}
                for r in recs
            ]
            out["categories"][cat] = entry
        return out

    def _check_tracer(self, tracer: CircuitTracer) -> None:
        saes = self.metadata.get("saes", {})
        for hook in self.hooks:
            if hook not in tracer.saes:
                raise SAEError(f"the tracer has no SAE at {hook}, which the fingerprint uses; pass the same SAEs")
            ident = _sae_identity(tracer.saes[hook])
            want = saes.get(hook)
            # the content hash where the fingerprint records one; W_enc's hash in older fingerprints
            key = "content_sha256" if want and "content_sha256" in want else "w_enc_sha256"
            if want and want.get(key) != ident[key]:
                what = "content hash" if key == "content_sha256" else "W_enc hash"
                raise SAEError(f"the SAE at {hook} is not the one the fingerprint was fitted with ({what} "
                               f"{ident[key][:12]} != {str(want.get(key))[:12]}); "
                               "feature indices only mean something in the same SAE")

    # ---- presentation and files ----------------------------------------------------------------------------
    def summary(self, top: int = 5) -> str:
        m = self.metadata
        counts = m.get("prompt_counts", {})
        lines = [f"Safety fingerprint of {m.get('model', {}).get('name', '?')} "
                 f"({len(self.hooks)} hook(s), positions={m.get('positions')}, reduce={m.get('reduce')}, "
                 f"alpha={m.get('alpha')}, min AUROC={m.get('min_auroc')})"]
        for kind, cats in (("safety", self.categories), ("capability", self.capability_categories)):
            for cat in cats:
                recs = self.features_for(cat, kind=kind)
                c = counts.get(cat, {})
                n_cand = sum(m.get("candidates", {}).get(cat, {}).values())
                lines.append(f"{kind} category '{cat}': {c.get('safety', '?')} vs {c.get('baseline', '?')} prompts, "
                             f"{len(recs)} feature(s) selected ({n_cand} passed the thresholds)")
                lines.extend(f"  {r.describe()}" for r in recs[:top])
                if len(recs) > top:
                    lines.append(f"  ... and {len(recs) - top} more")
                for d in self.directions:
                    if d.category == cat:
                        lines.append(f"  direction at {d.hook}: norm {d.norm:.3g}, train AUROC {d.auroc:.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "version": VERSION,
            "categories": list(self.categories),
            "capability_categories": list(self.capability_categories),
            "features": [_record_to_dict(r) for r in self.features],
            "capability_features": [_record_to_dict(r) for r in self.capability_features],
            "directions": [_record_to_dict(d) for d in self.directions],
            "metadata": json.loads(json.dumps(self.metadata, default=str)),
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SafetyFingerprint):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def save(self, path: str | Path) -> Path:
        """Write the fingerprint as JSON (atomically); NaN values are written as null."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: Any) -> SafetyFingerprint:
        if not isinstance(d, Mapping):
            raise ResultFormatError("fingerprint file does not hold a JSON object")
        if d.get("kind") != KIND:
            raise ResultFormatError(f"not a fingerprint file: kind is {d.get('kind')!r}, expected {KIND!r}")
        if d.get("version") != VERSION:
            raise ResultFormatError(f"fingerprint file version {d.get('version')!r} is not supported "
                                    f"(this trace reads version {VERSION}); recreate the fingerprint")
        try:
            cats = [str(c) for c in d["categories"]]
            caps = [str(c) for c in d.get("capability_categories", [])]
            meta = d["metadata"]
            if not isinstance(meta, dict):
                raise TypeError("metadata")
            feats = [_record_from_dict(FeatureRecord, r, f"features[{i}]") for i, r in enumerate(d["features"])]
            capf = [_record_from_dict(FeatureRecord, r, f"capability_features[{i}]")
                    for i, r in enumerate(d["capability_features"])]
            dirs = [_record_from_dict(DirectionRecord, r, f"directions[{i}]") for i, r in enumerate(d["directions"])]
        except (KeyError, TypeError) as exc:
            raise ResultFormatError(f"malformed fingerprint file: missing or bad {exc}") from None
        return cls(cats, feats, capf, dirs, dict(meta), caps)

    @classmethod
    def load(cls, path: str | Path) -> SafetyFingerprint:
        path = Path(path)
        if not path.is_file():
            raise TraceError(f"no fingerprint file at {path}; create one with CircuitTracer.create_fingerprint")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ResultFormatError(f"{path} is not a JSON fingerprint file ({exc})") from None
        return cls.from_dict(d)
