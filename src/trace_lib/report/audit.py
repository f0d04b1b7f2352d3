"""The page of a ``trace.audit`` result (:class:`trace_lib.audit.AuditResult`): the verdict per variant, then
every section of the evidence (see :mod:`trace_lib.report.sections`)."""

from __future__ import annotations

from typing import Any

from trace_lib.report.kit import Html, fmt, h, note, section, table, td_num
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


def _variant_rows(variants) -> list:
    return [v for v in variants if v is not None]


def basis_table(fidelity: dict) -> Html | None:
    """The SAEs' quality on the audited prompts beside their training quality (``#basis-table``), with the
    basis warnings; None for a result without it (files written before it)."""
    if not fidelity:
        return None
    rows = [[hk, td_num(b.tokens, "d"), td_num(b.explained_variance), td_num(b.training_explained_variance),
             td_num(b.l0, ".1f"), td_num(b.training_l0, ".1f"), td_num(b.ce_loss_recovered),
             "fits" if b.ok else "WARNING"] for hk, b in fidelity.items()]
    return h("div", [note(w) for b in fidelity.values() for w in b.warnings],
             table(["hook", "tokens", ("EV", "explained variance on the audited tokens (SAELens definition)"),
                    "EV (training)", ("L0", "mean latents firing per audited token"), "L0 (training)",
                    ("CE loss recovered", "on the audited prompts' own tokens"), "basis"], rows,
                   table_id="basis-table",
                   caption="The measurement basis on the prompts being audited: a warning when EV < 0.80 or L0 "
                           "> 2x the training L0 (docs/metrics.md, basis fidelity)."), cls="basis")


def categories_table(variants) -> Html | None:
    """Each variant's verdict per safety category (``#categories-table``); None when the result has one
    category (the verdict line says it all) or was written before category verdicts."""
    rows = []
    for v in variants:
        cats = v.category_verdicts() if hasattr(v, "category_verdicts") else []
        if len(cats) < 2:
            continue
        for c in cats:
            rows.append([v.name, c.category, c.verdict, td_num(c.cpfr), td_num(c.n_features, "d"),
                         td_num(c.n_degraded, "d"), ", ".join(f"{n} {k}" for k, n in sorted(c.damage.items()))])
    if not rows:
        return None
    return table(["variant", "category", "verdict", ("CPFR", "mean CPFR of the category's fingerprint features"),
                  "features", ("degraded", "features with CPFR below the threshold"),
                  ("how", "silenced / over-fired / moved (docs/metrics.md, readable damage)")], rows,
                 table_id="categories-table", caption="The verdict per safety category.")


def probes_section(variants) -> Html:
    """Every linear probe of every variant (``#probes-table``): AUROC and accuracy through the reference and the
    variant with their bootstrap 95% intervals, and the change."""
    rows = []
    for v in variants:
        for p in getattr(v, "probes", None) or []:
            rows.append([v.name, p.category, p.hook, p.method, td_num(p.reference.auroc),
                         f"[{fmt(p.reference.auroc_low, '.2f')}, {fmt(p.reference.auroc_high, '.2f')}]",
                         td_num(p.variant.auroc),
                         f"[{fmt(p.variant.auroc_low, '.2f')}, {fmt(p.variant.auroc_high, '.2f')}]",
                         td_num(p.auroc_diff, "+.3f"),
                         f"[{fmt(p.auroc_diff_low, '+.2f')}, {fmt(p.auroc_diff_high, '+.2f')}]",
                         td_num(p.reference.accuracy), td_num(p.variant.accuracy), td_num(p.train_auroc)])
    if not rows:
        return section("probes", "Linear probes", note("This result has no linear probes (written before them, "
                                                         "or the dataset's train split has no safety prompts)."))
    return section(
        "probes", "Linear probes",
        table(["variant", "category", "hook", ("method", "logistic: L2-regularised logistic regression; "
                                                           "diff_in_means: the difference-in-means direction"),
               ("AUROC ref", "held-out AUROC through the reference"), "95% CI", "AUROC variant", "95% CI",
               ("change", "variant - reference, paired bootstrap"), "95% CI",
               ("accuracy ref", "threshold fixed on the reference's train split"), "accuracy variant",
               ("train AUROC", "on the reference's train split")], rows, table_id="probes-table"),
        intro="A second basis that needs no SAE: per safety category and hook, a probe fitted on the reference's "
              "train-split last-token residuals, scored on the test prompts through the reference and the variant "
              "(docs/metrics.md, linear probes).")


def audit_body(result: Any) -> tuple[list, list, str, str]:
    """Sections, table of contents, title and subtitle of an audit result's page."""
    variants = _variant_rows(result.variants)
    head, blocks = summary_blocks(result.summary())
    blocks_ok = len(blocks) == len(variants)
    cards = [variant_card(v, blocks[i] if blocks_ok else None) for i, v in enumerate(variants)]
    n_warn = sum(bool(v.degraded("safety")) for v in variants)
    verdict = section(
        "verdict", "Verdict", banner(n_warn, len(variants)), h("p", head[0] if head else None, cls="intro"),
        basis_table(getattr(result, "basis_fidelity", {})), categories_table(variants),
        [note(x) for x in head[1:] if not x.startswith("basis")], h("div", cards, cls="cards"),
        h("details", h("summary", "The same verdict as trace prints it"), h("pre", result.summary(),
                                                                             cls="summary")))
    body = [verdict,
            overview_bars(variants),
            models_section(result, variants),
            features_section(variants),
            hooks_section(variants),
            outputs_section([(v.name, v.outputs, v.model) for v in variants]),
            directions_section(result, variants),
            probes_section(variants),
            examples_section(result, variants, {v.name for v in variants if v.degraded("safety")})]
    toc = [("verdict", "Verdict"), ("overview", "Overview"), ("models", "Models & settings"),
           ("features", "Features"), ("hooks", "Hooks"), ("outputs", "Output statistics"),
           ("directions", "Directions"), ("probes", "Linear probes"), ("examples", "Examples")]
    title = f"trace audit: {result.reference.get('name', '?')}"
    sub = (f"{len(result.variants)} variants on {result.dataset.get('name', '?')} "
           f"({result.dataset.get('split', 'test')} split); SAEs at {', '.join(result.settings.get('hooks', []))}")
    return body, toc, title, sub

