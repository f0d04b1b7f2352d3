"""The audit: one reference, its variants, one fixed measurement basis, and what each variant did to it.

>>> audit = trace.Audit(base_model="default", quant_model="int4-rtn-g32")
>>> audit.load_sae("path/to/saes/")          # or audit.train_sae() / cached SAEs (the default)
>>> results = audit.trace_features(dataset="harmful_refusal_v1")
>>> print(results.summary())

The flow (see docs/architecture.md):

1. SAEs at the audit's hook points, fitted on the reference only (loaded, or trained once and cached).
2. A safety fingerprint fitted on the dataset's **train** split with the reference: the SAE features that
   separate safety prompts from baseline prompts at the post-instruction tokens, the capability features
   found the same way from ``capability_v1``, and a difference-in-means direction per hook.
3. The **test** split (safety, baseline and capability prompts) runs once through the reference: its
   activations, SAE codes, directions and KL logits make the frozen :class:`ReferenceSide`
   (:func:`build_reference_side`). Every variant runs through the same prompts and is encoded with the
   *reference* SAEs (never retrained on a variant).
4. Per variant (:func:`audit_variant`): CPFR of every SAE feature over the prompt tokens (the user's message
   and the template's post-instruction tokens), and for the fingerprint's features drift, muting and
   smearing; the directions' cosine and projection kept; the fingerprint's held-out separation read through
   the variant; and llama.cpp's output statistics on English text.

Modules: ``reference`` (the reference side), ``variant`` (one variant against it), ``records`` (the typed
per-variant records), ``result`` (``AuditResult``: summary and JSON), ``session`` (``Audit``, ``AuditSession``).
"""

from trace_lib.audit.records import DirectionAudit, FeatureAudit, HookStats, VariantAudit
from trace_lib.audit.reference import ReferenceSide, build_reference_side, reference_basis, token_mask
from trace_lib.audit.result import RESULT_KIND, RESULT_VERSION, AuditResult
from trace_lib.audit.session import DEFAULT_VARIANTS, Audit, AuditSession, fingerprint_cache_key
from trace_lib.audit.variant import audit_variant, compare_variant, top_examples

__all__ = ["DEFAULT_VARIANTS", "RESULT_KIND", "RESULT_VERSION", "Audit", "AuditResult", "AuditSession",
           "DirectionAudit", "FeatureAudit", "HookStats", "ReferenceSide", "VariantAudit", "audit_variant",
           "build_reference_side", "compare_variant", "fingerprint_cache_key", "reference_basis", "token_mask",
           "top_examples"]
