"""``trace tracer``: a per-layer table of one traced forward pass (and, with ``--generate``, the KV cache)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from trace_lib.cli.common import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    check_variant_spec,
    console,
    in_range,
    nonempty_text,
    one_of,
    out_file,
    write_html,
)
from trace_lib.errors import TraceError
from trace_lib.validate import NON_NEGATIVE_INT, Range, check_distinct

TOP_K = Range(1, 1000, integer=True)
GENERATE = Range(0, 4096, integer=True)


def _f(x, spec: str = ".4f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, float) and x != x:
        return "nan"
    return format(x, spec)


def _tok(s: str | None) -> str:
    return "-" if s is None else escape(repr(s))


def _variant(ctx: typer.Context, param, value):
    if value is not None:
        check_variant_spec(value)
    return value


def tracer_command(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="text to trace", callback=nonempty_text)],
    model: ModelOpt = "default",
    variant: Annotated[str | None, typer.Option("--variant", "-v", help="quantization config (e.g. gguf-q4_0, int4-rtn-g32) or model path; traced against the model", callback=_variant)] = None,  # noqa: E501
    preset: Annotated[str, typer.Option(help="'full' (everything) or 'lightweight' (activations + KV cache)",
                                        callback=one_of("full", "lightweight"))] = "full",
    generate: Annotated[int, typer.Option(help="also generate this many tokens greedily, tracing the KV cache per step (0 to 4096)", callback=in_range(GENERATE))] = 0,  # noqa: E501
    kv_cache: Annotated[str, typer.Option(help="KV cache for --generate: dynamic, fp8, quanto or hqq",
                                          callback=one_of("dynamic", "fp8", "quanto", "hqq"))] = "dynamic",
    attn_layer: Annotated[list[int] | None, typer.Option("--attn-layer", help="attention: layer to trace; repeatable (default all)", callback=in_range(NON_NEGATIVE_INT))] = None,  # noqa: E501
    attn_head: Annotated[list[int] | None, typer.Option("--attn-head", help="attention: head to trace; repeatable (default all)", callback=in_range(NON_NEGATIVE_INT))] = None,  # noqa: E501
    top_k: Annotated[int, typer.Option(help="attended positions kept per head, and final top tokens tracked by the logit lens (1 to 1000)", callback=in_range(TOP_K))] = 5,  # noqa: E501
    track: Annotated[list[int] | None, typer.Option("--track", help="token id to follow through the logit lens; repeatable (default: the final top-k)", callback=in_range(NON_NEGATIVE_INT))] = None,  # noqa: E501
    out_path: Annotated[Path, typer.Option("--out", "-o", help="JSON file to write", callback=out_file)] = Path("trace-out/tracer.json"),  # noqa: E501
    html: Annotated[Path | None, typer.Option("--html", help="also write a self-contained HTML report here (per-layer table, quantization error, logit lens)", callback=out_file)] = None,  # noqa: E501
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Trace one forward pass layer by layer: activation anomalies, attention, logit lens, quantization error."""
    from trace_lib.compare import resolve_variant
    from trace_lib.models import load_model
    from trace_lib.tracer import AttentionTraceConfig, ModelTracer, ModelTracerConfig

    if not prompt.strip():
        raise TraceError("the prompt is empty: give some text with --prompt")
    out = console()
    if preset not in ("full", "lightweight"):
        raise TraceError(f"unknown preset {preset!r}: use 'full' or 'lightweight'")
    attn = AttentionTraceConfig(top_k=top_k, layers=attn_layer or None, heads=attn_head or None)
    make = ModelTracerConfig.full if preset == "full" else ModelTracerConfig.lightweight
    config = make(attention_config=attn, logit_top_k=top_k, tracked_tokens=track or None, kv_cache=kv_cache)
    if variant is not None:
        check_variant_spec(variant)  # an unknown config name fails here, before the model loads
    check_distinct({"--out": out_path, "--html": html})
    reference = load_model(model, dtype=dtype, device=device)
    _check_indices(reference, attn_layer, attn_head, track)
    traced = resolve_variant(reference, variant) if variant else reference
    tracer = ModelTracer(config).attach(traced, reference=reference if variant else None)
    fwd = tracer.trace(prompt)
    gen = tracer.generate(prompt, max_new_tokens=generate) if generate > 0 else None

    title = f"{escape(traced.name)}: {fwd.n_tokens} tokens" + (f" vs {escape(reference.name)}" if variant else "")
    table = Table(title=title)
    cols = ["layer", "resid norm", "anomalies"]
    if fwd.logit_lens:
        cols += ["lens top", "p", "rank of final", "KL→final"]
    if fwd.quant_error:
        cols += ["cos", "rel err", "SNR dB", "level"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("anomalies", "lens top", "level") else "right")
    for r in fwd.layer_rows(traced.n_layers):
        cells = [str(r["layer"]), _f(r.get("resid_norm"), ".4g"), ", ".join(r.get("anomalies") or []) or "-"]
        if fwd.logit_lens:
            cells += [_tok(r.get("lens_top_str")), _f(r.get("lens_top_prob"), ".3f"),
                      _f(r.get("final_token_rank"), "d"), _f(r.get("kl_to_final"), ".3f")]
        if fwd.quant_error:
            level = r.get("quant_level") or "-"
            style = {"warning": "yellow", "critical": "bold red"}.get(level)
            cells += [_f(r.get("cosine"), ".5f"), _f(r.get("rel_l2"), ".4f"), _f(r.get("snr_db"), ".1f"),
                      f"[{style}]{level}[/]" if style else level]
        table.add_row(*cells)
    out.print(table)

    s = tracer.summary()
    out.print(f"first anomaly: {escape(fwd.anomaly) if fwd.anomaly else 'none'}", highlight=False)
    if fwd.logit_lens:
        lens = [t for t in fwd.logit_lens if t.batch_index == 0][-1]
        out.print(f"final top-1 {_tok(lens.top_token_strs[-1])}: decisive layer {lens.decisive_layer} (top-1 from "
                  f"there to the last layer)", highlight=False)
    if fwd.quant_error:
        q = fwd.quant_error
        div = q.first_divergence
        where = (f"layer {div['layer']}, token {div['token_index']} {_tok(div['token'])}" if div else "nowhere")
        out.print(f"quantization error: {s['quant_warnings']} warning and {s['quant_criticals']} critical layers; "
                  f"first divergence over the warning thresholds: {where}; output KL {_f(q.output_kl_divergence)} "
                  f"nats, top-1 agreement {_f(q.top1_agreement, '.3f')}", highlight=False)
    if gen is not None and gen.kv is not None:
        kv = gen.kv
        last = kv.steps[-1]
        line = (f"generated {escape(repr(gen.text[0])) if gen.text else ''}: {len(kv.steps)} KV steps "
                f"({kv.cache_class}), {last.valid_positions} positions, peak {kv.peak_memory_bytes / 1024:.1f} KiB, "
                f"evictions {kv.total_evictions}, mean hit rate {kv.avg_hit_rate:.3f}")
        if last.key_rel_error is not None:
            line += (f"; cached keys rel err {_f(last.key_rel_error)}, values {_f(last.value_rel_error)}, "
                     f"max next-token KL {_f(max(st.next_token_kl or 0.0 for st in kv.steps))}")
        out.print(line, highlight=False)
    for note in tracer.notes + fwd.notes:
        out.print(f"note: {escape(note)}", highlight=False)
    path = tracer.save(out_path)
    out.print(f"wrote {path}")
    if html is not None:
        write_html(tracer.to_dict(), html)


def _check_indices(model, layers: list[int] | None, heads: list[int] | None, tokens: list[int] | None) -> None:
    """Layer, head and token ids must exist in the model: checked once it loads, before the trace runs."""
    n_heads = getattr(model.model.config, "num_attention_heads", None)
    vocab = getattr(model.model.config, "vocab_size", None)
    for name, values, bound in (("--attn-layer", layers, model.n_layers), ("--attn-head", heads, n_heads),
                                ("--track", tokens, vocab)):
        for v in values or []:
            if bound is not None and v >= bound:
                raise TraceError(f"{name} {v} is out of range: {model.name} has {bound} (0 to {bound - 1})")
