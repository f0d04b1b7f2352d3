"""Safety fingerprints: which SAE features and which residual directions carry a model's safety behaviours.

:class:`CircuitTracer` reads prompts through a model and one SAE per hook point (the reference SAEs are the
fixed measurement basis, see ``DESIGN.md``) and contrasts *safety* prompts (harmful requests, unanswerable
questions, requests needing a warning) with matched *baseline* prompts. The result, a
:class:`SafetyFingerprint`, lists the features that are reliably **more** active on the safety prompts (a
refusal feature is one that fires when the model is about to refuse) and, per hook, the difference-in-means
direction. Audits later read a quantized variant through the same features and directions.

Per prompt, a feature's value is its SAE code reduced (``max`` by default, or ``mean``) over a set of token
positions, by default the *post-instruction* template tokens where the model has read the whole request
(Arditi et al. 2024; see :mod:`trace_lib.capture.prompts`). For each category and each feature, over the
``n1`` safety and ``n2`` baseline prompts (:func:`trace_lib.metrics.stats.contrast_statistics`):

* ``U`` -- the Mann-Whitney U statistic of the safety sample: the number of (safety, baseline) pairs in which
  the safety prompt's value is larger, ties counted one half;
* ``auroc = U / (n1 * n2)`` -- the probability that a random safety prompt out-scores a random baseline prompt;
* ``p_value`` -- two-sided Mann-Whitney p-value from ``scipy.stats.mannwhitneyu(axis=0)`` (method ``"auto"``:
  exact for samples of at most 8 without ties, else the normal approximation with tie correction and
  continuity correction); 1 for a feature that is constant over all prompts (e.g. dead);
* ``p_adjusted`` -- Benjamini-Hochberg adjusted p-values (``scipy.stats.false_discovery_control``) over all
  features of all hooks of that category;
* ``effect_size`` -- Cohen's d ``(mean_s - mean_b) / s_pooled`` with
  ``s_pooled = sqrt(((n1 - 1) s1^2 + (n2 - 1) s2^2) / (n1 + n2 - 2))`` (sample variances); 0 when
  ``s_pooled`` is 0;
* ``mean_safety`` / ``mean_baseline`` and ``fire_rate_*`` -- the fraction of prompts with a value above 0.

A feature is *selected* for a category when ``p_adjusted < alpha`` and ``auroc >= min_auroc``; the selected
features are ranked by AUROC, then effect size, and at most ``top_k`` are kept per category (over all hooks).
Directions (Arditi et al. 2024, arXiv:2406.11717): ``d = mean(a_safety) - mean(a_baseline)`` of the
activation at the hook at the last prompt token, with its norm and the train AUROC of the projection
``<a, d / ||d||>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trace_lib.cache import atomic_write_json
from trace_lib.errors import DatasetError, ResultFormatError, SAEError, TraceError
from trace_lib.metrics.stats import auroc, bh_adjust, contrast_statistics

__all__ = [
    "CircuitTracer",
    "DirectionRecord",
    "FeatureRecord",
    "SafetyFingerprint",
    "fingerprint_from_dataset",
]

KIND = "trace.fingerprint"
VERSION = 1
POSITIONS = ("post_instruction", "last", "all")
REDUCTIONS = ("max", "mean")
_CHUNK_ELEMENTS = 1 << 24  # SAE codes computed at once (64 MiB of float32)


# ----------------------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# the fingerprint
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# the tracer
# ----------------------------------------------------------------------------------------------------------


def _sae_identity(sae) -> dict[str, Any]:
    """What identifies an SAE in fingerprint metadata and in the fingerprint and sweep cache keys: its hook and
    shape, :meth:`~trace_lib.sae.SAE.content_hash` (every weight, biases and thresholds included) as
    ``content_sha256``, and the sha256 of ``W_enc`` alone, which fingerprints written before the content
    hash carry and are checked by."""
    w = sae.W_enc.detach().to("cpu", torch.float32).contiguous()
    return {"hook_name": sae.cfg.hook_name, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
            "architecture": sae.cfg.architecture, "k": sae.cfg.k,
            "w_enc_sha256": hashlib.sha256(w.numpy().tobytes()).hexdigest(),
            "content_sha256": sae.content_hash()}


def _unit_or_zero(v: torch.Tensor) -> torch.Tensor:
    n = float(v.norm())
    return v / n if n > 0 and math.isfinite(n) else torch.zeros_like(v)


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


def reduce_prompt_acts(acts, saes: Mapping[str, Any], positions: str = "post_instruction", reduce: str = "max",
                       residuals: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """From token activations (:class:`~trace_lib.capture.prompts.PromptActs`) to per-prompt SAE codes reduced
    over ``positions`` ([n_prompts, d_sae] per hook in ``saes``) and last-token residuals ([n_prompts, d])."""
    n = acts.n_prompts
    feats: dict[str, torch.Tensor] = {}
    resid: dict[str, torch.Tensor] = {}
    if residuals:
        last = acts.select("last")
        order = acts.prompt[last]
        for hook, a in acts.acts.items():
            r = torch.zeros(n, a.shape[1])
            r[order] = a[last].float()
            resid[hook] = r
    if saes:
        mask = acts.select(positions)
        idx = acts.prompt[mask]
        counts = torch.bincount(idx, minlength=n).clamp(min=1)
        for hook, sae in saes.items():
            x = acts.acts[hook][mask]
            d_sae = sae.cfg.d_sae
            out = torch.full((n, d_sae), float("-inf")) if reduce == "max" else torch.zeros(n, d_sae)
            step = max(1, _CHUNK_ELEMENTS // d_sae)
            with torch.no_grad():
                for i in range(0, x.shape[0], step):
                    codes = sae.encode(x[i:i + step]).detach().to("cpu", torch.float32)
                    if not torch.isfinite(codes).all():
                        raise TraceError(f"the SAE at {hook} gives NaN/Inf codes; check its weights "
                                         "(and the model's activations there)")
                    j = idx[i:i + step]
                    if reduce == "max":
                        out.scatter_reduce_(0, j[:, None].expand_as(codes), codes, reduce="amax")
                    else:
                        out.index_add_(0, j, codes)
            if reduce == "mean":
                out /= counts[:, None].float()
            else:
                out[torch.isinf(out)] = 0.0  # a prompt with no token at the selected positions
            feats[hook] = out
    return feats, resid


class CircuitTracer:
    """Map safety behaviours to SAE features and residual directions (see the module docstring).

    ``model`` is a trace :class:`~trace_lib.models.Loaded` or a Hugging Face ``nn.Module`` (then ``tokenizer``
    is required). ``sae_dict`` maps hook names (``"blocks.5.hook_resid_post"``) to SAEs; each SAE is checked
    against the model up front. ``positions`` (``post_instruction``, ``last`` or ``all``) and ``reduce``
    (``max`` or ``mean``) say how a prompt's token codes become one value per feature.
    """

    def __init__(self, model, sae_dict: Mapping[str, Any], tokenizer=None, positions: str = "post_instruction",
                 reduce: str = "max", batch_size: int = 16, max_length: int = 256):
        from trace_lib.models.load import Loaded, from_model
        from trace_lib.sae.io import check_sae_fits

        if isinstance(model, Loaded):
            loaded = model
            if tokenizer is not None and tokenizer is not loaded.tokenizer:
                loaded = dataclasses.replace(loaded, tokenizer=tokenizer)
        elif isinstance(model, nn.Module):
            if tokenizer is None:
                raise TraceError("a bare nn.Module needs its tokenizer: CircuitTracer(model, saes, tokenizer=tok)")
            loaded = from_model(model, tokenizer)
        else:
            raise TraceError(f"model must be a trace Loaded or a torch nn.Module, got {type(model).__name__}")
        if loaded.tokenizer is None:
            raise TraceError("the model has no tokenizer: pass tokenizer=... to CircuitTracer")
        if positions not in POSITIONS:
            raise TraceError(f"unknown positions {positions!r}: use one of {', '.join(POSITIONS)}")
        if reduce not in REDUCTIONS:
            raise TraceError(f"unknown reduce {reduce!r}: use one of {', '.join(REDUCTIONS)}")
        if not isinstance(sae_dict, Mapping) or not sae_dict:
            raise SAEError("sae_dict must map at least one hook name to an SAE")
        self.loaded = loaded
        self.saes: dict[str, Any] = {}
        for name, sae in sae_dict.items():
            hook = loaded.arch.resolve(name)
            if hook in self.saes:
                raise SAEError(f"two SAEs given for {hook}")
            if not hasattr(sae, "encode") or not hasattr(sae, "cfg"):
                raise SAEError(f"the SAE for {hook} is a {type(sae).__name__}, not a trace SAE")
            check_sae_fits(sae, hook, loaded.arch.d_model)
            self.saes[hook] = sae
        self.positions = positions
        self.reduce = reduce
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)

    @property
    def hooks(self) -> list[str]:
        return list(self.saes)

    # ---- reading prompts -----------------------------------------------------------------------------------
    def _read(self, prompts: Sequence[str], positions: str | None = None, reduce: str | None = None,
              features: bool = True, residuals: bool = True
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One forward pass over ``prompts``: per-prompt reduced SAE codes and last-token activations."""
        from trace_lib.capture.prompts import capture_prompts

        positions = positions or self.positions
        reduce = reduce or self.reduce
        if not prompts:
            raise DatasetError("no prompts given")
        acts = capture_prompts(self.loaded, list(prompts), self.hooks, batch_size=self.batch_size,
                               max_length=self.max_length, description="reading prompts")
        return reduce_prompt_acts(acts, self.saes if features else {}, positions, reduce, residuals=residuals)

    def prompt_features(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per hook ``[n_prompts, d_sae]``: each prompt's SAE codes reduced over the tracer's positions."""
        return self._read(prompts, residuals=False)[0]

    def prompt_residuals(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per hook ``[n_prompts, d]``: the activation at each prompt's last token (for directions)."""
        return self._read(prompts, features=False)[1]

    # ---- fitting -------------------------------------------------------------------------------------------
    def create_fingerprint(self, safety_prompts: Mapping[str, Sequence[str]],
                           baseline_prompts: Sequence[str] | Mapping[str, Sequence[str]],
                           capability_prompts: Mapping[str, Sequence[str]] | None = None, top_k: int = 20,
                           alpha: float = 0.05, min_auroc: float = 0.7, seed: int = 0) -> SafetyFingerprint:
        """Contrast each safety category (and capability category) with baseline prompts.

        ``baseline_prompts`` is one list shared by every category, or a dict with one list per safety
        category (e.g. each behaviour's own matched baselines); capability categories are contrasted with
        all the baseline prompts. Every prompt is read once, whatever the number of groups it belongs to.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise TraceError(f"top_k must be a positive integer, got {top_k!r}")
        if not 0 < float(alpha) < 1:
            raise TraceError(f"alpha must be between 0 and 1, got {alpha!r}")
        if not 0 <= float(min_auroc) <= 1:
            raise TraceError(f"min_auroc must be between 0 and 1, got {min_auroc!r}")
        torch.manual_seed(seed)  # nothing here is random today; seeded so that stays reproducible
        safety, baselines = _check_groups(safety_prompts, baseline_prompts, capability_prompts)
        capability = {str(c): list(p) for c, p in (capability_prompts or {}).items()}
        groups = {**safety, **{f"\0cap:{c}": p for c, p in capability.items()}}
        texts, index = _unique_prompts(list(groups.values()) + list(baselines.values()))
        feats, resid = self._read(texts)

        features: list[FeatureRecord] = []
        cap_features: list[FeatureRecord] = []
        directions: list[DirectionRecord] = []
        candidates: dict[str, dict[str, int]] = {}
        counts: dict[str, dict[str, int]] = {}
        for key, prompts in groups.items():
            is_cap = key.startswith("\0cap:")
            cat = key[len("\0cap:"):] if is_cap else key
            si = torch.tensor([index[t] for t in prompts])
            bi = torch.tensor([index[t] for t in baselines[key]])
            counts[cat] = {"safety": len(si), "baseline": len(bi)}
            recs, cand = _select(cat, self.hooks, feats, si, bi, top_k, alpha, min_auroc)
            candidates[cat] = cand
            (cap_features if is_cap else features).extend(recs)
            if is_cap:
                continue
            for hook in self.hooks:
                pos, neg = resid[hook][si].to(torch.float64), resid[hook][bi].to(torch.float64)
                d = pos.mean(0) - neg.mean(0)
                r_hat = _unit_or_zero(d)
                directions.append(DirectionRecord(cat, hook, d.tolist(), float(d.norm()),
                                                  auroc(pos @ r_hat, neg @ r_hat)))

        prompt_blob = json.dumps({"safety": safety, "baseline": {c: baselines[c] for c in safety},
                                  "capability": capability}, sort_keys=True, ensure_ascii=False)
        lo = self.loaded
        metadata = {
            "model": {"name": lo.name, "content_hash": lo.content_hash},
            "hooks": self.hooks,
            "saes": {h: _sae_identity(s) for h, s in self.saes.items()},
            "positions": self.positions,
            "reduce": self.reduce,
            "n_post_instruction_tokens": _n_post(lo.tokenizer),
            "max_length": self.max_length,
            "prompt_counts": counts,
            "candidates": candidates,
            "top_k": top_k,
            "alpha": float(alpha),
            "min_auroc": float(min_auroc),
            "seed": seed,
            "prompts_sha256": hashlib.sha256(prompt_blob.encode("utf-8")).hexdigest(),
            "statistics": "Mann-Whitney U (scipy, two-sided, method=auto), BH over features x hooks per "
                          "category, Cohen's d with pooled SD",
        }
        return SafetyFingerprint(list(safety), features, cap_features, directions, metadata, list(capability))


def _n_post(tokenizer) -> int:
    from trace_lib.capture.prompts import post_instruction_length

    try:
        return post_instruction_length(tokenizer)
    except Exception:  # noqa: BLE001 - metadata only
        return -1


def _select(cat: str, hooks: Sequence[str], feats: Mapping[str, torch.Tensor], si: torch.Tensor, bi: torch.Tensor,
            top_k: int, alpha: float, min_auroc: float) -> tuple[list[FeatureRecord], dict[str, int]]:
    """Statistics of every feature of every hook for one category, BH over all of them, then selection."""
    stats = [contrast_statistics(feats[h][si], feats[h][bi]) for h in hooks]
    p_adj_all = bh_adjust(np.concatenate([s["p_value"] for s in stats]))
    rows: list[tuple[float, float, int, int, FeatureRecord]] = []
    candidates: dict[str, int] = {}
    start = 0
    for hi, (hook, s) in enumerate(zip(hooks, stats, strict=True)):
        k = len(s["p_value"])
        p_adj = p_adj_all[start:start + k]
        start += k
        chosen = np.flatnonzero((p_adj < alpha) & (s["auroc"] >= min_auroc))
        candidates[hook] = len(chosen)
        for f in chosen.tolist():
            rec = FeatureRecord(cat, hook, int(f), float(s["auroc"][f]), float(s["effect_size"][f]),
                                float(s["u_statistic"][f]), float(s["p_value"][f]), float(p_adj[f]),
                                float(s["mean_safety"][f]), float(s["mean_baseline"][f]),
                                float(s["fire_rate_safety"][f]), float(s["fire_rate_baseline"][f]), cat)
            rows.append((-rec.auroc, -rec.effect_size, hi, rec.feature, rec))
    rows.sort(key=lambda r: r[:4])
    return [r[4] for r in rows[:top_k]], candidates


# ----------------------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------------------


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
