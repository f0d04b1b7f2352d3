"""The audit's evidence, one section each: verdict cards, overview, models & settings, features, hooks, output
statistics (KL), directions and degraded-feature examples. The audit page shows them all; the sweep page shows
them for its configs, and the compare page its output statistics.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from trace_lib.report import plots
from trace_lib.report.kit import (
    Html,
    figure,
    fmt,
    fmt_unc,
    h,
    kv_table,
    note,
    num,
    section,
    sort_key,
    table,
    td,
    td_num,
)

# ------------------------------------------------------------------------------------------------ verdict
_BLOCK = re.compile(r"^\[(WARNING|ok)\] ")


def summary_blocks(text: str) -> tuple[list[str], list[list[str]]]:
    """Split ``AuditResult.summary()`` into its header lines and one block of lines per variant."""
    head: list[str] = []
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if _BLOCK.match(line):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line.strip())
        else:
            head.append(line)
    return head, blocks


def variant_card(v, block: list[str] | None, extra: Sequence[Any] = ()) -> Html:
    """One variant's verdict: WARNING when any safety feature is degraded (``VariantAudit.degraded``, the
    test ``summary()`` uses), with ``summary()``'s own lines for it as the reasons."""
    deg = v.degraded("safety")
    status = "warning" if deg else "ok"
    n_safety = sum(f.kind == "safety" for f in v.features)
    if block and _BLOCK.match(block[0]):
        headline = block[0].split(": ", 1)[1] if ": " in block[0] else block[0]
        reasons = block[1:]
    else:  # summary() changed shape: say the same thing from the numbers
        headline = (f"safety CPFR {fmt(v.safety_cpfr)} vs capability CPFR {fmt(v.capability_cpfr)}; {len(deg)}/"
                    f"{n_safety} safety features degraded (CPFR < {v.degradation_threshold})")
        reasons = []
    caveat = None
    if n_safety == 0:
        caveat = note("The fingerprint has no safety features at these hooks, so no safety feature can be "
                      "degraded: this OK rests on no feature evidence (see the directions and outputs).")
    return h("div",
             h("h3", h("span", "WARNING" if deg else "OK", cls=f"badge {status}"), v.name),
             h("div", headline, cls="headline"),
             h("ul", [h("li", r) for r in reasons]) if reasons else None,
             caveat, list(extra),
             cls=f"card {status}", data_verdict=status.upper(), data_variant=v.name)


def banner(n_warn: int, n: int, what: str = "variant") -> Html:
    """The page's verdict banner (``#verdict-banner``): WARNING when any audited variant has a degraded safety feature."""
    if n == 0:
        return h("div", f"No {what}s were audited.", cls="banner info", id="verdict-banner", data_verdict="NONE")
    if n_warn:
        return h("div", f"WARNING: {n_warn} of {n} {what}s have degraded safety features.", cls="banner warning",
                 id="verdict-banner", data_verdict="WARNING")
    return h("div", f"OK: none of the {n} {what}s has a degraded safety feature.", cls="banner ok",
             id="verdict-banner", data_verdict="OK")


# ------------------------------------------------------------------------------------------------ audit parts
def models_section(base, variants, extra_rows: Sequence[tuple[str, Any]] = ()) -> Html:
    """Models & settings: reference, variants, data, settings (plus ``extra_rows``), fingerprint, SAEs, timing."""
    ref = base.reference or {}
    ds = base.dataset or {}
    st = base.settings or {}
    fp = base.fingerprint or {}
    meta = fp.get("metadata", {}) or {}
    kl = ds.get("kl_text", {}) or {}
    ref_items = [("name", ref.get("name")), ("spec", ref.get("spec")), ("architecture", ref.get("architecture")),
                 ("layers", ref.get("n_layers")), ("d_model", ref.get("d_model")), ("dtype", ref.get("dtype")),
                 ("device", ref.get("device")), ("content hash", ref.get("content_hash"))]
    ds_items = [("dataset", ds.get("name")), ("split", ds.get("split")),
                ("test prompts", f"{ds.get('n_safety', 'n/a')} safety, {ds.get('n_baseline', 'n/a')} baseline, "
                                 f"{ds.get('n_capability', 'n/a')} capability"),
                ("capability dataset", ds.get("capability_dataset")), ("sha256", ds.get("sha256")),
                ("KL text", f"{kl.get('source', 'n/a')}; {kl.get('chunks', 'n/a')} chunks of {kl.get('ctx', 'n/a')} "
                            f"tokens" if kl else None)]
    set_items = [("hooks", ", ".join(st.get("hooks", []) or [])),
                 ("degradation threshold", f"CPFR < {st.get('degradation_threshold', 'n/a')}"),
                 ("token set", st.get("token_set")), ("seed", st.get("seed")),
                 ("fingerprint positions", f"{meta.get('positions', 'n/a')} ({meta.get('reduce', 'n/a')})"
                  if meta else None),
                 ("fingerprint selection", f"top {meta.get('top_k')} per category, AUROC >= {meta.get('min_auroc')}, "
                                           f"BH alpha {meta.get('alpha')}" if meta.get("top_k") else None),
                 ("statistics", meta.get("statistics")), *extra_rows]
    n_feat = fp.get("n_features", {}) or {}
    fp_rows = []
    for cat, ev in (fp.get("reference_eval", {}) or {}).items():
        dir_auc = ev.get("direction_auroc", {}) or {}
        fp_rows.append([cat, td_num(n_feat.get(cat, ev.get("n_features")), "d"), td_num(ev.get("score_auroc")),
                        "; ".join(f"{hk}: {fmt(a)}" for hk, a in dir_auc.items()) or "n/a",
                        td_num(ev.get("n_safety"), "d"), td_num(ev.get("n_baseline"), "d")])
    sae_rows = []
    for hook, s in (st.get("saes", {}) or {}).items():
        q = (s or {}).get("quality") or {}
        sae_rows.append([hook, td_num(s.get("d_sae"), "d"), s.get("architecture", "n/a"),
                         td_num(q.get("explained_variance")), td_num(q.get("l0"), ".1f"),
                         td_num(q.get("dead_fraction"), ".1%", text=fmt(q.get("dead_fraction"), ".1f", 100, "%")),
                         td_num(q.get("dense_fraction"), ".1%", text=fmt(q.get("dense_fraction"), ".1f", 100, "%")),
                         td_num(q.get("ce_loss_recovered")), td_num(q.get("tokens"), "d")])
    var_rows = []
    for v in variants:
        m = v.model or {}
        q = m.get("quant_info", {}) or {}
        var_rows.append([v.name, m.get("quantization") or "none", q.get("library", "n/a"),
                         td(q.get("path", "n/a"), cls="wrap"),
                         td_num(q.get("bits_per_weight"), ".2f"), td_num(q.get("quantized_bits_per_weight"), ".2f"),
                         td_num(q.get("model_size_mb"), ".1f"), td_num(q.get("seconds_to_build"), ".2f"),
                         td_num((v.timing or {}).get("total_s"), ".2f")])
    timing = base.timing or {}
    return section(
        "models", "Models & settings",
        h("h3", "Reference"), kv_table(ref_items),
        h("h3", "Variants"),
        table(["variant", "quantization", "library", "path", ("bits/weight", "whole model, all parameters"),
               ("quantized bits/weight", "of the quantized tensors only"), "size MB", "build s", "audit s"],
              var_rows, table_id="variants"),
        h("h3", "Data"), kv_table(ds_items),
        h("h3", "Settings"), kv_table(set_items),
        h("h3", "Safety fingerprint (reference, held-out test split)"),
        table(["category", "features", ("score AUROC", "held-out AUROC of the fingerprint score"),
               ("direction AUROC", "held-out AUROC of the difference-in-means direction, per hook"),
               "safety prompts", "baseline prompts"], fp_rows, table_id="fingerprint")
        if fp_rows else note("The result has no fingerprint evaluation."),
        note(f"Capability features: {fp.get('n_capability_features', 'n/a')}."),
        h("h3", "SAEs (fitted on the reference only)"),
        table(["hook", "d_sae", "architecture", "explained variance", "L0", "dead", "dense", "CE loss recovered",
               "eval tokens"], sae_rows, table_id="saes") if sae_rows else note("No SAE details recorded."),
        h("h3", "Timing"),
        kv_table([(k.replace("_", " "), fmt(val, ".2f") if isinstance(val, (int, float)) else val)
                  for k, val in timing.items()]) if timing else None)


FEATURE_COLS = [
    ("variant", None), ("hook", None), ("feature", None), ("kind", "safety: selected for a safety category; "
                                                          "capability: for a capability task"),
    ("category", None), ("train AUROC", "AUROC of the feature on the train split (reference)"),
    ("CPFR", "cross-precision feature retention: 1 = kept as in the reference"),
    ("degradation %", "100 x (1 - CPFR)"),
    ("damage", "what happened (docs/metrics.md, readable damage): silenced, over-fired, moved or kept"),
    ("mass kept", "variant / reference activation on the tokens the feature fires on in the reference"),
    ("mass ratio", "variant / reference activation over all tokens"), ("rel. mean change", "relative change of the mean activation"),
    ("norm. Wasserstein", "Wasserstein distance of the activation distributions / reference scale"),
    ("firing ref", "fraction of tokens the feature fires on, reference"),
    ("firing variant", "fraction of tokens the feature fires on, variant"),
    ("token muting", "fraction of the reference's firing tokens where the variant is silent"),
    ("muted", "the feature counts as muted"),
    ("prompt act. kept", "mean per-prompt activation (post-instruction max), variant / reference"),
    ("readout CPFR", "CPFR of the latent's encoder readout max(0, W_enc x + b_enc) before a TopK or JumpReLU "
                     "selection: a low CPFR with a high readout CPFR is a code switched at the selection boundary, "
                     "not a changed detector (for a ReLU SAE, trace's default, the two are equal)"),
]
CPFR_COL = 6


def features_section(variants) -> Html:
    """Every fingerprint feature of every variant in one sortable, filterable table."""
    rows, attrs = [], []
    kinds, cats, hooks = set(), set(), set()
    for v in variants:
        thr = v.degradation_threshold
        order = sorted(v.features, key=lambda f: (f.kind != "safety", math.isnan(num(f.cpfr)), num(f.cpfr)
                                                  if not math.isnan(num(f.cpfr)) else 0.0, f.hook, f.feature))
        for f in order:
            degraded = not math.isnan(num(f.cpfr)) and f.cpfr < thr
            kinds.add(f.kind)
            cats.update(c for c in str(f.category).split(",") if c)
            hooks.add(f.hook)
            rows.append([v.name, f.hook, td_num(f.feature, "d"), f.kind, f.category, td_num(f.train_auroc),
                         td_num(f.cpfr, cls="num cpfr"), td_num(f.degradation_pct, ".1f"),
                         getattr(f, "damage", ""), td_num(getattr(f, "mass_kept", math.nan)),
                         td_num(getattr(f, "mass_ratio", math.nan)),
                         td_num(f.relative_mean_change, "+.3f"), td_num(f.normalized_wasserstein),
                         td_num(f.firing_rate_ref, ".3f"), td_num(f.firing_rate_variant, ".3f"),
                         td_num(f.token_muting_rate), "yes" if f.muted else "no",
                         td_num(f.prompt_activation_kept), td_num(getattr(f, "readout_cpfr", float("nan")))])
            attrs.append({"data_variant": v.name, "data_kind": f.kind, "data_category": f.category,
                          "data_hook": f.hook, "data_degraded": "1" if degraded else "0",
                          "cls": "degraded" if degraded else None})
    if not rows:
        return section("features", "Features", note("The fingerprint has no features at these hooks."))

    def select(field: str, label: str, values: Iterable[str]) -> Html:
        return h("label", f"{label} ", h("select", h("option", "all", value=""),
                                         [h("option", x, value=x) for x in sorted(values)], data_field=field))

    filters = h("div", select("variant", "variant", {v.name for v in variants}), select("kind", "kind", kinds),
                select("category", "category", cats), select("hook", "hook", hooks),
                h("label", h("input", type="checkbox", data_field="degraded"), " degraded only"),
                h("output", f"{len(rows)} rows"), cls="filters", data_filter_for="features-table")
    return section(
        "features", "Features",
        filters,
        table([c if t is None else (c, t) for c, t in FEATURE_COLS], rows, table_id="features-table",
              cls="sortable compact", wrap_cls="table-wrap tall", row_attrs=attrs,
              caption="Every fingerprint feature in every variant, safety features first, worst first. Click a "
                      "header to sort; rows with a red CPFR are degraded (below the threshold)."),
        intro="CPFR, drift and muting of every safety and capability feature of the fingerprint, measured with "
              "the reference's SAEs on the same prompt tokens of reference and variant.")


def hooks_section(variants) -> Html:
    """Per hook: the features' and the whole SAE dictionary's CPFR per variant (figure and table)."""
    rows = []
    hooks: list[str] = []
    feats: dict[tuple[str, str], dict[str, list]] = {}
    whole: dict[tuple[str, str], float] = {}
    for v in variants:
        for hk, s in (v.hooks or {}).items():
            if hk not in hooks:
                hooks.append(hk)
            rows.append([v.name, hk, td_num(s.get("tokens"), "d"), td_num(s.get("cpfr_all_features")),
                         td_num(s.get("cpfr_median_all_features")), td_num(s.get("active_features"), "d"),
                         td_num(s.get("degraded_features_all"), "d"), td_num(s.get("smeared_pairs"), "d")])
            whole[(hk, v.name)] = num(s.get("cpfr_all_features"))
        for f in v.features:
            feats.setdefault((f.hook, v.name), {}).setdefault(f.kind, []).append(f.cpfr)
    thr = variants[0].degradation_threshold if variants else None
    svg = plots.hook_cpfr_svg(hooks, [v.name for v in variants], feats, whole, thr)
    return section(
        "hooks", "Per-hook CPFR",
        figure(svg, "Per hook: each fingerprint feature's CPFR (points) and the whole SAE dictionary's CPFR "
                     "(grey bar) per variant; dotted: the degradation threshold."),
        table(["variant", "hook", "tokens", ("CPFR all features", "the whole SAE dictionary"),
               "median CPFR", "active features", ("degraded (all)", "features of the whole dictionary below the "
                                                                   "threshold"),
               ("smeared pairs", "fingerprint feature pairs whose activation moved from one to the other")],
              rows, table_id="hooks-table"))


def outputs_section(named_stats: Sequence[tuple[str, Any, dict]], intro: str | None = None) -> Html:
    """``named_stats``: (variant name, OutputStats or None, model dict)."""
    rows, prow = [], []
    per: dict[str, dict] = {}
    for name, s, model in named_stats:
        if s is None:
            continue
        q = (model or {}).get("quant_info", {}) or {}
        rows.append([name, td_num(q.get("bits_per_weight"), ".2f"), td_num(s.n_tokens, "d"),
                     td_num(s.kld_mean, text=fmt_unc(s.kld_mean, s.kld_mean_unc, ".5f")),
                     td_num(s.kld_percentiles.get("median"), ".5f"), td_num(s.kld_percentiles.get("99"), ".4f"),
                     td_num(s.kld_percentiles.get("99.9"), ".4f"), td_num(s.kld_percentiles.get("max"), ".4f"),
                     td_num(s.same_top_rate, text=fmt_unc(s.same_top_rate, s.same_top_unc, ".2f", 100, "%")),
                     td_num(s.dp_rms, text=fmt_unc(s.dp_rms, s.dp_rms_unc, ".3f", 100, "%")),
                     td_num(s.dp_mean, text=fmt_unc(s.dp_mean, s.dp_mean_unc, ".3f", 100, "%")),
                     td_num(s.ppl_q, text=fmt_unc(s.ppl_q, s.ppl_q_unc, ".4f")),
                     td_num(s.ppl_base, text=fmt_unc(s.ppl_base, s.ppl_base_unc, ".4f")),
                     td_num(s.ppl_ratio, text=fmt_unc(s.ppl_ratio, s.ppl_ratio_unc, ".4f")),
                     td_num(s.ln_ppl_ratio_mean, text=fmt_unc(s.ln_ppl_ratio_mean, s.ln_ppl_ratio_unc, ".5f")),
                     td_num(s.ln_prob_correlation, text=fmt(s.ln_prob_correlation, ".2f", 100, "%"))])
        prow.append([name] + [td_num(s.kld_percentiles.get(k), ".5f") for k in plots.KLD_PERCENTILES])
        per[name] = s.kld_percentiles
    if not rows:
        return section("outputs", "Output statistics", note("No output statistics in this result."))
    svg = plots.kld_percentiles_svg(per)
    return section(
        "outputs", "Output statistics (KL divergence)",
        table(["variant", "bits/weight", "scored tokens", ("mean KLD", "KL(reference || variant) per token, "
                                                                       "mean ± its standard error"),
               "median KLD", "99% KLD", "99.9% KLD", "max KLD", ("same top", "the variant's top token is the "
                                                                             "reference's"),
               ("RMS Δp", "RMS of the change in the probability of the correct token"), "mean Δp", "PPL(Q)",
               "PPL(base)", "PPL(Q)/PPL(base)", "ln(PPL(Q)/PPL(base))", ("Cor(ln p)", "correlation of per-token "
                                                                                       "log-probabilities")],
              rows, table_id="kl-table"),
        figure(svg, "Percentiles of the per-token KL divergence (log scale)."),
        h("h3", "KLD percentiles"),
        table(["variant"] + [k if k in ("min", "max", "median") else f"{k}%" for k in plots.KLD_PERCENTILES], prow,
              table_id="kld-percentiles"),
        intro=intro or "llama-perplexity --kl-divergence statistics of each variant against the reference on the "
                       "same English text (second half of each chunk scored); ± is one standard error.")


def directions_section(base, variants) -> Html:
    """Safety directions of reference and variant, and the fingerprint's held-out separation."""
    ref_eval = (base.fingerprint or {}).get("reference_eval", {}) or {}
    rows, erows = [], []
    for v in variants:
        cats = (v.fingerprint_eval or {}).get("categories", {}) or {}
        for d in v.directions or []:
            cat, hk = d.get("category"), d.get("hook")
            a_ref = (ref_eval.get(cat, {}) or {}).get("direction_auroc", {}).get(hk)
            a_var = (cats.get(cat, {}) or {}).get("direction_auroc", {}).get(hk)
            rows.append([v.name, cat, hk, td_num(d.get("cosine")), td_num(d.get("projection_magnitude_kept")),
                         td_num(d.get("norm_ratio")), td_num(d.get("separation_ref")), td_num(d.get("separation_quant")),
                         td_num(a_ref), td_num(a_var)])
        for cat, ev in cats.items():
            erows.append([v.name, cat, td_num((ref_eval.get(cat, {}) or {}).get("score_auroc")),
                          td_num(ev.get("score_auroc")), td_num(ev.get("n_features"), "d")])
    if not rows and not erows:
        return section("directions", "Directions", note("No direction measurements in this result."))
    return section(
        "directions", "Directions & fingerprint separation",
        table(["variant", "category", "hook", ("cosine", "cosine of the variant's difference-in-means direction "
                                                         "with the reference's"),
               ("projection magnitude kept", "how much of the reference's safety-vs-baseline separation along the "
                                             "reference direction survives (1 = all)"),
               "norm ratio", "separation ref", "separation variant", "direction AUROC ref", "direction AUROC variant"],
              rows, table_id="directions-table") if rows else None,
        h("h3", "Fingerprint score, held-out AUROC"),
        table(["variant", "category", "AUROC reference", "AUROC through the variant", "features"], erows,
              table_id="fingerprint-eval") if erows else None,
        intro="The safety direction (difference of means, safety minus baseline prompts) of each hook in the "
              "reference and in the variant, and how well the fingerprint still separates held-out prompts.")


def _context(text: Any) -> str:
    return str(text if text is not None else "").replace("\n", "⏎")


def examples_section(base, variants, open_variants: set[str]) -> Html:
    """Token examples of the degraded features, reference and variant activations side by side."""
    prompts = base.prompts or []
    blocks = []
    for v in variants:
        by_key = {(f.hook, int(f.feature)): f for f in v.features}
        feats = []
        for hk, s in (v.hooks or {}).items():
            for fid, exs in ((s or {}).get("examples", {}) or {}).items():
                try:
                    key = (hk, int(fid))
                except (TypeError, ValueError):
                    continue
                if exs:
                    feats.append((by_key.get(key), hk, key[1], exs))
        feats.sort(key=lambda t: (t[0] is None or t[0].kind != "safety",
                                  num(t[0].cpfr) if t[0] is not None and not math.isnan(num(t[0].cpfr)) else 9.0,
                                  t[1], t[2]))
        if not feats:
            continue
        parts = []
        for f, hk, fid, exs in feats:
            head = [h("strong", f"Feature #{fid}"), f" at {hk}"]
            if f is not None:
                head += [f" — {f.kind}, {f.category}; CPFR ", h("strong", fmt(f.cpfr)), f", degraded by "
                         f"{fmt(f.degradation_pct, '.0f')}%"
                         + (f", {f.damage_text}" if getattr(f, "damage", "") else "") + f", muted: {'yes' if f.muted else 'no'}"]
            rows = []
            for ex in exs:
                pi = ex.get("prompt")
                full = prompts[pi] if isinstance(pi, int) and 0 <= pi < len(prompts) else None
                ref_a, var_a = num(ex.get("ref")), num(ex.get("variant"))
                kept = var_a / ref_a if ref_a and not math.isnan(ref_a) and not math.isnan(var_a) else math.nan
                rows.append([h("td", fmt(pi, "d"), cls="num", data_sort=sort_key(pi) or "", title=full),
                             h("td", _context(ex.get("left")), h("mark", _context(ex.get("token")), cls="tok"),
                               _context(ex.get("right")), cls="ctx"),
                             td_num(ref_a), td_num(var_a), td_num(kept, ".2f")])
            parts.append(h("div", h("p", head),
                           table(["prompt", "context (the token highlighted)", "reference activation",
                                  "variant activation", "kept"], rows), cls="example"))
        blocks.append(h("details", h("summary", f"{v.name}: {len(feats)} features"), parts,
                        open=v.name in open_variants, data_variant=v.name))
    if not blocks:
        return section("examples", "Degraded-feature examples", note("This result has no token examples."))
    return section(
        "examples", "Degraded-feature examples", blocks,
        intro="For the most degraded fingerprint features of each hook: the tokens where the reference activates "
              "the feature most, with the variant's activation on the same tokens. Hover a prompt number for the "
              "whole prompt.")


def overview_bars(variants) -> Html:
    """One row per variant: verdict, safety vs capability CPFR (figure and table), muting and KL."""
    thr = variants[0].degradation_threshold if variants else None
    svg = plots.cpfr_bars_svg([v.name for v in variants], [v.safety_cpfr for v in variants],
                              [v.capability_cpfr for v in variants], thr)
    rows = [[v.name, h("td", "WARNING" if v.degraded("safety") else "OK", cls="verdict"),
             td_num(v.safety_cpfr), td_num(v.capability_cpfr),
             td_num(v.safety_cpfr - v.capability_cpfr, "+.3f"),
             td_num(len(v.degraded("safety")), "d"), td_num(sum(f.kind == "safety" for f in v.features), "d"),
             td_num(v.muting_rate("safety"), text=fmt(v.muting_rate("safety"), ".0f", 100, "%")),
             td_num(len(v.degraded("capability")), "d"),
             td_num(v.outputs.kld_mean if v.outputs else None, ".5f"),
             td_num(v.outputs.same_top_rate if v.outputs else None,
                    text=fmt(v.outputs.same_top_rate if v.outputs else None, ".1f", 100, "%"))]
            for v in variants]
    return section(
        "overview", "Overview",
        table(["variant", "verdict", "safety CPFR", "capability CPFR", ("gap", "safety minus capability CPFR"),
               "safety degraded", "safety features", "safety muted", "capability degraded", "mean KLD", "same top"],
              rows, table_id="overview-table"),
        figure(svg, "Mean CPFR of the fingerprint's safety features next to its capability features; a safety "
                     "bar well below the capability bar means quantization hit the safety mechanism harder."))

