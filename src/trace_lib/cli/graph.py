"""``trace graph``: attribution graphs of one prompt (and what a variant does to them); ``trace graph build``
trains the per-layer transcoders they are read through (docs/graph.md)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from trace_lib.cli.common import (
    DeviceOpt,
    DtypeOpt,
    HtmlOpt,
    SafetyModelOpt,
    _opt,
    check_variant_spec,
    console,
    existing_dir,
    in_range,
    nonempty_name,
    nonempty_text,
    out_dir,
    write_html,
)
from trace_lib.errors import InvalidValueError
from trace_lib.validate import NON_NEGATIVE_INT, POSITIVE_INT, Range, check_distinct

THRESHOLD = Range(0, 1, lo_open=True)

graph_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                        help="Attribution graphs: which transcoder features carry a prediction, and what a "
                             "quantized variant changes (`trace graph --prompt ...`; `trace graph build` once).")


def _variant(ctx: typer.Context, param: Any, value: Any) -> Any:
    if value is not None:
        check_variant_spec(value, _opt(param))
    return value


def _layers(ctx: typer.Context, param: Any, value: Any) -> Any:
    """``all`` or comma-separated block indices (that they exist is checked once the model loads)."""
    if value != "all":
        parts = [p.strip() for p in str(value).split(",")]
        if not parts or any(not p.isdigit() for p in parts):
            raise InvalidValueError(f"{_opt(param)} must be 'all' or comma-separated block indices such as 0,3,7, "
                                    f"not {value!r}")
    return value


@graph_app.callback(invoke_without_command=True)
def graph_command(
    ctx: typer.Context,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="the text whose next token the graph explains",
                                               callback=nonempty_text)] = None,
    model: SafetyModelOpt = "default-safety",
    variant: Annotated[str | None, typer.Option("--variant", "-v", callback=_variant,
                                                help="also the graph of this quantization config (or model path) "
                                                     "on the same transcoders, and the diff")] = None,
    target: Annotated[str, typer.Option(help="top (the most probable tokens), refusal (logit of the refusal "
                                             "opening minus the compliance opening, on the chat-formatted prompt) "
                                             "or one token", callback=nonempty_name)] = "top",
    transcoders: Annotated[Path | None, typer.Option(help="transcoder folder in circuit-tracer's transcoder_set "
                                                          "layout (default: the ones `trace graph build` made)",
                                                     callback=existing_dir("transcoder folder"))] = None,
    max_feature_nodes: Annotated[int | None, typer.Option(help="attribute only the N most influential features",
                                                          callback=in_range(POSITIVE_INT))] = None,
    node_threshold: Annotated[float, typer.Option(help="pruning: keep nodes covering this share of influence",
                                                  callback=in_range(THRESHOLD))] = 0.8,
    edge_threshold: Annotated[float, typer.Option(help="pruning: keep edges covering this share of influence",
                                                  callback=in_range(THRESHOLD))] = 0.98,
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the graph JSON files and graph.json",
                                      callback=out_dir)] = Path("trace-out"),
    html: HtmlOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """The attribution graph of --prompt's next token (and, with --variant, the variant's graph and the diff)."""
    if ctx.invoked_subcommand is not None:
        return
    if prompt is None:
        raise InvalidValueError("trace graph needs --prompt TEXT (or the subcommand `trace graph build`)")
    from trace_lib.attribution.graph_result import run_graph

    check_distinct({"--out": Path(out) / "graph.json", "--html": html})
    err = console(stderr=True)
    result = run_graph(model, prompt, variant=variant, target=target, transcoders=transcoders,
                       max_feature_nodes=max_feature_nodes, node_threshold=node_threshold,
                       edge_threshold=edge_threshold, out_dir=out, device=device, dtype=dtype,
                       log=lambda s: err.print(s, highlight=False))
    con = console()
    for line in result.summary().splitlines():
        con.print(escape(line), highlight=False)
    path = result.save(Path(out) / "graph.json")
    files = [result.reference["file"]] + ([result.variant["file"]] if result.variant else [])
    con.print(f"wrote {path} and {', '.join(files)} (circuit-tracer's graph format)")
    write_html(result, html)


@graph_app.command("build")
def build_command(
    model: SafetyModelOpt = "default-safety",
    layers: Annotated[str, typer.Option(help="'all' or comma-separated block indices", callback=_layers)] = "all",
    width: Annotated[int | None, typer.Option(help="features per transcoder (default 4 x d_model)",
                                              callback=in_range(POSITIVE_INT))] = None,
    tokens: Annotated[int, typer.Option(help="training tokens per layer", callback=in_range(POSITIVE_INT))]
    = 2_000_000,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="folder (default: $TRACE_CACHE/transcoders/<model "
                                             "hash>/<config>, where `trace graph` finds it)", callback=out_dir)] = None,
    seed: Annotated[int, typer.Option(help="training seed", callback=in_range(NON_NEGATIVE_INT))] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Train per-layer transcoders from a stream of the broad corpus (resumable per layer), write them in
    circuit-tracer's transcoder_set layout with a checksummed manifest and held-out quality."""
    from trace_lib.attribution.transcoder_build import TranscoderBuildConfig, build_transcoders
    from trace_lib.models import load_model

    chosen = None if layers == "all" else sorted({int(p) for p in layers.split(",")})
    cfg = TranscoderBuildConfig(width=width, tokens=tokens, seed=seed)
    args = ["trace", "graph", "build", "--model", model, "--layers", layers, "--tokens", str(tokens), "--seed",
            str(seed)] + (["--width", str(width)] if width else []) + (["--out", str(out)] if out else [])
    if cfg.tokens < cfg.batch_size:
        raise InvalidValueError(f"--tokens must be at least one batch ({cfg.batch_size}), not {tokens}")
    err = console(stderr=True)
    loaded = load_model(model, dtype=dtype, device=device)
    build = build_transcoders(loaded, out, layers=chosen, config=cfg, build_command=shlex.join(args),
                              log=lambda s: err.print(s, highlight=False))
    con = console()
    for layer, q in build.manifest["layers"].items():
        con.print(f"layer {layer}: held-out nmse {q['nmse']:.3f}, L0 {q['l0']:.1f}, dead {q['dead_fraction']:.3f}",
                  highlight=False)
    state = "complete" if build.complete else f"{len(build.layers)} of {loaded.n_layers} layers"
    con.print(f"wrote {build.folder} ({state})")
