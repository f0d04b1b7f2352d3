"""The reference side of an audit, computed once: :class:`ReferenceSide`, built by :func:`build_reference_side`.

Everything an audit, a sweep (and the localisation and repair to come) compares a variant against is a
property of the reference alone: the SAEs and the safety fingerprint (:func:`reference_basis`), the test
prompts and their token masks, the reference's activations on them and their SAE codes (per token and
reduced per prompt), the reference's safety directions, its held-out fingerprint separation, and its logits
on the KL text. They are computed here once and frozen; :func:`~trace_lib.audit.variant.audit_variant` reads
them and computes only the variant's side.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from trace_lib.cache import stable_hash
from trace_lib.capture.inputs import pack_texts
from trace_lib.capture.prompts import PromptActs, capture_prompts
from trace_lib.compare import default_texts, reference_logits
from trace_lib.datasets.registry import AUDIT_DATASET
from trace_lib.errors import DatasetError
from trace_lib.fingerprint import SafetyFingerprint, _sae_identity, reduce_prompt_acts
from trace_lib.metrics.directions import diff_in_means
from trace_lib.metrics.readout import encode_codes, encoder_readout
from trace_lib.models.load import Loaded
from trace_lib.probes import FittedProbe, fit_probe
from trace_lib.probes.fit import METHODS
from trace_lib.sae.fidelity import BasisFidelity, fidelity_of_saes
from trace_lib.sae.store import MASSIVE_FACTOR

if TYPE_CHECKING:
    from trace_lib.audit.session import Audit


def token_mask(acts: PromptActs, hooks: Sequence[str], where: str = "instruction") -> torch.Tensor:
    """Tokens the feature metrics run over: ``where`` positions, minus massive-activation tokens of the
    reference at any hook (norm above MASSIVE_FACTOR x the median; see sae.store.drop_massive_activations)."""
    mask = acts.select(where).clone()
    for h in hooks:
        norms = acts.acts[h].norm(dim=1)
        mask &= norms <= MASSIVE_FACTOR * norms[mask].median()
    return mask


def dataset_groups(dataset, split: str):
    """Safety groups by behaviour and their baselines, as the fingerprint was fitted (see fingerprint)."""
    from trace_lib.datasets import get_dataset

    ds = get_dataset(dataset) if isinstance(dataset, str) else dataset
    part = ds.split(split)
    safety: dict[str, list[str]] = {}
    baseline: dict[str, list[str]] = {}
    for p in part.prompts:
        if p.label == "safety":
            safety.setdefault(p.behaviour, []).append(p.text)
        elif p.label == "baseline":
            baseline.setdefault(p.behaviour, []).append(p.text)
    if not safety:
        raise DatasetError(f"dataset {ds.name} has no safety prompts in its {split} split")
    all_base = [t for ts in baseline.values() for t in ts]
    if not all_base:
        raise DatasetError(f"dataset {ds.name} has no baseline prompts in its {split} split")
    return ds, safety, {c: baseline.get(c, all_base) for c in safety}


@dataclass(frozen=True)
class ReferenceBasis:
    """The fixed measurement basis: the SAEs (fitted on the reference) and the safety fingerprint."""

    saes: Mapping[str, Any]
    fingerprint: SafetyFingerprint
    sae_s: float = 0.0
    fingerprint_s: float = 0.0


def reference_basis(audit: Audit, dataset: Any = AUDIT_DATASET,
                    capability_dataset: str | None = "capability_v1") -> ReferenceBasis:
    """The audit's SAEs (trained or read from the cache when it has none) and its fingerprint on ``dataset``."""
    t0 = time.perf_counter()
    saes = audit.sae_dict if audit.sae_dict is not None else audit.train_sae()
    t1 = time.perf_counter()
    fp = audit.fingerprint(dataset, capability_dataset)
    return ReferenceBasis(MappingProxyType(dict(saes)), fp, t1 - t0, time.perf_counter() - t1)


@dataclass(frozen=True)
class FingerprintFeature:
    """One fingerprint feature at one hook, once per kind: its first record and all its categories."""

    record: Any  # fingerprint.FeatureRecord
    kind: str  # "safety" | "capability"
    categories: str  # comma-joined


@dataclass(frozen=True)
class ReferenceDirection:
    """A fingerprint direction measured in the reference on the test prompts: its difference in means and the
    per-prompt last-token residuals of the safety and baseline prompts it is taken from."""

    category: str
    hook: str
    direction: torch.Tensor
    acts_safety: torch.Tensor
    acts_baseline: torch.Tensor


@dataclass(frozen=True)
class ReferenceSide:
    """What every variant is compared against, computed once (see the module docstring). Frozen: a field
    cannot be reassigned, and its mappings are read-only views."""

    reference: Loaded
    saes: Mapping[str, Any]
    fingerprint: SafetyFingerprint
    dataset: Any  # the Dataset of the test prompts
    capability_dataset: str | None
    texts: tuple[str, ...]  # the test prompts, each once
    groups: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # category -> (safety rows, baseline rows)
    n_safety: int
    n_baseline: int
    n_capability: int
    acts: PromptActs  # the reference's activations on ``texts``
    mask: torch.Tensor  # the tokens of the feature metrics (user message + post-instruction, no massive ones)
    fp_mask: torch.Tensor  # the tokens the fingerprint's features are read on
    codes: Mapping[str, torch.Tensor]  # hook -> SAE codes on ``mask`` tokens
    fp_features: Mapping[str, tuple[FingerprintFeature, ...]]  # hook -> the fingerprint's features there
    fp_codes: Mapping[str, torch.Tensor]  # hook -> SAE codes on ``fp_mask`` tokens (hooks with features)
    fp_readouts: Mapping[str, torch.Tensor]  # hook -> encoder readouts of the features' ids on ``fp_mask``
    prompt_codes: Mapping[str, torch.Tensor]  # hook -> per-prompt reduced codes [n_prompts, d_sae]
    prompt_resid: Mapping[str, torch.Tensor]  # hook -> per-prompt last-token residuals [n_prompts, d]
    safety_rows: torch.Tensor  # every safety prompt's row
    directions: tuple[ReferenceDirection, ...]
    reference_eval: Mapping[str, Any]  # the fingerprint's held-out separation read through the reference
    kl_ids: torch.Tensor  # the KL text, packed
    kl_info: Mapping[str, Any]
    ref_logits: Any  # the reference's logits on ``kl_ids`` (compare.reference_logits)
    sae_quality: Mapping[str, Any]  # hook -> d_sae, architecture, quality
    threshold: float
    batch_size: int
    seed: int
    kl_ctx: int
    kl_chunks: int
    prompt_forward_s: float
    kl_forward_s: float
    timing: Mapping[str, float]  # sae_s, fingerprint_s, reference_s
    # hook -> the SAE's quality on the audited tokens (sae/fidelity.py); empty for a hand-made side
    basis_fidelity: Mapping[str, BasisFidelity] = field(default_factory=lambda: MappingProxyType({}))
    probes: tuple[FittedProbe, ...] = ()  # per category, hook and method, fitted on the train split (probes/)

    @property
    def hooks(self) -> list[str]:
        return list(self.saes)

    def fp_ids(self, hook: str) -> list[int]:
        """The fingerprint's feature ids at ``hook``, sorted: the columns of ``fp_readouts[hook]``."""
        return sorted({f.record.feature for f in self.fp_features.get(hook, ())})

    def identity(self) -> dict[str, Any]:
        """What a variant's audit depends on besides the variant: model, prompts, SAEs, fingerprint, KL text,
        threshold and batch size (a sweep's row cache keys on it)."""
        return {"model": self.reference.content_hash, "texts": stable_hash(list(self.texts)),
                "groups": {c: [a.tolist(), b.tolist()] for c, (a, b) in self.groups.items()},
                "saes": {h: _sae_identity(s) for h, s in self.saes.items()},
                "fingerprint": stable_hash(self.fingerprint.to_dict()), "kl": stable_hash(self.kl_ids.tolist()),
                "threshold": self.threshold, "batch_size": self.batch_size}


def _fingerprint_features(fp: SafetyFingerprint, hook: str) -> tuple[FingerprintFeature, ...]:
    """One entry per (feature, kind): a feature selected for several categories is listed once, with all."""
    out = []
    for kind in ("safety", "capability"):
        by_feature: dict[int, list] = {}
        for r in fp.features_for(hook=hook, kind=kind):
            by_feature.setdefault(r.feature, []).append(r)
        out += [FingerprintFeature(rs[0], kind, ",".join(dict.fromkeys(x.category for x in rs)))
                for rs in by_feature.values()]
    return tuple(out)


def _train_residuals(audit: Audit, texts: list[str], hooks: list[str]) -> dict[str, torch.Tensor]:
    """The reference's last-token residuals of ``texts`` at ``hooks``, cached on disk by model, texts and hooks
    (the probes' train-split forward pass is reference-side work a repeated audit should not redo)."""
    from safetensors.torch import load_file, save_file

    from trace_lib.cache import atomic_write, cache_dir

    key = stable_hash({"model": audit.reference.content_hash, "texts": texts, "hooks": hooks, "batch": audit.batch_size,
                       "what": "last-token residuals, probes v1"})
    path = cache_dir("probe-residuals") / f"{key}.safetensors"
    if path.is_file():
        cached = load_file(path)
        if sorted(cached) == sorted(hooks):
            return cached
    acts = capture_prompts(audit.reference, texts, hooks, batch_size=audit.batch_size,
                           description="reference train prompts (probes)")
    _, resid = reduce_prompt_acts(acts, {})
    resid = {h: resid[h].contiguous() for h in hooks}
    atomic_write(path, lambda p: save_file(resid, str(p)))
    return resid


def fit_reference_probes(audit: Audit, dataset: Any, categories: Sequence[str], hooks: Sequence[str]
                         ) -> tuple[tuple[FittedProbe, ...], float]:
    """The probes of the reference basis (probes/): per category of ``categories`` that the dataset's **train**
    split has, per hook and method, fitted on the reference's last-token residuals of the train safety vs
    baseline prompts (one forward pass over them); and the seconds it took. None when the split has no such
    prompts."""
    t0 = time.perf_counter()
    try:
        _, safety, baselines = dataset_groups(dataset, "train")
    except DatasetError:
        return (), 0.0
    cats = [c for c in categories if c in safety]
    texts = list(dict.fromkeys(t for c in cats for t in [*safety[c], *baselines[c]]))
    if not texts:
        return (), 0.0
    index = {t: i for i, t in enumerate(texts)}
    resid = _train_residuals(audit, texts, list(hooks))
    out = []
    for c in cats:
        si, bi = [index[t] for t in safety[c]], [index[t] for t in baselines[c]]
        out += [fit_probe(resid[h][si], resid[h][bi], c, h, m) for h in hooks for m in METHODS]
    return tuple(out), time.perf_counter() - t0


def build_reference_side(audit: Audit, dataset: Any = AUDIT_DATASET,
                         capability_dataset: str | None = "capability_v1",
                         safety_prompts: Sequence[str] | None = None) -> ReferenceSide:
    """The reference side of ``audit`` on ``dataset``'s test split (``safety_prompts``: the user's own safety
    prompts, judged against the dataset's baselines). The reference runs once over the test prompts and once
    over the KL text; its SAE codes are encoded here, once."""
    from trace_lib.datasets import get_dataset

    ref = audit.reference
    basis = reference_basis(audit, dataset, capability_dataset)
    saes, fp = basis.saes, basis.fingerprint
    t_fp = time.perf_counter()
    ds, safety, baselines = dataset_groups(dataset, "test")
    if safety_prompts is not None:
        if not safety_prompts:
            raise DatasetError("the list of test prompts is empty")
        cat = fp.categories[0]
        safety, baselines = {cat: list(safety_prompts)}, {cat: baselines.get(cat) or next(iter(baselines.values()))}
    cap = get_dataset(capability_dataset).split("test").capability_prompts if capability_dataset else []
    texts: list[str] = []
    index: dict[str, int] = {}
    for t in [*(t for ts in safety.values() for t in ts), *(t for ts in baselines.values() for t in ts), *cap]:
        if t not in index:
            index[t] = len(texts)
            texts.append(t)
    groups = {c: (torch.tensor([index[t] for t in safety[c]]), torch.tensor([index[t] for t in baselines[c]]))
              for c in safety}
    hooks = list(saes)
    t1 = time.perf_counter()
    acts = capture_prompts(ref, texts, hooks, batch_size=audit.batch_size, description="reference prompts")
    prompt_s = time.perf_counter() - t1
    positions = fp.metadata.get("positions", "post_instruction")
    feats, resid = reduce_prompt_acts(acts, saes, positions, fp.metadata.get("reduce", "max"))
    ref_eval = fp.evaluate_codes(feats, resid, groups)["categories"]
    mask = token_mask(acts, hooks)
    # The fingerprint's features are measured where the fingerprint reads them (post-instruction tokens by
    # default): the positions that matter for them, and where they are strongly active rather than near the
    # SAE's threshold (see docs/metrics.md, "the CPFR noise floor").
    fp_mask = token_mask(acts, hooks, positions)
    codes, fp_feats, fp_codes, readouts = {}, {}, {}, {}
    for h, sae in saes.items():
        codes[h] = encode_codes(sae, acts.acts[h][mask])
        fp_feats[h] = _fingerprint_features(fp, h)
        if fp_feats[h]:
            ids = sorted({f.record.feature for f in fp_feats[h]})
            fp_codes[h] = encode_codes(sae, acts.acts[h][fp_mask])
            readouts[h] = encoder_readout(sae, acts.acts[h][fp_mask], ids)
    directions = []
    for d in fp.directions:
        si, bi = groups[d.category]
        pos, neg = resid[d.hook][si], resid[d.hook][bi]
        directions.append(ReferenceDirection(d.category, d.hook, diff_in_means(pos, neg), pos, neg))
    t1 = time.perf_counter()
    fidelity = fidelity_of_saes(saes, {h: acts.acts[h][mask] for h in hooks}, ref, texts,
                                batch_size=audit.batch_size)
    fidelity_s = time.perf_counter() - t1
    probes, probes_s = fit_reference_probes(audit, ds, list(groups), hooks)
    kl_texts, kl_info = default_texts()
    kl_ids = pack_texts(ref.tokenizer, kl_texts, audit.kl_ctx, max_sequences=audit.kl_chunks)
    t1 = time.perf_counter()
    logits = reference_logits(ref, kl_ids)
    kl_s = time.perf_counter() - t1
    ro = MappingProxyType
    return ReferenceSide(
        reference=ref, saes=saes, fingerprint=fp, dataset=ds, capability_dataset=capability_dataset,
        texts=tuple(texts), groups=ro(groups), n_safety=sum(len(v) for v in safety.values()),
        n_baseline=len({t for ts in baselines.values() for t in ts}), n_capability=len(cap), acts=acts, mask=mask,
        fp_mask=fp_mask, codes=ro(codes), fp_features=ro(fp_feats), fp_codes=ro(fp_codes), fp_readouts=ro(readouts),
        prompt_codes=ro(feats), prompt_resid=ro(resid),
        safety_rows=torch.unique(torch.cat([g[0] for g in groups.values()])) if groups else torch.tensor([]),
        directions=tuple(directions), reference_eval=ref_eval, kl_ids=kl_ids, kl_info=ro(kl_info),
        ref_logits=logits,
        sae_quality=ro({h: {"d_sae": s.cfg.d_sae, "architecture": s.cfg.architecture,
                            "quality": s.cfg.metadata.get("quality")} for h, s in saes.items()}),
        threshold=audit.threshold, batch_size=audit.batch_size, seed=audit.seed, kl_ctx=audit.kl_ctx,
        kl_chunks=audit.kl_chunks, prompt_forward_s=prompt_s, kl_forward_s=kl_s,
        timing=ro({"sae_s": round(basis.sae_s, 2), "fingerprint_s": round(basis.fingerprint_s, 2),
                   "reference_s": round(time.perf_counter() - t_fp, 2), "fidelity_s": round(fidelity_s, 2),
                   "probes_s": round(probes_s, 2)}),
        basis_fidelity=ro(fidelity), probes=probes)
