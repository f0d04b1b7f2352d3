"""``RepairResult`` (kind ``trace.repair``): what ``trace repair`` measured and chose."""

from __future__ import annotations

from dataclasses import dataclass, field

from trace_lib.repair.accept import rate_text
from trace_lib.results import ResultFile, register_result

RESULT_KIND = "trace.repair"
RESULT_VERSION = 1


@register_result(RESULT_KIND, RESULT_VERSION)
@dataclass
class RepairResult(ResultFile):
    """The search's curves (train split), the behaviour checks (test split) and the chosen config."""

    reference: dict
    target: dict
    keep: str
    train: dict
    test: dict
    candidates: dict
    rankings: dict
    curve: list[dict]
    reached: dict
    confirmations: list[dict]
    chosen: dict | None
    restorations: list[dict] = field(default_factory=list)  # steering / weight-edit candidates (test split)
    direction: dict | None = None  # the reference's refusal direction they restore
    files: dict = field(default_factory=dict)
    kl_text: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.result_header(), **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    @classmethod
    def from_dict(cls, d: dict) -> RepairResult:
        cls.check_format(d)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def summary(self) -> str:
        t, tr, te = self.target, self.train, self.test
        ref_r, ref_o = te["reference"]["refusal"], te["reference"]["over_refusal"]
        ta = te["target"]
        lines = [f"trace repair of {t['config']} ({t['bpw']:.3f} bits per weight over {self.candidates['n']} quantized "
                 f"Linears) against {self.reference['name']}, keeping Linears at {self.keep}",
                 f"train split: refusal gap {tr['gap']:.4g} (teacher-forced log-prob, {tr['n_refused']} refused of "
                 f"{tr['n_harmful']} harmful prompts)",
                 f"test split: reference refuses {100 * ref_r:.1f}% of {te['n_harmful']} harmful, {100 * ref_o:.1f}% of "
                 f"{te['n_harmless']} harmless; {t['config']} refuses "
                 f"{rate_text(ta['refusal'], tuple(ta['refusal_ci95']))} "
                 f"(McNemar one-sided p = {ta['refusal_p']:.3g}), mean KLD {t['kld']:.4f}"]
        bar = self.settings.get("train_bar")
        if self.reached:
            lines.append(f"cheapest set restoring >= {bar:.0%} of the train gap, per method:")
        for m, r in self.reached.items():
            lines.append(f"  {m:<11} " + (f"+{r['extra_bpw']:.3f} bpw ({r['n_modules']} Linears, restored "
                                          f"{r['restored']:.2f})" if r else "not within the budget"))
        if self.direction:
            d = self.direction
            lines.append(f"refusal direction after block {d['layer']} (Cohen's d {d['cohens_d']:.2f} on the train "
                         "split) for steering and weight edits:")
        for c in [*self.confirmations, *self.restorations]:
            a = c["acceptance"]
            extra = f"+{c['extra_bpw']:.3f}" if c["extra_bpw"] >= 0.001 else f"+{c['extra_bpw']:.1e}"
            what = (f"strength {c['details']['strength']:.4g}, " if c["method"] == "steer" else "")
            lines.append(f"  test: {c['method']} at {extra} bpw ({what}train restored {c['restored_train']:.2f}): "
                         f"refusal {rate_text(a['refusal'], tuple(a['refusal_ci95']))}, over-refusal "
                         f"{rate_text(a['over_refusal'], tuple(a['over_refusal_ci95']))}, KLD {c['kld']:.4f}: "
                         f"{'ACCEPTED' if a['accepted'] else 'rejected'} ({a['why']})")
        if self.chosen:
            c = self.chosen
            if c["modules"]:
                lines.append(f"chosen: {c['config']} at {c['bpw']:.3f} bits per weight (+{c['extra_bpw']:.3f}), "
                             f"{len(c['modules'])} Linears kept at {self.keep}: {', '.join(c['modules'][:6])}"
                             + (" ..." if len(c["modules"]) > 6 else ""))
            else:
                lines.append(f"chosen: {c['method']} ({c['config']}) at {c['bpw']:.4f} bits per weight; ships as "
                             f"{c['ships_as']}")
            if c.get("why"):
                lines.append(f"  why: {c['why']}")
            if c.get("audit"):
                a = c["audit"]
                lines.append(f"  audit: safety CPFR {a['safety_cpfr']:.3f}, capability CPFR {a['capability_cpfr']:.3f}, "
                             f"{a['degraded_safety_features']} safety features degraded")
        else:
            lines.append(f"no repair within {self.settings.get('max_bpw', float('nan')):.3f} bits per weight passed the "
                         "test-split check; the best found is listed above")
        precision = next((c for c in self.confirmations if c.get("json") and c["config"] != (self.chosen or {}).get(
            "config")), None)
        if precision:
            lines.append(f"precision config written: {precision['config']} at {precision['bpw']:.3f} bits per weight")
        for k, v in self.files.items():
            lines.append(f"{k}: {v}")
        return "\n".join(lines)
