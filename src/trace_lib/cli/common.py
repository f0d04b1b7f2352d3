"""What every ``trace`` command shares: consoles, option types and the parse-time checks behind them.

A check fails by raising a :class:`~trace_lib.errors.TraceError` from the option's callback, so a bad value
stops the command while its arguments are parsed, before any model loads: one line, exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from trace_lib.errors import TraceError
from trace_lib.validate import (
    Range,
    check_choice,
    check_input_dir,
    check_input_file,
    check_nonempty,
    check_output_dir,
    check_output_file,
    check_variant_spec,
)


def console(stderr: bool = False) -> Console:
    """A console; when output is not a terminal (a pipe, a CI log) a wide one, so tables keep their columns."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr) if stream.isatty() else Console(width=200, stderr=stderr)


def _opt(param: Any) -> str:
    names = [o for o in getattr(param, "opts", []) if o.startswith("--")]
    return names[0] if names else (getattr(param, "human_readable_name", None) or str(param.name)).upper()


def in_range(r: Range) -> Callable:
    """Option callback: every given value (one, or each of a repeatable option) must lie in ``r``."""

    def check(ctx: typer.Context, param: Any, value: Any) -> Any:
        for v in value if isinstance(value, list | tuple) else [value]:
            r.check(_opt(param), v)
        return value

    return check


def one_of(*choices: str) -> Callable:
    def check(ctx: typer.Context, param: Any, value: Any) -> Any:
        if value is not None:
            check_choice(_opt(param), value, choices)
        return value

    return check


def nonempty_name(ctx: typer.Context, param: Any, value: Any) -> Any:
    for v in value if isinstance(value, list | tuple) else [value]:
        if v is not None:
            check_nonempty(_opt(param), v)
    return value


def variant_specs(ctx: typer.Context, param: Any, value: Any) -> Any:
    """Each variant is a config name (``trace configs``), a mixed-precision config's .json file or an existing model
    path; checked without torch."""
    for v in value or []:
        check_variant_spec(v, _opt(param))
    return value


def out_dir(ctx: typer.Context, param: Any, value: Any) -> Any:
    if value is not None:
        check_output_dir(value, _opt(param))
    return value


def out_file(ctx: typer.Context, param: Any, value: Any) -> Any:
    if value is not None:
        check_output_file(value, _opt(param))
    return value


def dataset_spec(ctx: typer.Context, param: Any, value: Any) -> Any:
    """A built-in dataset name or a readable .jsonl/.csv file, read now (fast, no torch) so errors come first."""
    if value is not None:
        from trace_lib.datasets.registry import get_dataset

        check_nonempty(_opt(param), value)
        get_dataset(value)
    return value


def _existing(check_path: Callable[[Any, str], Any], what: str) -> Callable:
    def check(ctx: typer.Context, param: Any, value: Any) -> Any:
        if value is not None:
            check_path(value, what)
        return value

    return check


def existing_file(what: str) -> Callable:
    """Option callback: an existing, readable file (``what`` names it in the message)."""
    return _existing(check_input_file, what)


def existing_dir(what: str) -> Callable:
    """Option callback: an existing folder (``what`` names it in the message)."""
    return _existing(check_input_dir, what)


def device_spec(ctx: typer.Context, param: Any, value: Any) -> Any:
    """``--device``: a device this machine has (:func:`~trace_lib.models.device.resolve_device`); with ``--dtype``
    already parsed, also a dtype that device can run (whichever of the two is parsed second checks the pair)."""
    if value is not None:
        from trace_lib.models.device import resolve_device, resolve_dtype

        device = resolve_device(value, _opt(param))
        if ctx.params.get("dtype") is not None:
            resolve_dtype(ctx.params["dtype"], device, "--dtype", device_what=_opt(param))
    return value


def dtype_spec(ctx: typer.Context, param: Any, value: Any) -> Any:
    """``--dtype``: a known dtype (:func:`~trace_lib.models.device.resolve_dtype`), usable on ``--device`` (float16
    is refused on the CPU)."""
    if value is not None:
        from trace_lib.models.device import dtype_choice, resolve_device, resolve_dtype

        dtype_choice(value, _opt(param))
        if ctx.params.get("device") is not None:
            device = resolve_device(ctx.params["device"], "--device")
            resolve_dtype(value, device, _opt(param), device_what="--device")
    return value


def nonempty_text(ctx: typer.Context, param: Any, value: Any) -> Any:
    if value is not None and not value.strip():
        raise TraceError(f"{_opt(param)} is empty: give some text")
    return value


# Option types shared by the commands.
MODEL_HELP = "'default', 'default-safety', 'gemma3-270m', a HF folder or a .gguf"
ModelOpt = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP, callback=nonempty_name)]
# audit, sweep and redteam default to the safety-tuned organism: the plain base refuses almost nothing, so it has
# no refusal mechanism to lose (trace_lib.organisms, docs/organism.md). compare, tracer and hooks use the base.
SafetyModelOpt = Annotated[str, typer.Option(
    "--model", "-m", callback=nonempty_name,
    help="'default-safety' (the default: the base with trace's safety LoRA merged), 'default', 'gemma3-270m', "
         "a HF folder or a .gguf")]
VariantsOpt = Annotated[list[str] | None, typer.Option(
    "--variant", "-v", callback=variant_specs,
    help="config name (trace configs), mixed-precision config .json file, or model path; repeatable (default: "
         "int8-dynamic, int4-rtn-g32, gguf-q4_0)")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="folder for result files", callback=out_dir)]
HtmlOpt = Annotated[Path | None, typer.Option("--html", help="also write a self-contained HTML report here",
                                              callback=out_file)]
DatasetOpt = Annotated[str, typer.Option(help="built-in dataset name or a .jsonl/.csv file", callback=dataset_spec)]
SaeOpt = Annotated[Path | None, typer.Option(help="folder of SAEs (SAELens or sparsify format); default: the "
                                                  "model's shipped SAEs, else train once and cache",
                                             callback=existing_dir("SAE folder"))]
DeviceOpt = Annotated[str, typer.Option(
    "--device", callback=device_spec, help="where the model runs: auto (a CUDA GPU if one is visible, else MPS, "
                                           "else the CPU), cpu, cuda, cuda:N or mps")]
DtypeOpt = Annotated[str, typer.Option(
    "--dtype", callback=dtype_spec, help="the model's dtype: auto (bfloat16 on a CUDA GPU, float32 on MPS and the "
                                         "CPU), float32, bfloat16 or float16 (not on the CPU)")]
RetrainOpt = Annotated[bool, typer.Option("--retrain-saes", help="train the SAEs here (cached after) instead of "
                                          "loading the ones shipped with the model")]



def write_html(result: Any, path: Path | None, **kw: Any) -> None:
    """Write the HTML report of ``result`` if a path was given, and say where."""
    if path is not None:
        from trace_lib.report import write_html as write

        console().print(f"wrote {write(result, path, **kw)}")
