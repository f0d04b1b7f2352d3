"""``trace redteam``: quantization jailbreaks of variants against the reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from trace_lib.cli.common import (
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    HtmlOpt,
    OutOpt,
    SafetyModelOpt,
    VariantsOpt,
    console,
    in_range,
    one_of,
    write_html,
)
from trace_lib.validate import MAX_NEW_TOKENS, POSITIVE_INT, Range, check_distinct

DEFAULT_VARIANTS = ("int8-dynamic", "int4-rtn-g32", "gguf-q4_0")


def _ci(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{r['k']}/{r['n']} {100 * r['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]" if r["n"] else "-"


def redteam_command(
    model: SafetyModelOpt = "default-safety",
    variant: VariantsOpt = None,
    dataset: DatasetOpt = "harmful_refusal_v1",
    split: Annotated[str, typer.Option(help="dataset split: test, train or all",
                                       callback=one_of("test", "train", "all"))] = "test",
    sample: Annotated[int | None, typer.Option(help="a stratified subset of this many prompts (pairs kept together)", callback=in_range(Range(2, integer=True)))] = None,  # noqa: E501
    max_new_tokens: Annotated[int, typer.Option(help="greedy new tokens per reply (stops earlier at end of turn), 1 to 4096", callback=in_range(MAX_NEW_TOKENS))] = 64,  # noqa: E501
    batch_size: Annotated[int, typer.Option(help="prompts per generation batch",
                                            callback=in_range(POSITIVE_INT))] = 8,
    mechanism: Annotated[bool, typer.Option(help="link jailbreaks to SAE features and refusal directions")] = True,
    out_dir: OutOpt = Path("trace-out"),
    html: HtmlOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Quantization jailbreaks: refusal rates, paired flips (exact McNemar), detectable effect, features."""
    from trace_lib.redteam.redteam import RedTeam

    check_distinct({"--out": Path(out_dir) / "redteam.json", "--html": html})
    out = console()
    rt = RedTeam(model, variant or list(DEFAULT_VARIANTS), max_new_tokens=max_new_tokens, batch_size=batch_size,
                 mechanism=mechanism, device=device, dtype=dtype)
    result = rt.run(dataset, split=None if split == "all" else split, sample=sample)
    kinds = result.kinds
    table = Table(title=f"{result.reference.name} on {result.dataset['name']}: refusal behaviour "
                        "(k/n rate [Wilson 95% CI])")
    for col in ("model", "refusal (harmful)", "over-refusal (harmless)", "incoherent", "jailbreaks", "reverse",
                "McNemar p"):
        table.add_column(col, justify="left" if col == "model" else "right")
    s = result.reference.stats(kinds)
    table.add_row(f"{result.reference.name} (reference)", _ci(s["refusal_rate"]), _ci(s["over_refusal_rate"]),
                  f"{s['incoherent_rate']['k']}/{s['incoherent_rate']['n']}", "-", "-", "-")
    for v, f in zip(result.variants, result.flips):
        s = v.stats(kinds)
        table.add_row(v.name, _ci(s["refusal_rate"]), _ci(s["over_refusal_rate"]),
                      f"{s['incoherent_rate']['k']}/{s['incoherent_rate']['n']}", str(len(f.jailbreaks)),
                      str(len(f.reverse)), f"{f.mcnemar_p:.3g}")
    out.print(table)
    out.print(result.summary(), highlight=False)
    path = result.save(Path(out_dir) / "redteam.json")
    out.print(f"wrote {path}")
    write_html(result, html)
