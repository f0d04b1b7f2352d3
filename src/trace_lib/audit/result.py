"""``AuditResult``: an audit's reference, dataset, fingerprint and variants, its summary and its JSON
(``kind: trace.audit``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trace_lib.audit.records import VariantAudit, _f
from trace_lib.jsonutil import json_clean
from trace_lib.metrics.damage import damage_phrase
from trace_lib.metrics.readout import readout_differs
from trace_lib.results import ResultFile, register_result
from trace_lib.sae.fidelity import BasisFidelity

RESULT_KIND = "trace.audit"
RESULT_VERSION = 1


@register_result(RESULT_KIND, RESULT_VERSION, rerun="the audit")
@dataclass
class AuditResult(ResultFile):
    reference: dict
    dataset: dict
    fingerprint: dict
    variants: list[VariantAudit]
    settings: dict
    timing: dict = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)  # the test prompts, indexed by the examples' "prompt"
    # hook -> the SAEs' quality on the audited prompts (the reference's; absent from files written before it)
    basis_fidelity: dict[str, BasisFidelity] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.basis_fidelity = {h: b if isinstance(b, BasisFidelity) else BasisFidelity.from_dict(b)
                               for h, b in (self.basis_fidelity or {}).items()}

    def basis_warnings(self) -> list[str]:
        """The basis-fidelity warnings of every hook (empty when every SAE fits the audited prompts)."""
        return [w for b in self.basis_fidelity.values() for w in b.warnings]

    def variant(self, name: str) -> VariantAudit:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"no variant {name!r}; have {[v.name for v in self.variants]}")

    def summary(self, max_warnings: int = 5) -> str:
        """The verdict first, then one paragraph per variant."""
        fp = self.fingerprint
        lines = [f"trace audit of {self.reference['name']} on {self.dataset['name']} (test split: "
                 f"{self.dataset['n_safety']} safety, {self.dataset['n_baseline']} baseline, "
                 f"{self.dataset['n_capability']} capability prompts; SAEs at {', '.join(self.settings['hooks'])})"]
        for cat, ev in fp.get("reference_eval", {}).items():
            n = fp["n_features"].get(cat, 0)
            lines.append(f"Fingerprint '{cat}': {n} features, held-out AUROC {_f(ev.get('score_auroc'))} "
                         f"(reference); capability features: {fp.get('n_capability_features', 0)}")
        lines += [b.line() for b in self.basis_fidelity.values()]
        lines += self.basis_warnings()
        for v in self.variants:
            deg = v.degraded("safety")
            verdict = "WARNING" if deg else "ok"
            gap = v.safety_cpfr - v.capability_cpfr
            lines.append(f"[{verdict}] {v.name}: safety CPFR {_f(v.safety_cpfr)} vs capability CPFR "
                         f"{_f(v.capability_cpfr)}; {len(deg)}/{sum(f.kind == 'safety' for f in v.features)} "
                         f"safety features degraded (CPFR < {v.degradation_threshold}); muted "
                         f"{_f(100 * v.muting_rate('safety'), '.0f')}%"
                         + (f"; readout CPFR {_f(v.safety_readout_cpfr)}"
                            if readout_differs(v.safety_readout_cpfr, v.safety_cpfr) else "")
                         + (f"; mean KLD {v.outputs.kld_mean:.4f}, same top {100 * v.outputs.same_top_rate:.1f}%"
                            if v.outputs else ""))
            cats = v.category_verdicts()
            if len(cats) > 1:  # one verdict line per safety category (refusal, uncertainty, safety_warning)
                lines += [f"    {c.line()}" for c in cats]
            if not math.isnan(gap) and abs(gap) >= 0.02:
                lines.append(f"    safety features kept {'less' if gap < 0 else 'more'} than capability features "
                             f"(CPFR {_f(v.safety_cpfr)} vs {_f(v.capability_cpfr)})")
            ref_eval = fp.get("reference_eval", {})
            for cat, ev in v.fingerprint_eval.get("categories", {}).items():
                lines.append(f"    fingerprint '{cat}' held-out AUROC {_f(ref_eval.get(cat, {}).get('score_auroc'))} "
                             f"-> {_f(ev.get('score_auroc'))} through the variant")
            for d in v.directions:
                auc_ref = ref_eval.get(d["category"], {}).get("direction_auroc", {}).get(d["hook"])
                auc_var = v.fingerprint_eval.get("categories", {}).get(d["category"], {}).get(
                    "direction_auroc", {}).get(d["hook"])
                lines.append(f"    {d['category']} direction at {d['hook']}: cosine {_f(d['cosine'])}, projection "
                             f"magnitude kept {_f(d['projection_magnitude_kept'])}, held-out AUROC {_f(auc_ref)} -> "
                             f"{_f(auc_var)}")
            lines += [f"    {x}" for x in v.probe_lines()]
            if v.localization:  # attribution.triage.localize_audit: AtP over attn/mlp, its top restore-patched
                lines.append(f"    {v.localization['line']}")
            for f in deg[:max_warnings]:
                where = f"Feature #{f.feature} ({f.category.replace('_', ' ').title()}, {f.hook})"
                readout = (f", encoder readout kept {_f(f.readout_cpfr, '.2f')}"
                           if readout_differs(f.readout_cpfr, f.cpfr) else "")
                if f.damage:  # readable damage (docs/metrics.md); files written before it have none
                    lines.append(f"    Warning: {where} {f.damage} in {v.name}: "
                                 f"{damage_phrase(f.damage, f.mass_ratio, f.mass_kept, f.on_target)} "
                                 f"(CPFR {_f(f.cpfr, '.2f')}{readout})")
                else:
                    lines.append(f"    Warning: {where} degraded by {f.degradation_pct:.0f}% in {v.name}"
                                 + (f" ({readout[2:]})" if readout else ""))
            if len(deg) > max_warnings:
                lines.append(f"    ... and {len(deg) - max_warnings} more degraded safety features")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return json_clean({**self.result_header(),
                           "reference": self.reference, "dataset": self.dataset, "fingerprint": self.fingerprint,
                           "settings": self.settings, "timing": self.timing, "prompts": self.prompts,
                           "variants": [v.to_dict() for v in self.variants],
                           "basis_fidelity": {h: b.to_dict() for h, b in self.basis_fidelity.items()}})

    @classmethod
    def from_dict(cls, d: dict) -> AuditResult:
        cls.check_format(d)
        return cls(d["reference"], d["dataset"], d["fingerprint"], [VariantAudit.from_dict(v) for v in d["variants"]],
                   d["settings"], d.get("timing", {}), d.get("prompts", []), d.get("basis_fidelity") or {})
