"""``trace audit``: the safety audit of quantized variants against the reference."""

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
    VariantsOpt,
    console,
    in_range,
    nonempty_name,
    write_html,
)
from trace_lib.datasets.registry import AUDIT_DATASET
from trace_lib.validate import FRACTION, check_distinct


def audit_command(
    variant: VariantsOpt = None,
    model: SafetyModelOpt = "default-safety",
    dataset: DatasetOpt = AUDIT_DATASET,
    sae: SaeOpt = None,
    retrain_saes: RetrainOpt = False,
    hook: Annotated[list[str] | None, typer.Option("--hook", callback=nonempty_name, help="hook point for the SAEs; repeatable (default: resid_post after 6 blocks spread over the depth)")] = None,  # noqa: E501
    threshold: Annotated[float, typer.Option(help="CPFR below which a feature counts as degraded, in (0, 1]",
                                             callback=in_range(FRACTION))] = 0.8,
    localize: Annotated[bool, typer.Option("--localize", help="for each flagged variant, say where the refusal gap "
                                           "enters (AtP over attn/mlp outputs, its top 5 verified by patching)")] = False,
    out_dir: OutOpt = Path("trace-out"),
    html: HtmlOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Audit safety features of quantized variants against the reference (SAEs, fingerprint, CPFR, KL)."""
    from trace_lib.audit import Audit

    check_distinct({"--out": Path(out_dir) / "audit.json", "--html": html, "--dataset": _file_or_none(dataset)})
    a = Audit(model, variants=variant or None, hooks=hook or None, degradation_threshold=threshold,
              retrain_saes=retrain_saes, device=device, dtype=dtype)
    if sae is not None:
        a.load_sae(sae)
    result = a.trace_features(dataset=dataset)
    if localize:
        from trace_lib.attribution.triage import localize_audit

        localize_audit(a, result, dataset)
    out = console()
    out.print(result.summary(), highlight=False)
    path = result.save(Path(out_dir) / "audit.json")
    out.print(f"wrote {path} (audit {result.timing['audit_s']:.0f} s, of which forward passes "
              f"{result.timing['forward_s']:.0f} s)")
    write_html(result, html)


def _file_or_none(spec: str) -> Path | None:
    p = Path(spec).expanduser()
    return p if p.is_file() else None
