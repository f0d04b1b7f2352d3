"""The page of a ``trace.audit`` result (:class:`trace_lib.audit.AuditResult`): the verdict per variant, then
every section of the evidence (see :mod:`trace_lib.report.sections`)."""

from __future__ import annotations

from typing import Any

from trace_lib.report.kit import h, note, section
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


def audit_body(result: Any) -> tuple[list, list, str, str]:
    """Sections, table of contents, title and subtitle of an audit result's page."""
    variants = _variant_rows(result.variants)
    head, blocks = summary_blocks(result.summary())
    blocks_ok = len(blocks) == len(variants)
    cards = [variant_card(v, blocks[i] if blocks_ok else None) for i, v in enumerate(variants)]
    n_warn = sum(bool(v.degraded("safety")) for v in variants)
    verdict = section(
        "verdict", "Verdict", banner(n_warn, len(variants)), h("p", head[0] if head else None, cls="intro"),
        [note(x) for x in head[1:]], h("div", cards, cls="cards"),
        h("details", h("summary", "The same verdict as trace prints it"), h("pre", result.summary(),
                                                                             cls="summary")))
    body = [verdict,
            overview_bars(variants),
            models_section(result, variants),
            features_section(variants),
            hooks_section(variants),
            outputs_section([(v.name, v.outputs, v.model) for v in variants]),
            directions_section(result, variants),
            examples_section(result, variants, {v.name for v in variants if v.degraded("safety")})]
    toc = [("verdict", "Verdict"), ("overview", "Overview"), ("models", "Models & settings"),
           ("features", "Features"), ("hooks", "Hooks"), ("outputs", "Output statistics"),
           ("directions", "Directions"), ("examples", "Examples")]
    title = f"trace audit: {result.reference.get('name', '?')}"
    sub = (f"{len(result.variants)} variants on {result.dataset.get('name', '?')} "
           f"({result.dataset.get('split', 'test')} split); SAEs at {', '.join(result.settings.get('hooks', []))}")
    return body, toc, title, sub

