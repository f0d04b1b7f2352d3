"""The ``trace`` command. Every sub-command has a Python API twin; errors print one line, exit status 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import trace_lib  # noqa: F401  (environment set-up first)
from trace_lib.errors import TraceError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="trace: did quantizing this model quietly damage its internal safety mechanisms?")
# Tables need room: when output is not a terminal (a pipe, a CI log) use a wide virtual console.
out = Console() if sys.stdout.isatty() else Console(width=200)
err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'default', 'default-safety', 'gemma3-270m', a HF folder or a .gguf")]  # noqa: E501
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="folder for result files")]
# audit, sweep and redteam default to the safety-tuned organism: the plain base refuses almost nothing, so it has
# no refusal mechanism to lose (trace_lib.organisms, docs/organism.md). compare, tracer and hooks use the base.
SafetyModelOpt = Annotated[str, typer.Option("--model", "-m", help="'default-safety' (the default: the base with trace's safety LoRA merged), 'default', 'gemma3-270m', a HF folder or a .gguf")]  # noqa: E501
HtmlOpt = Annotated[Path | None, typer.Option("--html", help="also write a self-contained HTML report here")]


def _write_html(result, path: Path | None, **kw) -> None:
    if path is not None:
        from trace_lib.report import write_html

        out.print(f"wrote {write_html(result, path, **kw)}")


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None or x != x else format(x, spec)


@app.command()
def compare(
    variant: Annotated[list[str], typer.Option("--variant", "-v", help="config name, e.g. int4-rtn-g32, gguf-q4_0, w4a8; repeatable")] = None,  # noqa: E501
    model: ModelOpt = "default",
    text: Annotated[Path | None, typer.Option(help="UTF-8 text file to evaluate on (default: built-in corpus)")] = None,
    ctx: Annotated[int, typer.Option(help="tokens per chunk; the second half of each is scored")] = 512,
    chunks: Annotated[int, typer.Option(help="number of chunks")] = 16,
    batch_size: Annotated[int, typer.Option(help="chunks per forward pass")] = 2,
    out_dir: OutOpt = Path("trace-out"),
) -> None:
    """KL-divergence statistics of quantized variants against the reference (llama-perplexity's)."""
    from trace_lib.compare import compare_outputs

    variants = variant or ["int8-dynamic", "int4-rtn-g32", "gguf-q4_0"]
    texts = None
    if text is not None:
        if not text.is_file():
            raise TraceError(f"no text file at {text}")
        raw = text.read_text(encoding="utf-8", errors="replace")
        texts = [p for p in raw.split("\n\n") if p.strip()]
    result = compare_outputs(model, variants, texts=texts, ctx=ctx, n_chunks=chunks, batch_size=batch_size)
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
    path = result.save(out_dir / "compare.json")
    out.print(f"wrote {path}")


@app.command()
def audit(
    variant: Annotated[list[str], typer.Option("--variant", "-v", help="config name or model path; repeatable (default: int8-dynamic, int4-rtn-g32, gguf-q4_0)")] = None,  # noqa: E501
    model: SafetyModelOpt = "default-safety",
    dataset: Annotated[str, typer.Option(help="built-in dataset name or a .jsonl/.csv file")] = "harmful_refusal_v1",
    sae: Annotated[Path | None, typer.Option(help="folder of SAEs (SAELens or sparsify format); default: train or use cached")] = None,  # noqa: E501
    hook: Annotated[list[str], typer.Option("--hook", help="hook point for trained SAEs; repeatable (default: resid_post at 1/3, 1/2, 2/3 depth)")] = None,  # noqa: E501
    threshold: Annotated[float, typer.Option(help="CPFR below which a feature counts as degraded")] = 0.8,
    out_dir: OutOpt = Path("trace-out"),
    html: HtmlOpt = None,
) -> None:
    """Audit safety features of quantized variants against the reference (SAEs, fingerprint, CPFR, KL)."""
    from trace_lib.audit import Audit

    a = Audit(model, variants=variant or None, hooks=hook or None, degradation_threshold=threshold)
    if sae is not None:
        a.load_sae(sae)
    result = a.trace_features(dataset=dataset)
    out.print(result.summary(), highlight=False)
    path = result.save(out_dir / "audit.json")
    out.print(f"wrote {path} (audit {result.timing['audit_s']:.0f} s, of which forward passes "
              f"{result.timing['forward_s']:.0f} s)")
    _write_html(result, html)


@app.command()
def sweep(
    model: SafetyModelOpt = "default-safety",
    ladder: Annotated[str, typer.Option(help="weights | activations | gguf | all")] = "weights",
    config: Annotated[list[str], typer.Option("--config", "-c", help="explicit config names instead of a ladder; repeatable")] = None,  # noqa: E501
    dataset: Annotated[str, typer.Option(help="built-in dataset name or a .jsonl/.csv file")] = "harmful_refusal_v1",
    sae: Annotated[Path | None, typer.Option(help="folder of SAEs; default: train or use cached")] = None,
    min_cpfr: Annotated[float, typer.Option(help="safety CPFR bar for the recommended config")] = 0.9,
    out_dir: OutOpt = Path("trace-out"),
    html: HtmlOpt = None,
) -> None:
    """Precision sweep: audit a ladder of configs; decay curves of safety vs capability features; best config."""
    from trace_lib.sweep import OptimizationAuditor

    auditor = OptimizationAuditor(model)
    if sae is not None:
        auditor.audit.load_sae(sae)
    result = auditor.run_sweep(configs=config or None, ladder=None if config else ladder, dataset=dataset,
                               min_cpfr=min_cpfr)
    out.print(result.summary(), highlight=False)
    out.print(f"wrote {result.save(out_dir / 'sweep.json')}")
    _write_html(result, html)


@app.command()
def configs() -> None:
    """List the quantization config names trace understands."""
    from trace_lib.quant.config import __doc__ as doc

    out.print(doc.split("\n\n", 2)[2] if doc else "")


@app.command()
def hooks(model: ModelOpt = "default") -> None:
    """List a model's hook points (TransformerLens names)."""
    from trace_lib.models import load_model

    loaded = load_model(model)
    names = loaded.arch.hook_names()
    out.print(f"{loaded.name}: {loaded.arch.family}, {loaded.n_layers} blocks, d_model {loaded.d_model}, "
              f"{len(names)} hook points")
    for n in names:
        out.print(n)


from trace_lib.commands.redteam import redteam_command  # noqa: E402
from trace_lib.commands.tracer import tracer_command  # noqa: E402
from trace_lib.organisms.cli import organism_app  # noqa: E402
from trace_lib.report.cli import report_command  # noqa: E402

app.command("redteam")(redteam_command)
app.command("report")(report_command)
app.command("tracer")(tracer_command)
app.add_typer(organism_app, name="organism")


@app.command()
def version() -> None:
    """Print trace's version."""
    out.print(trace_lib.__version__)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; a TraceError is one line on stderr and exit status 2, never a traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except TraceError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; cached results are kept and the next run resumes from them")
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
