"""``localize(reference, variant)``: where a variant's refusal gap enters, by every method, in one result.

Steps: the reference's refusals to the harmful prompts (nothing refused: :class:`NoGapError`); the metric and
its gap with a bootstrap interval (an interval containing 0: :class:`NoGapError`); then activation patching
(ground truth), AtP (compared with patching: Spearman's rho, false negatives in the true top 10), weight-error
attribution (weight-only variants) and the refusal direction's decomposition, as asked by ``method``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from trace_lib.attribution.atp import attribution_patch, false_negative_rate, spearman
from trace_lib.attribution.components import KINDS as COMPONENT_POINTS
from trace_lib.attribution.components import Component, resolve
from trace_lib.attribution.decompose import decompose
from trace_lib.attribution.inputs import fit_direction, make_batches, reference_refusals
from trace_lib.attribution.metric import COMPLIANCE, KINDS, Metric, check_gap, gap_interval, metric_values
from trace_lib.attribution.patching import activation_patch, check_pair
from trace_lib.attribution.weights import weight_attribution
from trace_lib.errors import AttributionError
from trace_lib.results import ResultFile, register_result
from trace_lib.validate import POSITIVE_INT, check_choice

if TYPE_CHECKING:
    import torch

RESULT_KIND = "trace.localize"
RESULT_VERSION = 1
METHODS = ("patch", "atp", "weights", "all")
COMPONENT_KINDS = (*COMPONENT_POINTS, "linears")


@register_result(RESULT_KIND, RESULT_VERSION)
@dataclass
class LocalizeResult(ResultFile):
    """Everything ``localize`` measured; method sections are ``None`` when not run (see ``skipped``)."""

    reference: dict
    variant: dict
    metric: dict
    gap: dict
    prompts: dict
    components: list[str]
    patch: list[dict] | None = None
    atp: dict | None = None
    comparison: dict | None = None
    weights: dict | None = None
    decomposition: dict | None = None
    skipped: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.result_header(), **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    @classmethod
    def from_dict(cls, d: dict) -> LocalizeResult:
        cls.check_format(d)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def ranking(self, key: str = "gap_restored") -> list[dict]:
        """Patching results, largest ``key`` (gap_restored or gap_introduced) first."""
        rows = [r for r in (self.patch or []) if r.get(key) is not None]
        return sorted(rows, key=lambda r: -r[key])

    def damage_line(self) -> str | None:
        """"the damage enters mostly at ..." from the top restore-patching components, or None."""
        top = [r for r in self.ranking() if r["gap_restored"] > 0][:3]
        if not top:
            return None
        parts = ", ".join(f"{r['component']} ({100 * r['gap_restored']:.0f}% of the gap restored)" for r in top)
        return f"the damage enters mostly at {parts}"

    def summary(self, n: int = 10) -> str:
        g = self.gap
        lines = [f"{self.variant['name']} vs {self.reference['name']}, metric {self.metric['kind']}: gap "
                 f"{g['value']:.4g} (95% bootstrap {g['lo']:.4g} .. {g['hi']:.4g}) over {g['n']} refused prompts"]
        if (line := self.damage_line()) is not None:
            lines.append(line)
        if self.patch:
            lines.append(f"top {min(n, len(self.patch))} components by restore-patching (fraction of the gap):")
            atp = dict(zip(self.atp["components"], self.atp["fraction"])) if self.atp else {}
            for r in self.ranking()[:n]:
                inj = r.get("gap_introduced")
                lines.append(f"  {r['component']:<14} restored {r['gap_restored']:+.3f}"
                             + (f"  introduced {inj:+.3f}" if inj is not None else "")
                             + (f"  AtP {atp[r['component']]:+.3f}" if r["component"] in atp else ""))
        elif self.atp:
            lines.append("top components by AtP (estimated fraction of the gap):")
            order = np.argsort(-np.asarray(self.atp["fraction"]))[:n]
            lines += [f"  {self.atp['components'][i]:<14} {self.atp['fraction'][i]:+.3f}" for i in order]
        if self.comparison:
            c = self.comparison
            lines.append(f"AtP vs patching over {c['n']} components: Spearman {c['spearman_inject']:.3f} (inject), "
                         f"{c['spearman_restore']:.3f} (restore); false negatives in the true top 10: "
                         f"{100 * c['fnr_top10']:.0f}%"
                         + (f" (GradDrop {100 * c['fnr_top10_graddrop']:.0f}%)" if "fnr_top10_graddrop" in c else ""))
        if self.weights:
            w = self.weights
            lines.append(f"weight matrices by estimated fraction of the gap (measured un-quantize restore where run), "
                         f"{len(w['modules'])} differing Linears:")
            order = np.argsort(-np.asarray(w["fraction_estimate"]), kind="mergesort")[:min(n, 5)]
            for i in order:
                m = w["modules"][i]
                meas = w["restored"].get(m)
                lines.append(f"  {m:<36} est {w['fraction_estimate'][i]:+.3f}"
                             + (f"  measured {meas:+.3f}" if meas is not None else ""))
            if w.get("spearman_checked") is not None:
                lines.append(f"  Spearman(estimate, measured) over {len(w['restored'])} checked: "
                             f"{w['spearman_checked']:.3f}")
        for k, why in self.skipped.items():
            lines.append(f"{k}: skipped ({why})")
        return "\n".join(lines)


def _check_args(method: str, components: Sequence[str] | str | None, metric: str, positions) -> list[str]:
    check_choice("method", method, METHODS)
    check_choice("metric", metric, KINDS)
    kinds = [components] if isinstance(components, str) else list(components or ())
    for k in kinds:
        if k in COMPONENT_KINDS:
            continue
        Component.parse(k)  # a component name, e.g. L3.mlp; unknown text raises
    if isinstance(positions, str) and positions not in ("all", "last"):
        raise AttributionError(f"positions must be 'all', 'last' or offsets from the last prompt token, "
                               f"not {positions!r}")
    return kinds


def _prompts(dataset, split: str | None, n_prompts: int | None) -> tuple[list[str], list[str], list[str], list[str]]:
    from trace_lib.datasets.registry import get_dataset

    ds = get_dataset(dataset)
    test = ds.split(split) if split else ds
    harmful, harmless = test.texts("safety"), test.texts("baseline")
    try:
        train = ds.split("train")
        fit_pos, fit_neg = train.texts("safety"), train.texts("baseline")
    except Exception:  # noqa: BLE001 - a dataset without a train split: fit on the measured prompts
        fit_pos, fit_neg = [], []
    if not fit_pos or not fit_neg or split == "train":
        fit_pos, fit_neg = harmful, harmless
    if n_prompts is not None:
        harmful = harmful[:n_prompts]
    return harmful, harmless, fit_pos, fit_neg


def localize(model="default-safety", variant="gguf-q4_0", method: str = "all",
             components: Sequence[str] | str | None = None, metric: str = "refusal-logprob",
             dataset="harmful_refusal_v1", split: str | None = "test", n_prompts: int | None = None,
             positions: str | Sequence[int] = "all", batch_size: int = 8, reply_tokens: int = 4,
             compliance: str = COMPLIANCE, refusal_reply: str | None = None, max_new_tokens: int = 24,
             direction_layer: int | None = None, graddrop: bool = False, n_boot: int = 1000, seed: int = 0,
             n_weight_check: int = 20, with_decomposition: bool = True, verify_top: int = 0,
             device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> LocalizeResult:
    """Localise ``variant``'s refusal gap against ``model`` (specs or loaded models); see the module docstring.
    ``device`` and ``dtype`` place a ``model`` given as a spec (:func:`~trace_lib.models.load.ensure_loaded`).

    ``components``: kinds (resid, attn, mlp, heads, linears) or names (L3.mlp); default attn + mlp, and
    ``linears`` (the weights method) for ``method="all"``. With ``method="atp"`` and ``verify_top`` k > 0, the
    k components AtP ranks highest are then restore-patched (AtP ranks, patching verifies the top of the list),
    so the ranking and :meth:`LocalizeResult.damage_line` rest on patching at about (3 + k/2) forwards.
    """
    kinds = _check_args(method, components, metric, positions)
    if verify_top:
        POSITIVE_INT.check("verify_top", verify_top)
    for name, v in (("batch_size", batch_size), ("reply_tokens", reply_tokens), ("n_boot", n_boot),
                    ("n_prompts", n_prompts), ("max_new_tokens", max_new_tokens)):
        POSITIVE_INT.check(name, v)
    from trace_lib.compare import resolve_variant
    from trace_lib.models.load import ensure_loaded

    t_start = time.perf_counter()
    ref = ensure_loaded(model, device, dtype)
    var = resolve_variant(ref, variant)
    check_pair(ref, var)
    want_weights = method == "weights" or "linears" in kinds or (method == "all" and not kinds)
    act_kinds = [k for k in kinds if k != "linears"]
    only_linears = bool(kinds) and not act_kinds
    comps = [] if method == "weights" or only_linears else resolve(ref, act_kinds or None)
    if method in ("patch", "atp") and not comps:
        raise AttributionError(f"method {method} needs activation components (resid, attn, mlp, heads), not only "
                               "linears")
    harmful, harmless, fit_pos, fit_neg = _prompts(dataset, split, n_prompts)
    refusals = reference_refusals(ref, harmful, refusal_reply, max_new_tokens)
    refusals.check()
    kept, replies = refusals.kept
    seconds: dict[str, float] = {}
    skipped: dict[str, str] = {}
    direction = None
    if metric == "direction" or with_decomposition:
        if fit_neg:
            t0 = time.perf_counter()
            direction = fit_direction(ref, fit_pos, fit_neg, direction_layer)
            seconds["direction"] = time.perf_counter() - t0
        elif metric == "direction":
            raise AttributionError("the direction metric needs harmless prompts (label baseline) in the dataset")
        else:
            skipped["decomposition"] = "the dataset has no harmless prompts to fit a refusal direction on"
    met = Metric(metric, direction.r_hat if metric == "direction" else None,
                 direction.layer if metric == "direction" else None)
    window = getattr(getattr(ref.model, "config", None), "sliding_window", None)
    batches = make_batches(ref.tokenizer, kept, metric, replies, batch_size, reply_tokens, compliance,
                           share_prefix=isinstance(positions, str), window=window)
    t0 = time.perf_counter()
    import torch

    with torch.no_grad():
        m_ref = torch.cat([metric_values(ref, b, met) for b in batches])
        m_var = torch.cat([metric_values(var, b, met) for b in batches])
    gap = check_gap(gap_interval(m_ref, m_var, n_boot, seed), var.name)
    seconds["gap"] = time.perf_counter() - t0
    result = LocalizeResult(ref.describe(), var.describe(), {**met.describe(), "compliance": compliance,
                            "reply_tokens": reply_tokens, "direction": direction.to_dict() if direction else None},
                            gap.to_dict(), {"dataset": str(dataset), "split": split, "n_harmful": len(harmful),
                                            "n_refused": len(kept), "replies": refusals.source},
                            [c.name for c in comps], skipped=skipped, seconds=seconds,
                            settings={"method": method, "positions": positions, "batch_size": batch_size,
                                      "graddrop": graddrop, "n_boot": n_boot, "seed": seed})
    if method in ("patch", "all") and comps:
        run = activation_patch(ref, var, batches, met, comps, positions)
        result.patch = [r.to_dict() for r in run.results]
        seconds["patch"] = run.seconds
        result.settings["patch_forwards"] = run.n_forward
    if method in ("atp", "all") and comps:
        atp = attribution_patch(ref, var, batches, met, comps, positions, graddrop=graddrop, gap=gap.value)
        result.atp = atp.to_dict()
        seconds["atp"] = atp.seconds
        if method == "atp" and verify_top:
            top = [comps[i] for i in np.argsort(-np.asarray(atp.fraction), kind="stable")[:verify_top]]
            run = activation_patch(ref, var, batches, met, top, positions, modes=("restore",))
            result.patch = [r.to_dict() for r in run.results]
            seconds["patch"] = run.seconds
            result.settings.update(verified_top=verify_top, patch_forwards=run.n_forward)
    if result.patch is not None and result.atp is not None and not verify_top:
        inj = [r["gap_introduced"] for r in result.patch]
        res = [r["gap_restored"] for r in result.patch]
        result.comparison = {"n": len(inj), "spearman_inject": spearman(result.atp["fraction"], inj),
                             "spearman_restore": spearman(result.atp["fraction"], res),
                             "fnr_top10": false_negative_rate(inj, result.atp["fraction"], 10),
                             "fnr_top10_restore": false_negative_rate(res, result.atp["fraction"], 10)}
        if result.atp.get("graddrop"):
            result.comparison["fnr_top10_graddrop"] = false_negative_rate(inj, result.atp["graddrop"], 10)
    if want_weights:
        try:
            w = weight_attribution(ref, var, batches, met, gap.value, float(m_var.double().mean()),
                                   n_top=n_weight_check, n_random=n_weight_check, seed=seed)
        except AttributionError as e:
            if method == "weights" or "linears" in kinds:
                raise
            skipped["weights"] = str(e)
        else:
            result.weights = w.to_dict()
            checked = list(w.restored)
            est = dict(zip(w.modules, w.fraction_estimate))
            result.weights["spearman_checked"] = spearman([est[m] for m in checked], [w.restored[m] for m in checked])
            seconds["weights"] = w.seconds_estimate + w.seconds_exact
    if direction is not None and with_decomposition:
        t0 = time.perf_counter()
        dir_batches = make_batches(ref.tokenizer, kept, "direction", batch_size=batch_size, window=window)
        result.decomposition = {"layer": direction.layer,
                                "reference": decompose(ref, dir_batches, direction.r_hat, direction.layer).to_dict(),
                                "variant": decompose(var, dir_batches, direction.r_hat, direction.layer).to_dict()}
        seconds["decomposition"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    return result
