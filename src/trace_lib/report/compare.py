"""The page of a ``trace.compare`` result (:class:`trace_lib.compare.CompareResult`): output statistics only,
so no safety verdict."""

from __future__ import annotations

from typing import Any

from trace_lib.report.kit import fmt, h, kv_table, section, table, td_num
from trace_lib.report.sections import outputs_section


def compare_body(result: Any) -> tuple[list, list, str, str]:
    """Sections, table of contents, title and subtitle of a compare result's page."""
    ref = result.reference or {}
    text = result.text or {}
    verdict = section(
        "verdict", "Verdict",
        h("div", "Output statistics only: a compare result measures how far each variant's next-token "
                 "distribution moved, not its safety features, so it carries no safety verdict. Run trace audit "
                 "for one.", cls="banner info", id="verdict-banner", data_verdict="NONE"),
        h("pre", result.summary(), cls="summary"))
    models = section(
        "models", "Models & settings",
        kv_table([("reference", ref.get("name")), ("spec", ref.get("spec")), ("architecture", ref.get("architecture")),
                  ("text", text.get("source")), ("text sha256", text.get("sha256")),
                  ("scored tokens", text.get("scored_tokens")), ("chunks", f"{result.n_chunks} of {result.ctx} tokens"),
                  ("reference forward s", fmt(result.reference_forward_seconds, ".2f")),
                  *[(k.replace("_", " "), val) for k, val in (result.settings or {}).items()]]),
        table(["variant", "quantization", "library", "bits/weight", "size MB", "forward s"],
              [[v.name, (v.model or {}).get("quantization") or "none",
                ((v.model or {}).get("quant_info") or {}).get("library", "n/a"),
                td_num(((v.model or {}).get("quant_info") or {}).get("bits_per_weight"), ".2f"),
                td_num(((v.model or {}).get("quant_info") or {}).get("model_size_mb"), ".1f"),
                td_num(v.forward_seconds, ".2f")] for v in result.variants], table_id="variants"))
    body = [verdict, outputs_section([(v.name, v.stats, v.model) for v in result.variants]), models]
    toc = [("verdict", "Verdict"), ("outputs", "Output statistics"), ("models", "Models & settings")]
    title = f"trace compare: {result.reference.get('name', '?')}"
    sub = f"{len(result.variants)} variants; KL-divergence statistics on {result.text.get('source', 'text')}"
    return body, toc, title, sub

