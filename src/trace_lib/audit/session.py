"""``Audit``: one reference, its variants, and what each variant did to the reference's measurement basis.

:class:`Audit` holds the reference model, the variants to audit, the SAEs and the settings; its fingerprint
is fitted once and cached. :meth:`Audit.session` builds the :class:`~trace_lib.audit.reference.ReferenceSide`
(once) and returns an :class:`AuditSession`, whose ``run(variant)`` is
:func:`~trace_lib.audit.variant.audit_variant` and whose ``result(...)`` is the :class:`AuditResult`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from trace_lib.audit.records import VariantAudit
from trace_lib.audit.reference import ReferenceSide, build_reference_side
from trace_lib.audit.result import AuditResult
from trace_lib.audit.variant import audit_variant
from trace_lib.cache import cache_dir, stable_hash
from trace_lib.compare import resolve_variant
from trace_lib.datasets.registry import AUDIT_DATASET
from trace_lib.errors import SAEError
from trace_lib.fingerprint import CircuitTracer, SafetyFingerprint, _sae_identity, fingerprint_from_dataset
from trace_lib.models.load import Loaded, ensure_loaded
from trace_lib.validate import CONTEXT, FRACTION, POSITIVE_INT, check_variant_spec

DEFAULT_VARIANTS = ("int8-dynamic", "int4-rtn-g32", "gguf-q4_0")


def fingerprint_cache_key(model_hash: str, dataset_sha256: str, capability_sha256: str | None,
                          saes: Mapping[str, Any], seed: int) -> str:
    """The key of a cached reference fingerprint: model, datasets, seed and each SAE's identity (its
    :meth:`~trace_lib.sae.SAE.content_hash` included, so SAEs differing only in biases or thresholds differ)."""
    return stable_hash({"model": model_hash, "dataset": dataset_sha256, "capability": capability_sha256,
                        "saes": {h: _sae_identity(s) for h, s in saes.items()}, "seed": seed})



class Audit:
    """Audit a reference model against one or more variants (see module docstring)."""

    def __init__(self, base_model: str | Loaded = "default-safety", quant_model: Any = None, *,
                 variants: Sequence[Any] | None = None, hooks: Sequence[str] | None = None,
                 degradation_threshold: float = 0.8, kl_ctx: int = 256, kl_chunks: int = 8, batch_size: int = 16,
                 seed: int = 0, saes: Mapping[str, Any] | None = None, retrain_saes: bool = False,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> None:
        """``device`` and ``dtype`` place a ``base_model`` given as a spec (``auto`` picks a GPU when present;
        default: the CPU in float32); a :class:`Loaded` is used where it is
        (:func:`~trace_lib.models.load.ensure_loaded`). Variants are built from the reference, so they run
        there too."""
        specs = list(variants) if variants is not None else ([quant_model] if quant_model is not None else [])
        specs = specs or list(DEFAULT_VARIANTS)
        for v in specs:  # fail on a bad name or value before loading anything
            check_variant_spec(v)
        FRACTION.check("degradation_threshold", degradation_threshold)
        for name, value in (("kl_ctx", kl_ctx), ("kl_chunks", kl_chunks), ("batch_size", batch_size)):
            POSITIVE_INT.check(name, value)
        CONTEXT.check("kl_ctx", kl_ctx)
        self.reference = ensure_loaded(base_model, device, dtype)
        self.variant_specs = specs
        self.hooks = list(hooks) if hooks else None
        self.sae_dict: dict | None = self._fit(saes) if saes is not None else None
        self.retrain_saes = retrain_saes
        self.threshold = degradation_threshold
        self.kl_ctx, self.kl_chunks, self.batch_size, self.seed = kl_ctx, kl_chunks, batch_size, seed
        self._fingerprints: dict[str, SafetyFingerprint] = {}

    # ---------------------------------------------------------------- SAEs
    def load_sae(self, path: str | Path) -> dict:
        """Load SAEs (one SAELens/sparsify folder, or a folder of several) and check each fits this model."""
        from trace_lib.sae import load_sae, load_sae_dir

        p = Path(path).expanduser()
        if not p.exists():
            raise SAEError(f"no SAE folder at {p}")
        if (p / "cfg.json").is_file():
            one = load_sae(p)
            saes = {one.cfg.hook_name: one}
        else:
            saes = load_sae_dir(p)
        self.sae_dict = self._fit(saes)
        return self.sae_dict

    def _fit(self, saes: Mapping[str, Any]) -> dict:
        """``saes`` keyed by this model's hook names, each checked to fit it (``saes=`` and :meth:`load_sae`)."""
        from trace_lib.sae import check_sae_fits

        out = {}
        for hook, sae in saes.items():
            name = self.reference.arch.resolve(hook)
            check_sae_fits(sae, name, self.reference.d_model)
            out[name] = sae
        return out

    def train_sae(self, hooks: Sequence[str] | None = None, cfg=None, plan=None) -> dict:
        """The model's shipped SAEs (default-safety), else SAEs trained on the reference's activations (cached);
        ``retrain_saes=True`` at construction trains even where a pack is shipped."""
        from trace_lib.sae.store import get_or_train_saes

        self.sae_dict = get_or_train_saes(self.reference, hooks or self.hooks, cfg=cfg, plan=plan,
                                          shipped=not self.retrain_saes)
        return self.sae_dict

    # ---------------------------------------------------------------- fingerprint
    def fingerprint(self, dataset: str = AUDIT_DATASET, capability_dataset: str | None = "capability_v1"
                    ) -> SafetyFingerprint:
        """The safety fingerprint fitted on the dataset's train split with the reference (cached)."""
        from trace_lib.datasets import get_dataset

        if self.sae_dict is None:
            self.train_sae()
        ds = get_dataset(dataset) if isinstance(dataset, str) else dataset
        key = fingerprint_cache_key(self.reference.content_hash, ds.sha256(),
                                    get_dataset(capability_dataset).sha256() if capability_dataset else None,
                                    self.sae_dict, self.seed)
        if key in self._fingerprints:
            return self._fingerprints[key]
        path = cache_dir("fingerprints") / f"{key}.json"
        if path.is_file():
            fp = SafetyFingerprint.load(path)
        else:
            tracer = CircuitTracer(self.reference, self.sae_dict, batch_size=self.batch_size)
            fp = fingerprint_from_dataset(tracer, ds, split="train", capability_dataset=capability_dataset,
                                          seed=self.seed)
            fp.save(path)
        self._fingerprints[key] = fp
        return fp

    # ---------------------------------------------------------------- the audit
    def session(self, dataset: Any = AUDIT_DATASET, capability_dataset: str | None = "capability_v1",
                safety_prompts: Sequence[str] | None = None) -> AuditSession:
        """The reference side of an audit, computed once (:func:`~trace_lib.audit.reference.build_reference_side`):
        SAEs, fingerprint, the test prompts' reference activations and SAE codes and the reference's logits on
        the KL text. ``session.run(variant)`` then audits one variant at a time (a sweep builds, audits and frees
        each config in turn)."""
        return AuditSession(build_reference_side(self, dataset, capability_dataset, safety_prompts))

    def trace_features(self, dataset: Any = AUDIT_DATASET, capability_dataset: str | None = "capability_v1"
                       ) -> AuditResult:
        """Run the audit on the dataset's test split; see the module docstring."""
        t_start = time.perf_counter()
        sess = self.session(dataset, capability_dataset)
        results = []
        for spec in self.variant_specs:
            var = resolve_variant(self.reference, spec)
            results.append(sess.run(var))
            del var
        return sess.result(results, time.perf_counter() - t_start)



class AuditSession:
    """An audit's reference side (:class:`~trace_lib.audit.reference.ReferenceSide`, see :meth:`Audit.session`)
    and the variants audited against it."""

    def __init__(self, ref: ReferenceSide) -> None:
        self.ref = ref

    def run(self, var: Loaded) -> VariantAudit:
        """Audit one variant against the reference side."""
        return audit_variant(self.ref, var)

    def result(self, variants: list[VariantAudit], total_s: float,
               timed: list[VariantAudit] | None = None) -> AuditResult:
        """The audit of ``variants``; ``timed`` (default all of them) are those computed within ``total_s``, whose
        forward passes count in ``forward_s`` (a resumed sweep reads some rows back from its cache)."""
        ref, fp = self.ref, self.ref.fingerprint
        forward_s = ref.prompt_forward_s + ref.kl_forward_s + sum(
            v.timing["prompt_forward_s"] + v.timing["kl_forward_s"] for v in (variants if timed is None else timed))
        audit_s = total_s - ref.timing["sae_s"] - ref.timing["fingerprint_s"]
        return AuditResult(
            reference=ref.reference.describe(), prompts=list(ref.texts),
            dataset={"name": ref.dataset.name, "split": "test", "sha256": ref.dataset.sha256(),
                     "n_safety": ref.n_safety, "n_baseline": ref.n_baseline, "n_capability": ref.n_capability,
                     "capability_dataset": ref.capability_dataset,
                     "kl_text": {**ref.kl_info, "ctx": ref.kl_ctx, "chunks": ref.kl_chunks}},
            fingerprint={"n_features": {c: len(fp.features_for(c, kind="safety")) for c in fp.categories},
                         "n_capability_features": len(fp.capability_features), "reference_eval": ref.reference_eval,
                         "top_features": [r.__dict__ for r in fp.features[:10]], "metadata": fp.metadata},
            variants=variants,
            settings={"hooks": ref.hooks, "degradation_threshold": ref.threshold, "seed": ref.seed,
                      "token_set": "user message + post-instruction tokens, massive-activation tokens excluded",
                      "saes": dict(ref.sae_quality)},
            basis_fidelity=dict(ref.basis_fidelity),
            timing={"total_s": round(total_s, 2), **ref.timing, "audit_s": round(audit_s, 2),
                    "forward_s": round(forward_s, 2),
                    "audit_over_forward": round(audit_s / forward_s, 3) if forward_s else None})
