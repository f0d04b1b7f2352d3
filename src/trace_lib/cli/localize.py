"""``trace localize``: where a variant's refusal gap enters (patching, AtP, weight-error attribution)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

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
    nonempty_text,
    one_of,
    write_html,
)
from trace_lib.errors import InvalidValueError
from trace_lib.validate import NON_NEGATIVE_INT, POSITIVE_INT, check_distinct

_KINDS = ("resid", "attn", "mlp", "heads", "linears")
_NAME = re.compile(r"^L\d+\.(resid_pre|attn|mlp|H\d+)$")


def _variant(ctx: typer.Context, param: Any, value: Any) -> Any:
    if value is not None:
        check_variant_spec(value, _opt(param))
    return value


def _components(ctx: typer.Context, param: Any, value: Any) -> Any:
    """Kinds or component names, checked for form now (that a layer exists is checked once the model loads)."""
    for v in value or []:
        if v not in _KINDS and not _NAME.match(v):
            raise InvalidValueError(f"{_opt(param)} must be one of {', '.join(_KINDS)} or a component name such "
                                    f"as L3.mlp, L3.attn, L3.resid_pre, L3.H2, not {v!r}")
    return value


def _f(x: Any) -> str:
    return "-" if x is None or x != x else f"{x:+.3f}"


def localize_command(
    variant: Annotated[str, typer.Option("--variant", "-v", help="quantization config (e.g. gguf-q4_0) or model path",
                                         callback=_variant)] = "gguf-q4_0",
    model: SafetyModelOpt = "default-safety",
    method: Annotated[str, typer.Option(help="patch, atp, weights or all",
                                        callback=one_of("patch", "atp", "weights", "all"))] = "all",
    components: Annotated[list[str] | None, typer.Option(
        "--components", "-c", callback=_components,
        help="resid, attn, mlp, heads, linears or names like L3.mlp; repeatable (default attn, mlp and, with "
             "--method all, linears)")] = None,
    metric: Annotated[str, typer.Option(help="refusal-logprob or direction",
                                        callback=one_of("refusal-logprob", "direction"))] = "refusal-logprob",
    positions: Annotated[str, typer.Option(help="patch at all positions or only the last prompt token",
                                           callback=one_of("all", "last"))] = "all",
    dataset: DatasetOpt = "harmful_refusal_v1",
    prompts: Annotated[int | None, typer.Option(help="use the first N harmful test prompts (default all)",
                                                callback=in_range(POSITIVE_INT))] = None,
    batch_size: Annotated[int, typer.Option(help="prompts per forward pass", callback=in_range(POSITIVE_INT))] = 8,
    graddrop: Annotated[bool, typer.Option(help="also AtP*'s GradDrop scores (n_layers more backward passes)")] = False,
    direction_layer: Annotated[int | None, typer.Option(help="block after which the refusal direction is read "
                                                             "(default: best separating)",
                                                        callback=in_range(NON_NEGATIVE_INT))] = None,
    refusal_reply: Annotated[str | None, typer.Option(help="teacher-force this refusal on every prompt instead of "
                                                           "the reference's own replies", callback=nonempty_text)] = None,
    weight_check: Annotated[int, typer.Option(help="un-quantize the top N and N random Linears to check the "
                                                   "estimate", callback=in_range(POSITIVE_INT))] = 20,
    seed: Annotated[int, typer.Option(help="bootstrap and random-Linear seed", callback=in_range(NON_NEGATIVE_INT))] = 0,
    top: Annotated[int, typer.Option(help="rows in the terminal table", callback=in_range(POSITIVE_INT))] = 15,
    out_dir: OutOpt = Path("trace-out"),
    html: HtmlOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Where a variant's refusal gap enters: activation patching, attribution patching, weight-error attribution."""
    from trace_lib.attribution import localize

    check_distinct({"--out": Path(out_dir) / "localize.json", "--html": html})
    result = localize(model, variant, method=method, components=components, metric=metric, dataset=dataset,
                      n_prompts=prompts, positions=positions, batch_size=batch_size, graddrop=graddrop,
                      direction_layer=direction_layer, refusal_reply=refusal_reply, n_weight_check=weight_check,
                      seed=seed, device=device, dtype=dtype)
    out = console()
    g = result.gap
    out.print(f"{escape(result.variant['name'])} vs {escape(result.reference['name'])}: metric {result.metric['kind']}, gap "
              f"{g['value']:.4g} (95% bootstrap {g['lo']:.4g} .. {g['hi']:.4g}) over {g['n']} refused prompts", highlight=False)
    if result.patch or result.atp:
        atp = dict(zip(result.atp["components"], result.atp["fraction"])) if result.atp else {}
        rows = result.ranking() if result.patch else [{"component": c} for c in sorted(atp, key=lambda c: -atp[c])]
        table = Table(title=f"fraction of the gap (positions: {positions})")
        for col in ("component", "restored", "introduced", "AtP"):
            table.add_column(col, justify="left" if col == "component" else "right")
        for r in rows[:top]:
            table.add_row(escape(r["component"]), _f(r.get("gap_restored")), _f(r.get("gap_introduced")),
                          _f(atp.get(r["component"])))
        out.print(table)
    skipping = False
    for line in result.summary(n=5).splitlines()[1:]:  # the rest of the summary, without its top-components block
        skipping = line.startswith("top ") or (skipping and line.startswith("  "))
        if not skipping:
            out.print(escape(line), highlight=False)
    path = result.save(Path(out_dir) / "localize.json")
    out.print(f"wrote {path}")
    write_html(result, html)
