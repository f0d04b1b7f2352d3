"""``trace repair``: the smallest mixed-precision config that keeps the reference's refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from trace_lib.cli.common import (
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    HtmlOpt,
    OutOpt,
    SafetyModelOpt,
    _opt,
    check_variant_spec,
    console,
    in_range,
    one_of,
    write_html,
)
from trace_lib.errors import QuantizationError
from trace_lib.validate import FRACTION, POSITIVE, Range, check_distinct

#: trace_lib.repair.restore.KINDS, spelled here so that parsing the command line imports no torch (tested equal)
KINDS = ("precision", "steer", "edit")


def _target(ctx: typer.Context, param: Any, value: Any) -> Any:
    """A plain weight-only config name: the modules it quantizes are what the search keeps at higher precision."""
    check_variant_spec(value, _opt(param))
    if not str(value).lower().endswith(".json"):
        from trace_lib.quant.config import parse_config

        try:
            cfg = parse_config(value)
        except QuantizationError:
            raise QuantizationError(f"{_opt(param)} must be a quantization config name (e.g. gguf-q4_0), not "
                                    f"{value!r}") from None
        if not cfg.weight_only:
            raise QuantizationError(f"{cfg.name} is not weight-quantized: there are no quantized modules to keep at "
                                    "higher precision (give e.g. gguf-q4_0 or int4-rtn-g32)")
    return value


def _keep(ctx: typer.Context, param: Any, value: Any) -> Any:
    if value is not None:
        from trace_lib.quant.config import parse_config

        parse_config(value)
    return value


def repair_command(
    variant: Annotated[str, typer.Option("--variant", "-v", help="the damaged target config (weight-only, e.g. "
                                         "gguf-q4_0 or int4-rtn-g32)", callback=_target)] = "gguf-q4_0",
    model: SafetyModelOpt = "default-safety",
    method: Annotated[str, typer.Option(help="precision: keep Linears at a higher precision; steer: add the "
                                        "reference's refusal direction back at runtime; edit: put the reference's "
                                        "weights along it back (rank-one terms); all: every one",
                                        callback=one_of(*KINDS, "all"))] = "precision",
    layer: Annotated[int | None, typer.Option(help="block after which the refusal direction is read and steered "
                                              "(steer/edit; default: where it separates harmful from harmless "
                                              "train prompts best)")] = None,
    max_bpw: Annotated[float | None, typer.Option(help="most bits per weight over the quantized Linears (default: "
                                                  "the target's + 0.75)", callback=in_range(POSITIVE))] = None,
    keep: Annotated[str | None, typer.Option(help="precision a kept Linear is stored at (default: gguf-q8_0 for "
                                             "GGUF targets, int8-rtn for int RTN, else fp16)", callback=_keep)] = None,
    dataset: DatasetOpt = "harmful_refusal_v1",
    train_bar: Annotated[float, typer.Option(help="fraction of the train-split refusal gap a set must restore "
                                             "before it is checked on the test split, in (0, 1]",
                                             callback=in_range(FRACTION))] = 0.9,
    safety_bar: Annotated[float | None, typer.Option(help="also require an accepted repair's safety CPFR (its audit "
                                                     "through the reference's SAEs) to reach this, in (0, 1]",
                                                     callback=in_range(FRACTION))] = None,
    confirm_baselines: Annotated[bool, typer.Option(help="also check each baseline's first set on the test split "
                                                    "(one generation run each)")] = False,
    audit: Annotated[bool, typer.Option(help="audit the chosen config (safety CPFR through the SAEs)")] = True,
    step: Annotated[float, typer.Option(help="budget step in extra bits per weight",
                                        callback=in_range(Range(0.001, 8)))] = 0.125,
    out_dir: OutOpt = Path("trace-out"),
    html: HtmlOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Repair a damaged variant: keep the Linears that carry the refusal gap at a higher precision (weight-error
    attribution, against saliency, first/last-block and random baselines), confirmed on the test split."""
    from trace_lib.repair import repair

    check_distinct({"--out": Path(out_dir) / "repair.json", "--html": html})
    err = console(stderr=True)
    result = repair(model, variant, max_bpw=max_bpw, keep=keep, dataset=dataset, train_bar=train_bar,
                    confirm_baselines=confirm_baselines, step=step, out_dir=Path(out_dir), with_audit=audit,
                    kinds=KINDS if method == "all" else (method,), layer=layer, safety_bar=safety_bar,
                    log=lambda s: err.print(s, highlight=False), device=device, dtype=dtype)
    out = console()
    out.print(result.summary(), highlight=False)
    out.print(f"wrote {result.save(Path(out_dir) / 'repair.json')}")
    write_html(result, html)
