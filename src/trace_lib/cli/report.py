"""``trace report RESULT.json --html OUT.html``: one self-contained HTML page for a result file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trace_lib.cli.common import existing_file, in_range, out_file
from trace_lib.validate import FRACTION, check_output_file


def report_command(
    result: Annotated[Path, typer.Argument(help="a result file written by trace audit, sweep, compare, redteam or tracer", callback=existing_file("result file"))],  # noqa: E501
    html: Annotated[Path | None, typer.Option("--html", help="where to write the page (default: RESULT with .html)",
                                              callback=out_file)] = None,
    min_cpfr: Annotated[float | None, typer.Option(help="sweep: safety CPFR bar for the recommended config, in (0, 1] (default: the sweep's own)", callback=in_range(FRACTION))] = None,  # noqa: E501
) -> None:
    """One self-contained HTML page (no network) for a result: the verdict first, then the evidence."""
    from trace_lib.report import load_result, write_html

    target = html if html is not None else Path(result).with_suffix(".html")
    check_output_file(target, "--html", inputs=[result])  # never replace the result with its page
    loaded = load_result(result)
    path = write_html(loaded, target, min_cpfr=min_cpfr)
    typer.echo(f"wrote {path}")
