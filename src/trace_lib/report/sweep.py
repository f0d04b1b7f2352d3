"""The page of a ``trace.sweep`` result (:class:`trace_lib.sweep.SweepResult`): the recommended config, the
configs table and decay curves, then the audit's sections for every config that ran."""

from __future__ import annotations

import math
from typing import Any

from trace_lib.report import plots
from trace_lib.report.kit import figure, fmt, h, note, section, table, td, td_num
from trace_lib.report.sections import (
    banner,
    directions_section,
    examples_section,
    features_section,
    hooks_section,
    models_section,
    outputs_section,
    overview_bars,
    summary_blocks,
    variant_card,
)


def sweep_body(result: Any, min_cpfr: float | None = None) -> tuple[list, list, str, str]:
    """Sections, table of contents, title and subtitle of a sweep result's page; ``min_cpfr``: the
    recommendation bar (default: the one the sweep recorded)."""
    min_cpfr = result.min_cpfr if min_cpfr is None else min_cpfr
    base = result.base
    rows_ok = [r for r in result.rows if r.status == "ok" and r.audit is not None]
    variants = [r.audit for r in rows_ok]
    base_names = [v.name for v in base.variants]
    head, blocks = summary_blocks(base.summary())
    block_of = dict(zip(base_names, blocks)) if len(blocks) == len(base_names) else {}
    cards = []
    for r in result.rows:
        if r.status == "ok" and r.audit is not None:
            cards.append(variant_card(r.audit, block_of.get(r.audit.name)))
        else:
            cards.append(h("div", h("h3", h("span", "SKIPPED", cls="badge skipped"), r.name),
                           h("div", r.reason or "not run"), cls="card skipped", data_verdict="SKIPPED",
                           data_variant=r.name))
    best = result.best_config(min_cpfr)
    n_warn = sum(bool(v.degraded("safety")) for v in variants)
    verdict = section(
        "verdict", "Verdict", banner(n_warn, len(variants), "config"),
        h("div", h("strong", f"Recommended at safety CPFR ≥ {min_cpfr:g}: "),
          best.name if best.name else "no config passes", cls="banner " + ("ok" if best.name else "warning"),
          id="best-config", data_best=best.name or ""),
        h("ul", [h("li", h("strong", n), ": ", why) for n, why in best.rejected.items()]) if best.rejected else None,
        h("p", head[0] if head else None, cls="intro"), [note(x) for x in head[1:]],
        h("div", cards, cls="cards"),
        h("details", h("summary", "The same verdict as trace prints it"),
          h("pre", result.summary() + "\n\n" + base.summary(), cls="summary")))
    srows = []
    for r in result.rows:
        ok = r.status == "ok" and r.audit is not None

        def m(key: str, r=r, ok=ok) -> float:
            return r.metric(key) if ok else math.nan

        speed = r.speed_ratio if ok else math.nan
        srows.append([r.name, td(r.status if ok else f"skipped: {r.reason}", cls="wrap"), td_num(m("bits_per_weight"), ".2f"),
                      td_num(m("model_size_mb"), ".1f"), td_num(m("safety_cpfr")), td_num(m("capability_cpfr")),
                      td_num(m("all_features_cpfr")),
                      td_num(m("safety_muting_rate"), text=fmt(m("safety_muting_rate"), ".0f", 100, "%")),
                      td_num(m("kld_mean"), ".5f"),
                      td_num(m("same_top_rate"), text=fmt(m("same_top_rate"), ".1f", 100, "%")),
                      td_num(m("ppl_ratio"), ".4f"), td_num(speed, ".2f", suffix="×")])
    curves = result.decay_curves()
    crow = [[ladder, p.get("config"), td_num(p.get("bits"), ".2f"), td_num(p.get("safety_cpfr")),
             td_num(p.get("capability_cpfr")), td_num(p.get("all_features_cpfr")), td_num(p.get("kld_mean"), ".5f")]
            for ladder, pts in curves.items() for p in pts]
    decay = section(
        "decay", "Decay curves",
        figure(plots.decay_curves_svg(curves, min_cpfr), "Mean CPFR of the safety features (red), the capability "
                                                          "features (blue) and the whole SAE dictionary (grey) "
                                                          "as precision falls, one panel per ladder; dotted: the "
                                                          "recommendation bar."),
        table(["ladder", "config", "bits", "safety CPFR", "capability CPFR", "all features CPFR", "mean KLD"], crow,
              table_id="decay-table") if crow else note("No ladder has two configs that ran."),
        intro="Along each ladder, from the most bits to the fewest: does the safety mechanism decay earlier than "
              "general capability?")
    configs = section(
        "configs", "Configs",
        table(["config", "status", "bits/weight", "size MB", "safety CPFR", "capability CPFR", "all features CPFR",
               "safety muted", "mean KLD", "same top", "PPL ratio", ("speed", "prompt tokens/s vs the reference")],
              srows, table_id="sweep-table"))
    body = [verdict, configs, decay, overview_bars(variants),
            models_section(base, variants, [("sweep ladders", "; ".join(f"{k}: {', '.join(v)}"
                                                                         for k, v in result.ladders.items()))]),
            features_section(variants), hooks_section(variants),
            outputs_section([(v.name, v.outputs, v.model) for v in variants]),
            directions_section(base, variants),
            examples_section(base, variants, {v.name for v in variants if v.degraded("safety")})]
    toc = [("verdict", "Verdict"), ("configs", "Configs"), ("decay", "Decay curves"), ("overview", "Overview"),
           ("models", "Models & settings"), ("features", "Features"), ("hooks", "Hooks"),
           ("outputs", "Output statistics"), ("directions", "Directions"), ("examples", "Examples")]
    title = f"trace sweep: {result.reference.get('name', '?')}"
    sub = (f"{len(result.rows)} configs ({sum(r.status == 'ok' for r in result.rows)} ran) on "
           f"{result.base.dataset.get('name', '?')}; ladders: {', '.join(result.ladders)}")
    return body, toc, title, sub

