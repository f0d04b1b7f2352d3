"""``trace sweep``: a precision ladder audited against one reference; decay curves and the best config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from trace_lib.cli.common import (
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    HtmlOpt,
    OutOpt,
    RetrainOpt,
    SaeOpt,
    SafetyModelOpt,
    console,
    in_range,
    one_of,
    variant_specs,
    write_html,
)
from trace_lib.validate import FRACTION, check_distinct


def sweep_command(
    model: SafetyModelOpt = "default-safety",
    ladder: Annotated[str, typer.Option(help="weights | activations | gguf | all",
                                        callback=one_of("weights", "activations", "gguf", "all"))] = "weights",
    config: Annotated[list[str] | None, typer.Option("--config", "-c", callback=variant_specs, help="explicit config names instead of a ladder; repeatable")] = None,  # noqa: E501
    dataset: DatasetOpt = "harmful_refusal_v1",
    sae: SaeOpt = None,
    retrain_saes: RetrainOpt = False,
    min_cpfr: Annotated[float, typer.Option(help="safety CPFR bar for the recommended config, in (0, 1]",
                                            callback=in_range(FRACTION))] = 0.9,
    out_dir: OutOpt = Path("trace-out"),
    html: HtmlOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Precision sweep: audit a ladder of configs; decay curves of safety vs capability features; best config."""
    from trace_lib.sweep import OptimizationAuditor

    check_distinct({"--out": Path(out_dir) / "sweep.json", "--html": html})
    auditor = OptimizationAuditor(model, retrain_saes=retrain_saes, device=device, dtype=dtype)
    if sae is not None:
        auditor.audit.load_sae(sae)
    result = auditor.run_sweep(configs=config or None, ladder=None if config else ladder, dataset=dataset,
                               min_cpfr=min_cpfr)
    out = console()
    out.print(result.summary(), highlight=False)
    out.print(f"wrote {result.save(Path(out_dir) / 'sweep.json')}")
    write_html(result, html)
