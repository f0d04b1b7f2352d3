"""``trace report``: one self-contained HTML page for an audit, sweep, compare or red-team result.

>>> from trace_lib.report import load_result, write_html
>>> write_html(load_result("trace-out/audit.json"), "trace-out/audit.html")

See docs/report.md.
"""

from __future__ import annotations

from trace_lib.report.html import render_html, write_html
from trace_lib.report.load import load_result

__all__ = ["load_result", "render_html", "write_html"]
