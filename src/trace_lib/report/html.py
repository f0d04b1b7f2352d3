"""One self-contained HTML page for a trace result: the verdict first, then the evidence.

>>> from trace_lib.report import render_html, write_html
>>> write_html(load_result("trace-out/audit.json"), "trace-out/audit.html")

This module only dispatches: one body module per result kind (:mod:`~trace_lib.report.audit`,
:mod:`~trace_lib.report.sweep`, :mod:`~trace_lib.report.compare`, :mod:`~trace_lib.report.redteam`,
:mod:`~trace_lib.report.tracer`, :mod:`~trace_lib.report.localize`, :mod:`~trace_lib.report.graph`) makes the sections, title and subtitle, and :func:`trace_lib.report.kit.page`
wraps them in the self-contained page shell (see :mod:`trace_lib.report.kit` for escaping and the CSP).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from trace_lib.cache import atomic_write_text
from trace_lib.report.audit import audit_body
from trace_lib.report.compare import compare_body
from trace_lib.report.graph import graph_body
from trace_lib.report.kit import page
from trace_lib.report.load import load_result, result_kind
from trace_lib.report.localize import localize_body
from trace_lib.report.redteam import redteam_body
from trace_lib.report.repair import repair_body
from trace_lib.report.sweep import sweep_body
from trace_lib.report.tracer import tracer_body

# result kind -> its page body: result -> (sections, table of contents, title, subtitle)
BODIES: dict[str, Callable[..., tuple[list, list, str, str]]] = {
    "trace.audit": audit_body, "trace.sweep": sweep_body, "trace.compare": compare_body,
    "trace.redteam": redteam_body, "trace.tracer": tracer_body, "trace.localize": localize_body,
    "trace.repair": repair_body, "trace.graph": graph_body}


def render_html(result: Any, *, min_cpfr: float | None = None) -> str:
    """The report page of a result object (AuditResult, SweepResult, CompareResult, a red-team result, a
    ModelTracer or its ``to_dict()``), a result dict, or a result file's path. ``min_cpfr``: a sweep's
    recommendation bar (default: the one the sweep recorded)."""
    if isinstance(result, (str, Path)) or (isinstance(result, Mapping) and not hasattr(result, "kind")):
        result = load_result(result)
    kind = result_kind(result)
    if kind == "trace.sweep":
        body, toc, title, sub = sweep_body(result, min_cpfr)
    else:
        body, toc, title, sub = BODIES[kind](result)
    return page(title, sub, body, toc)


def write_html(result: Any, path: str | Path, **kw: Any) -> Path:
    """Render ``result`` (see :func:`render_html`) and write it to ``path`` atomically."""
    return atomic_write_text(path, render_html(result, **kw))
