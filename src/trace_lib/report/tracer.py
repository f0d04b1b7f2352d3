"""The page of a ``trace.tracer`` result: :meth:`trace_lib.tracer.ModelTracer.to_dict` (what ``save()`` writes).

The page is built from that dict, read with ``.get`` throughout, so a field a later version drops shows as
"n/a" instead of breaking the page. What it shows:

* the verdict: WARNING when a traced forward pass has a numerical anomaly (NaN, Inf, explosion, saturation,
  norm explosion) or a layer is over the critical quantization thresholds; CHECK when layers are over the
  warning thresholds only; OK otherwise; then the first anomaly, the quantization counts, the first divergence,
  the logit lens' decisive layer and the tracer's summary fields;
* per traced pass (``trace()``; the steps of ``generate()`` are in the KV-cache section): one sortable row per
  layer with the ``resid_post`` statistics, anomalies, the logit lens (top token, the final top-1's rank and
  logit, KL to the final layer) and, when a variant was traced against its reference, cosine, relative L2 error
  and SNR, highlighted at the warning and critical thresholds; every anomaly in a table;
* figures: quantization error per layer (cosine and SNR with the thresholds), logit lens (KL to final and the
  rank of the final top-1, log scale, with the decisive layer marked), attention entropy per layer, the KV cache
  per generation step (length, bytes, quantized-cache error);
* models, configuration, notes and the input tokens.

One traced pass's views are in :mod:`trace_lib.report.tracer_pass`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from trace_lib.report import plots
from trace_lib.report.kit import (
    Html,
    as_dict,
    as_list,
    figure,
    fmt,
    h,
    kv_table,
    note,
    num,
    section,
    table,
    td,
    td_num,
)
from trace_lib.report.tracer_pass import TracerPass, as_int, at, join_list, tok
from trace_lib.tracer.result import SUMMARY_FIELDS, TracerResult

CHECK_BANNER_STYLE = "background:#fef5e7;color:#9a6a0b;border:1px solid #f8c471"


# ------------------------------------------------------------------------------------------------ the page
def _as_dict(result: Any) -> dict:
    if isinstance(result, Mapping):
        d = dict(result)
    elif hasattr(result, "to_dict"):
        d = as_dict(result.to_dict())
    else:
        d = {}
    if "forwards" not in d and "layers" in d:  # one ForwardTrace
        d = {"kind": "trace.tracer", "forwards": [d]}
    return d


def _model_items(m: Mapping) -> list[tuple[str, Any]]:
    q = as_dict(m.get("quant_info"))
    return [("name", m.get("name")), ("spec", m.get("spec")), ("architecture", m.get("architecture")),
            ("layers", m.get("n_layers")), ("d_model", m.get("d_model")), ("dtype", m.get("dtype")),
            ("device", m.get("device")), ("quantization", m.get("quantization") or "none"), ("library", q.get("library")),
            ("bits/weight", fmt(q.get("bits_per_weight"), ".2f") if q else None),
            ("size MB", fmt(q.get("model_size_mb"), ".2f") if q else None), ("content hash", m.get("content_hash"))]


def _config_value(v: Any) -> Any:
    if isinstance(v, Mapping):
        return "; ".join(f"{k}={_config_value(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) or "(none)"
    return "None" if v is None else v


def _kv_sections(generations: list[dict]) -> Html:
    blocks = []
    for g, gen in enumerate(generations):
        kv = as_dict(gen.get("kv_cache"))
        steps = [as_dict(s) for s in as_list(kv.get("steps"))]
        text = as_list(gen.get("text"))
        suffix = "" if g == 0 else f"-{g}"
        head = kv_table([("generated", tok(text[0]) if text else ", ".join(str(x) for x in as_list(at(
                             as_list(gen.get("generated_ids")), 0, [])))),
                         ("cache", f"{kv.get('kind', 'n/a')} ({kv.get('cache_class', 'n/a')})" if kv else "not traced"),
                         ("steps", len(steps)),
                         ("peak size", fmt(kv.get("peak_memory_bytes"), ".1f", 1 / 1024, " KiB") if kv else None),
                         ("evictions", kv.get("total_evictions")),
                         ("mean hit rate", fmt(kv.get("avg_hit_rate"), ".3f") if kv else None),
                         *[("note", n) for n in as_list(kv.get("notes"))]])
        if not steps:
            blocks.append(join_list(h("h3", f"Generation {g}"), head, note("No KV-cache steps recorded.")))
            continue
        quantized = any(s.get(k) is not None for s in steps for k in ("key_rel_error", "value_rel_error",
                                                                      "next_token_kl"))
        svg = plots.kv_cache_svg([s.get("step") for s in steps], [s.get("valid_positions") for s in steps],
                                 [s.get("cache_size_bytes") for s in steps], [s.get("key_rel_error") for s in steps],
                                 [s.get("value_rel_error") for s in steps], [s.get("next_token_kl") for s in steps],
                                 prefix=f"kv-cache{suffix}")
        rows = []
        for s in steps:
            cells = [td_num(s.get("step"), "d"), td_num(s.get("new_tokens"), "d"),
                     td(tok(s.get("token_str")) if s.get("token_str") is not None else "n/a", cls="ctx",
                        title=f"token id {s.get('token_id')}" if s.get("token_id") is not None else None),
                     td_num(s.get("valid_positions"), "d"), td_num(s.get("max_positions"), "d"),
                     td_num(s.get("cache_size_bytes"), "d"), td_num(s.get("cache_hit_rate"), ".3f"),
                     td_num(s.get("evictions_this_step"), "d"), td_num(s.get("oldest_position"), "d")]
            if quantized:
                match = s.get("top1_matches_full_precision")
                cells += [td_num(s.get("key_rel_error"), ".4f"), td_num(s.get("value_rel_error"), ".4f"),
                          td_num(s.get("key_cosine"), ".5f"), td_num(s.get("value_cosine"), ".5f"),
                          td_num(s.get("worst_layer"), "d"), td_num(s.get("worst_layer_rel_error"), ".4f"),
                          td_num(s.get("next_token_kl"), ".3g"),
                          "n/a" if match is None else "yes" if match else "no"]
            rows.append(cells)
        headers = ["step", "new tokens", "token", ("positions", "positions held after the step"), "max positions",
                   "bytes", ("hit rate", "held before / (held before + new)"), "evictions", "oldest position"]
        if quantized:
            headers += [("key rel. err", "de-quantized cached keys vs the full-precision states"),
                        "value rel. err", "key cosine", "value cosine", ("worst layer", "largest relative error"),
                        "worst layer rel. err", ("next-token KL", "KL(p_full-precision cache || p_quantized cache)"),
                        ("same top-1", "the quantized cache picks the full-precision cache's next token")]
        blocks.append(join_list(
            h("h3", f"Generation {g}") if len(generations) > 1 else None, head,
            figure(svg, "Per generation step: positions held and bytes of the cache (left)" +
                 ("; relative error of the de-quantized keys and values and the next-token KL against a "
                  "full-precision cache (right)." if quantized else ".")),
            table(headers, rows, table_id=f"kv-table{suffix}")))
    return section("kv", "KV cache", blocks,
                   intro="Greedy generation, each step a traced forward pass; the cache read after every step.")


def tracer_body(result: Any) -> tuple[list, list, str, str]:
    """Sections, table of contents, title and subtitle of a tracer result's page."""
    d = _as_dict(result)
    model, ref, config = as_dict(d.get("model")), as_dict(d.get("reference")), as_dict(d.get("config"))
    forwards = [as_dict(f) for f in as_list(d.get("forwards"))]
    generations = [as_dict(g) for g in as_list(d.get("generations"))]
    gen_steps = {i for g in generations for i in as_list(g.get("forward_indices"))}
    traced = [f for f in forwards if f.get("index") not in gen_steps] or forwards[:1]
    th = {k[len("quant_"):]: config[k] for k in ("quant_warning_cosine", "quant_warning_snr_db",
                                                   "quant_critical_cosine", "quant_critical_snr_db") if k in config}
    sink = num(as_dict(config.get("attention_config")).get("sink_threshold"))
    passes = []
    for n, f in enumerate(traced):
        idx = f.get("index", n)
        step = " (generation step)" if idx in gen_steps else ""
        p = TracerPass(f, th, f"pass {idx}{step}" if len(traced) > 1 or step else "traced pass", "" if n == 0 else f"-{idx}")
        if math.isfinite(sink):
            p.sink_threshold = sink
        passes.append(p)

    # ---------------------------------------------------------------- summary numbers
    s = as_dict(d.get("summary"))
    n_fwd = as_int(s.get("total_forwards"))
    n_fwd = len(forwards) if n_fwd is None else n_fwd
    n_anom = as_int(s.get("anomalies_detected"))
    n_anom = sum(bool(f.get("anomaly")) for f in forwards) if n_anom is None else n_anom
    qes = [as_dict(f.get("quant_error")) for f in forwards if f.get("quant_error")]
    n_warn = as_int(s.get("quant_warnings"))
    n_warn = sum(as_int(q.get("warnings")) or 0 for q in qes) if n_warn is None else n_warn
    n_crit = as_int(s.get("quant_criticals"))
    n_crit = sum(as_int(q.get("criticals")) or 0 for q in qes) if n_crit is None else n_crit
    first_anomaly = next((str(f.get("anomaly")) for f in forwards if f.get("anomaly")), None)

    # ---------------------------------------------------------------- verdict
    quant_txt = (f"{n_warn} warning and {n_crit} critical layers" if qes else
                 "quantization error not traced (no variant against a reference)")
    if not forwards:
        banner = h("div", "Nothing was traced: the result has no forward passes.", cls="banner info",
                   id="verdict-banner", data_verdict="NONE")
    elif n_anom or n_crit:
        why = []
        if n_anom:
            why.append(f"{n_anom} of {n_fwd} traced forward passes have a numerical anomaly")
        if n_crit:
            why.append(f"{n_crit} layers over the critical quantization thresholds")
        banner = h("div", "WARNING: " + "; ".join(why) + ".", cls="banner warning", id="verdict-banner",
                   data_verdict="WARNING")
    elif n_warn:
        banner = h("div", f"CHECK: no anomaly in {n_fwd} traced forward passes; {n_warn} layers over the "
                          "quantization warning thresholds, none critical.", cls="banner info",
                   style=CHECK_BANNER_STYLE, id="verdict-banner", data_verdict="CHECK")
    else:
        banner = h("div", f"OK: no anomaly in {n_fwd} traced forward passes; " +
                   ("no layer over the quantization warning thresholds." if qes else quant_txt + "."),
                   cls="banner ok", id="verdict-banner", data_verdict="OK")
    main = passes[0] if passes else None
    items: list[tuple[str, Any]] = [
        ("anomalies", f"{n_anom} of {n_fwd} traced forward passes"),
        ("first anomaly", first_anomaly or "none"),
        ("quantization", quant_txt)]
    if main is not None and main.qe:
        q = main.qe
        div = as_dict(q.get("first_divergence"))
        items += [
            ("first divergence", (f"layer {div.get('layer')}, token {div.get('token_index')} {tok(div.get('token'))} "
                                  f"(cosine {fmt(div.get('cosine'), '.5f')}, SNR {fmt(div.get('snr_db'), '.2f')} dB): "
                                  "the earliest token over the warning thresholds") if div else
             "none: no token over the warning thresholds"),
            ("first layer not ok", q.get("first_divergent_layer") if q.get("first_divergent_layer") is not None
             else "none"),
            ("output", f"logits cosine {fmt(q.get('logits_cosine'), '.5f')}, KL(reference ‖ variant) "
                       f"{fmt(q.get('output_kl_divergence'), '.4g')} nats, top-1 agreement "
                       f"{fmt(q.get('top1_agreement'), '.3f')}")]
    if main is not None and main.lens is not None:
        items.append(("logit lens", f"final top-1 {tok(main.final_token())}: decisive layer "
                                    f"{main.lens.get('decisive_layer', 'n/a')} (top-1 from there to the last layer)"))
    if generations:
        kvs = [as_dict(g.get("kv_cache")) for g in generations if g.get("kv_cache")]
        items.append(("KV cache", f"{s.get('kv_steps', 'n/a')} steps in {len(generations)} generations; "
                                  f"{s.get('total_evictions', 'n/a')} evictions; mean hit rate "
                                  f"{fmt(s.get('avg_hit_rate'), '.3f')}" +
                                  (f"; peak {fmt(max(num(k.get('peak_memory_bytes')) for k in kvs), '.1f', 1 / 1024)}"
                                   " KiB" if kvs else "")))
    summary_rows = [[k, td_num(s.get(k), ".4f" if k == "avg_hit_rate" else "d")] for k in SUMMARY_FIELDS if k in s]
    summary_rows += [[k, td(str(v))] for k, v in s.items() if k not in SUMMARY_FIELDS]
    verdict = section(
        "verdict", "Verdict", banner, kv_table(items, table_id="verdict-table"),
        h("h3", "Summary fields"),
        table(["field", "value"], summary_rows, table_id="summary-table", cls="kv") if summary_rows else
        note("The result has no summary."),
        h("details", h("summary", "The same summary as trace prints it"), h("pre", TracerResult.from_dict(d).summary_text(), cls="summary")))

    # ---------------------------------------------------------------- per pass
    many = len(passes) > 1

    def heading(p: TracerPass) -> Html | None:
        return h("h3", f"{p.label}: {p.fwd.get('n_tokens', 'n/a')} tokens") if many else None

    layer_parts, quant_parts, lens_parts, attn_parts = [], [], [], []
    for p in passes:
        layer_parts += [heading(p), p.layer_table() if p.layers else note("No per-layer records."),
                        p.anomaly_table(), note("; ".join(f"note: {x}" for x in as_list(p.fwd.get("notes"))))
                        if p.fwd.get("notes") else None]
        if p.has_quant:
            q = p.qe or {}
            quant_parts += [heading(p), p.quant_figure(),
                            note(f"{q.get('reference', ref.get('name', 'reference'))} vs "
                                 f"{q.get('variant', model.get('name', 'variant'))}: {q.get('warnings', 'n/a')} "
                                 f"warning and {q.get('criticals', 'n/a')} critical layers.") if q else None]
        if p.lens is not None:
            lens_parts += [heading(p), p.lens_figure(), p.tracked_table()]
        fig, tab = p.attention()
        if tab is not None:
            attn_parts += [heading(p), fig, tab]
    body = [verdict,
            section("layers", "Per layer", layer_parts or note("No traced forward pass."),
                    intro="Activation statistics of resid_post, anomalies at any hook point, the logit lens at the "
                          "last lensed position (batch row 0) and, with a variant, its error against the reference, "
                          "for every layer."),
            section("quant", "Quantization error", quant_parts or note(
                "Not traced: no variant was compared with a reference (trace tracer --variant ...)."),
                    intro="The variant's resid_post against the reference's on the same input ids, per layer."),
            section("lens", "Logit lens", lens_parts or note("The logit lens was not traced."),
                    intro="unembed(final_norm(resid_post)) at every layer: where the final prediction forms."),
            section("attention", "Attention", attn_parts or note("Attention was not traced."),
                    intro="Per layer, over the traced heads and query positions."),
            _kv_sections(generations) if generations else section("kv", "KV cache", note("No generation traced.")),
            section("models", "Models & settings",
                    h("h3", "Traced model"), kv_table(_model_items(model)) if model else note("n/a"),
                    h("h3", "Reference"), kv_table(_model_items(ref)) if ref else note("No reference attached."),
                    h("h3", "Configuration"),
                    kv_table([(k.replace("_", " "), _config_value(v)) for k, v in config.items()])
                    if config else note("n/a"),
                    h("h3", "Notes") if d.get("notes") else None,
                    h("ul", [h("li", str(x)) for x in as_list(d.get("notes"))]) if d.get("notes") else None,
                    [p.tokens_block() for p in passes])]
    toc = [("verdict", "Verdict"), ("layers", "Per layer"), ("quant", "Quantization error"), ("lens", "Logit lens"),
           ("attention", "Attention"), ("kv", "KV cache"), ("models", "Models & settings")]
    name = model.get("name", "?")
    title = f"trace tracer: {name}" + (f" vs {ref.get('name')}" if ref.get("name") else "")
    n_layers = model.get("n_layers") or (len(main.layers) if main is not None else "n/a")
    sub = (f"{len(traced)} traced forward pass{'es' if len(traced) != 1 else ''} of "
           f"{', '.join(str(p.fwd.get('n_tokens', '?')) for p in passes) or 'no'} tokens; {n_layers} layers; "
           f"{s.get('kv_steps', 0)} KV-cache steps")
    return body, toc, title, sub
