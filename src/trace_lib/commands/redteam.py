"""``trace redteam``: quantization jailbreaks of variants against the reference.

Registered in ``trace_lib.cli`` as ``app.command("redteam")(redteam_command)``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

DEFAULT_VARIANTS = ("int8-dynamic", "int4-rtn-g32", "gguf-q4_0")


def _console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=200)


def _ci(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{r['k']}/{r['n']} {100 * r['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]" if r["n"] else "-"


def redteam_command(
    model: Annotated[str, typer.Option("--model", "-m", help="'default-safety' (the default: the base with trace's safety LoRA), 'default', 'gemma3-270m', a HF folder or a .gguf")] = "default-safety",  # noqa: E501
    variant: Annotated[list[str], typer.Option("--variant", "-v", help="config name or model path; repeatable (default: int8-dynamic, int4-rtn-g32, gguf-q4_0)")] = None,  # noqa: E501
    dataset: Annotated[str, typer.Option(help="built-in dataset name or a .jsonl/.csv file")] = "harmful_refusal_v1",
    split: Annotated[str, typer.Option(help="dataset split: test, train or all")] = "test",
    sample: Annotated[int | None, typer.Option(help="a stratified subset of this many prompts (pairs kept together)")] = None,  # noqa: E501
    max_new_tokens: Annotated[int, typer.Option(help="greedy new tokens per reply (stops earlier at end of turn)")] = 64,  # noqa: E501
    batch_size: Annotated[int, typer.Option(help="prompts per generation batch")] = 8,
    mechanism: Annotated[bool, typer.Option(help="link jailbreaks to SAE features and refusal directions")] = True,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for result files")] = Path("trace-out"),
    html: Annotated[Path | None, typer.Option("--html", help="also write a self-contained HTML report here")] = None,
) -> None:
    """Quantization jailbreaks: refusal rates, paired flips (exact McNemar), detectable effect, features."""
    from trace_lib.redteam.redteam import RedTeam

    out = _console()
    rt = RedTeam(model, variant or list(DEFAULT_VARIANTS), max_new_tokens=max_new_tokens, batch_size=batch_size,
                 mechanism=mechanism)
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
    if html is not None:
        from trace_lib.report import write_html

        out.print(f"wrote {write_html(result, html)}")
