"""``trace compare``: llama.cpp's KL-divergence statistics of variants against the reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from trace_lib.cli.common import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    OutOpt,
    VariantsOpt,
    console,
    existing_file,
    in_range,
)
from trace_lib.validate import CONTEXT, POSITIVE_INT, check_distinct


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def compare_command(
    variant: VariantsOpt = None,
    model: ModelOpt = "default",
    text: Annotated[Path | None, typer.Option(help="UTF-8 text file to evaluate on (default: built-in corpus)",
                                              callback=existing_file("text file"))] = None,
    ctx: Annotated[int, typer.Option(help="tokens per chunk; the second half of each is scored",
                                     callback=in_range(CONTEXT))] = 512,
    chunks: Annotated[int, typer.Option(help="number of chunks", callback=in_range(POSITIVE_INT))] = 16,
    batch_size: Annotated[int, typer.Option(help="chunks per forward pass", callback=in_range(POSITIVE_INT))] = 2,
    out_dir: OutOpt = Path("trace-out"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """KL-divergence statistics of quantized variants against the reference (llama-perplexity's)."""
    from trace_lib.compare import compare_outputs
    from trace_lib.validate import read_utf8

    check_distinct({"--text": text, "--out": Path(out_dir) / "compare.json"})
    variants = variant or ["int8-dynamic", "int4-rtn-g32", "gguf-q4_0"]
    texts = None
    if text is not None:
        texts = [p for p in read_utf8(text).split("\n\n") if p.strip()]
        if not texts:
            from trace_lib.errors import DatasetError

            raise DatasetError(f"{text} holds no text (only white space)")
    result = compare_outputs(model, variants, texts=texts, ctx=ctx, n_chunks=chunks, batch_size=batch_size,
                             device=device, dtype=dtype)
    out = console()
    table = Table(title=f"{result.reference['name']} vs variants: {result.text['scored_tokens']} scored tokens "
                        f"(llama.cpp KL-divergence statistics)")
    for col in ("variant", "bits/w", "size MB", "mean KLD", "99% KLD", "max KLD", "same top", "RMS Δp",
                "PPL(Q)/PPL(base)", "Cor(ln p)"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v, r in zip(result.variants, result.rows()):
        q = v.model.get("quant_info", {})
        table.add_row(r["variant"], _fmt(r["bpw"], ".2f"), _fmt(q.get("model_size_mb"), ".1f"),
                      f"{r['kld_mean']:.5f} ± {r['kld_mean_unc']:.5f}", _fmt(r["kld_99"]), _fmt(r["kld_max"]),
                      f"{100 * r['same_top']:.2f} ± {100 * r['same_top_unc']:.2f}%", f"{100 * r['dp_rms']:.3f}%",
                      f"{r['ppl_ratio']:.4f} ± {r['ppl_ratio_unc']:.4f}", f"{100 * r['ln_prob_cor']:.2f}%")
    out.print(table)
    out.print(f"PPL(base) = {result.variants[0].stats.ppl_base:.4f}" if result.variants else "")
    path = result.save(Path(out_dir) / "compare.json")
    out.print(f"wrote {path}")
