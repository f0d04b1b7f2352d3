"""``trace report RESULT.json --html OUT.html`` (registered on the main app in trace_lib.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report_command(
    result: Annotated[Path, typer.Argument(help="a result file written by trace audit, sweep, compare, redteam or tracer")],
    html: Annotated[Path | None, typer.Option("--html", help="where to write the page (default: RESULT with .html)")]
    = None,
    min_cpfr: Annotated[float | None, typer.Option(help="sweep: safety CPFR bar for the recommended config (default: the sweep's own)")] = None,  # noqa: E501
) -> None:
    """One self-contained HTML page (no network) for a result: the verdict first, then the evidence."""
    from trace_lib.report import load_result, write_html

    loaded = load_result(result)
    path = write_html(loaded, html if html is not None else result.with_suffix(".html"), min_cpfr=min_cpfr)
    typer.echo(f"wrote {path}")
