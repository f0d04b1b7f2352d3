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

Token strings are shown as Python ``repr`` (quotes, ``\\n``), escaped like every other string of the result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from trace_lib.report import plots
from trace_lib.report.html import Html, _d, _l, _num, fmt, h, kv_table, note, section, table, td, td_num
from trace_lib.tracer.result import SUMMARY_FIELDS, TracerResult

LEVEL_STYLE = {"critical": "background:#fdedec;color:#c0392b;font-weight:700",
               "warning": "background:#fef5e7;color:#9a6a0b;font-weight:600"}
CHECK_BANNER_STYLE = "background:#fef5e7;color:#9a6a0b;border:1px solid #f8c471"
DEFAULT_THRESHOLDS = {"warning_cosine": 0.99, "warning_snr_db": 20.0, "critical_cosine": 0.9,
                      "critical_snr_db": 10.0}

# The per-layer table's columns: (header, tooltip); the quantization columns only when a variant was traced.
LAYER_COLS = [
    ("layer", None),
    ("resid norm", "median per-token L2 norm of resid_post (the norm-explosion statistic)"),
    ("resid mean", "mean of resid_post over real tokens"), ("resid std", "standard deviation of resid_post"),
    ("resid |max|", "largest absolute value of resid_post"), ("resid L2", "L2 norm of resid_post over real tokens"),
    ("anomalies", "anomalies at any hook point of this layer (hover for the descriptions)"),
    ("lens top", "the logit lens' top token at this layer (last lensed position)"),
    ("p", "its probability under the lens"),
    ("rank of final", "rank of the final layer's top-1 token at this layer (0 = top-1)"),
    ("final logit", "the lens logit of the final layer's top-1 token at this layer"),
    ("KL→final", "KL(p_final || p_layer) in nats"),
]
QUANT_COLS = [
    ("cosine", "cosine of the variant's resid_post with the reference's"),
    ("rel. L2 error", "||reference − variant|| / ||reference||"),
    ("SNR dB", "10 log10(||reference||² / ||reference − variant||²); ∞ when identical"),
    ("median token rel. err", "median over tokens of the per-token relative error (every token weighs the same)"),
    ("max |Δ|", "largest absolute difference"),
    ("level", "warning: cosine < warning cosine or SNR < warning SNR; critical: below the critical ones"),
]


def _int(x: Any) -> int | None:
    v = _num(x)
    return int(v) if math.isfinite(v) else None


def tok(s: Any) -> str:
    """A token string as the page shows it: its Python ``repr`` (quotes; whitespace and controls visible)."""
    return "n/a" if s is None else repr(str(s))


def _at(xs: Sequence, i: Any, default: Any = None) -> Any:
    return xs[i] if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(xs) else default


def _fig(svg: str, caption: str) -> Html | None:
    if not svg:
        return None
    return h("figure", Html(svg), h("figcaption", caption))


def _level(value: Any, warn: Any, crit: Any) -> str | None:
    """``critical`` / ``warning`` when ``value`` is below ``crit`` / ``warn``; None when fine or unknown."""
    v = _num(value)
    if math.isnan(v):
        return None
    if v < _num(crit):
        return "critical"
    if v < _num(warn):
        return "warning"
    return None


def _td_level(x: Any, spec: str, level: str | None, text: str | None = None, title: str | None = None) -> Html:
    """A numeric cell highlighted at ``level`` (warning / critical); the exact value in ``data-sort``."""
    v = _num(x)
    sort = "" if math.isnan(v) else ("Infinity" if v == math.inf else "-Infinity" if v == -math.inf else repr(v))
    return h("td", fmt(x, spec) if text is None else text, cls=f"num level-{level}" if level else "num",
             data_sort=sort, data_level=level, style=LEVEL_STYLE.get(level or ""), title=title)


# ------------------------------------------------------------------------------------------------ one pass
class _Pass:
    """The per-layer view of one forward pass's dict (``ForwardTrace.to_dict()``)."""

    sink_threshold: float = 0.5  # first-token weight above which a head counts as a sink (the config's)

    def __init__(self, fwd: Mapping, thresholds: Mapping, label: str, suffix: str) -> None:
        self.fwd = _d(fwd)
        self.label, self.suffix = label, suffix
        self.index = self.fwd.get("index")
        acts = _d(self.fwd.get("activations"))
        self.records = [_d(r) for r in _l(acts.get("records"))]
        self.resid = {r.get("layer"): _d(r.get("stats")) for r in self.records
                      if r.get("point") == "resid_post" and _int(r.get("layer")) is not None}
        self.anomalies = [(r, _d(a)) for r in self.records for a in _l(r.get("anomalies"))]
        lens_row0 = [_d(t) for t in _l(self.fwd.get("logit_lens")) if _d(t).get("batch_index", 0) == 0]
        self.lens = lens_row0[-1] if lens_row0 else None  # the last lensed position predicts the next token
        self.qe = _d(self.fwd.get("quant_error")) or None
        self.th = {**DEFAULT_THRESHOLDS, **{k: v for k, v in _d(thresholds).items() if v is not None},
                   **{k: v for k, v in _d((self.qe or {}).get("thresholds")).items() if v is not None}}
        self.q_layers = {_int(e.get("layer")): e for e in (_d(x) for x in _l((self.qe or {}).get("layers")))}
        self.rows = {_int(r.get("layer")): r for r in (_d(x) for x in _l(self.fwd.get("layers")))}
        lens_layers = _l((self.lens or {}).get("layers"))
        self.lens_j = {_int(x): j for j, x in enumerate(lens_layers)}
        if self.lens and not lens_layers:
            self.lens_j = {j: j for j in range(len(_l(self.lens.get("top_tokens"))))}
        keys = set(self.rows) | set(self.resid) | set(self.q_layers) | set(self.lens_j)
        self.layers = sorted(k for k in keys if k is not None)
        final = (self.lens or {}).get("final_top1")
        self.final_tracked = next((_d(t) for t in _l((self.lens or {}).get("tracked_tokens"))
                                   if _d(t).get("token_id") == final and final is not None), None)

    @property
    def has_quant(self) -> bool:
        return bool(self.q_layers) or any("cosine" in r for r in self.rows.values())

    # -------------------------------------------------------------- per-layer values
    def lens_value(self, layer: int, key: str, row_key: str | None = None) -> Any:
        row = self.rows.get(layer, {})
        if row_key and row_key in row:
            return row[row_key]
        return _at(_l((self.lens or {}).get(key)), self.lens_j.get(layer))

    def final_logit(self, layer: int) -> Any:
        return _at(_l((self.final_tracked or {}).get("per_layer_logit")), self.lens_j.get(layer))

    def quant(self, layer: int) -> dict:
        """cosine, rel_l2, snr_db (inf when identical), level, median token error, max |Δ| of one layer."""
        e = self.q_layers.get(layer)
        row = self.rows.get(layer, {})
        if e is None and "cosine" not in row:
            return {}
        e = e or {}
        identical = bool(e.get("identical")) or (_num(e.get("rel_l2", row.get("rel_l2"))) == 0.0)
        snr = e.get("snr_db", row.get("snr_db"))
        return {"cosine": e.get("cosine", row.get("cosine")), "rel_l2": e.get("rel_l2", row.get("rel_l2")),
                "snr_db": math.inf if identical and snr is None else snr, "identical": identical,
                "level": e.get("level", row.get("quant_level")), "median": e.get("median_token_rel_l2"),
                "max_abs": e.get("max_abs_error"), "worst_token": _d(e.get("worst_token"))}

    # -------------------------------------------------------------- views
    def layer_table(self) -> Html:
        rows, attrs = [], []
        quant = self.has_quant
        th = self.th
        for i in self.layers:
            row = self.rows.get(i, {})
            st = self.resid.get(i, {})
            anoms = [a for r, a in self.anomalies if _int(r.get("layer")) == i]
            kinds = row.get("anomalies") if isinstance(row.get("anomalies"), list) else None
            kinds = sorted({str(k) for k in (kinds or [])} | {str(a.get("kind")) for a in anoms if a.get("kind")})
            top = self.lens_value(i, "top_token_strs", "lens_top_str")
            top_id = self.lens_value(i, "top_tokens", "lens_top")
            cells = [td_num(i, "d"), td_num(row.get("resid_norm", st.get("token_norm_median")), ".4g"),
                     td_num(st.get("mean"), ".4g"), td_num(st.get("std"), ".4g"), td_num(st.get("abs_max"), ".4g"),
                     td_num(st.get("l2_norm"), ".4g"),
                     h("td", ", ".join(kinds) or "-", cls="anomalies", data_sort=str(len(kinds)),
                       style=LEVEL_STYLE["critical"] if kinds else None,
                       title="; ".join(str(a.get("description", "")) for a in anoms) or None),
                     td(tok(top) if self.lens is not None or top is not None else "n/a", cls="ctx",
                        title=f"token id {top_id}" if top_id is not None else None),
                     td_num(self.lens_value(i, "top_probs", "lens_top_prob"), ".3f"),
                     td_num(self.lens_value(i, "final_top1_rank", "final_token_rank"), "d"),
                     td_num(self.final_logit(i), ".4g"),
                     td_num(self.lens_value(i, "kl_to_final", "kl_to_final"), ".4f")]
            level = None
            if quant:
                q = self.quant(i)
                level = q.get("level")
                cos_level = _level(q.get("cosine"), th["warning_cosine"], th["critical_cosine"])
                snr_level = _level(q.get("snr_db"), th["warning_snr_db"], th["critical_snr_db"])
                worst = q.get("worst_token") or {}
                cells += [_td_level(q.get("cosine"), ".5f", cos_level),
                          _td_level(q.get("rel_l2"), ".4f", snr_level),
                          _td_level(q.get("snr_db"), ".2f", snr_level,
                                    title="identical to the reference" if q.get("identical") else None),
                          td_num(q.get("median"), ".4f"), td_num(q.get("max_abs"), ".4g"),
                          h("td", level or "n/a", cls=f"level level-{level}" if level else "level",
                            style=LEVEL_STYLE.get(level or ""),
                            title=(f"worst token: #{worst.get('token_index')} (rel. error "
                                   f"{fmt(worst.get('rel_l2'), '.4f')})") if worst else None)]
            rows.append(cells)
            attrs.append({"data_layer": str(i), "data_level": level if level in LEVEL_STYLE else None,
                          "data_anomaly": "1" if kinds else "0"})
        headers = [c if t is None else (c, t) for c, t in LAYER_COLS + (QUANT_COLS if quant else [])]
        return table(headers, rows, table_id=f"layers-table{self.suffix}", row_attrs=attrs,
                     caption="One row per layer (resid_post). Click a header to sort; highlighted cells are over a "
                             "warning (amber) or critical (red) threshold.")

    def anomaly_table(self) -> Html | None:
        if not self.anomalies:
            return None
        rows = [[td_num(r.get("layer"), "d") if r.get("layer") is not None else td("logits"), str(r.get("hook", "")),
                 str(a.get("kind", "")), td(str(a.get("description", "")), cls="wrap")] for r, a in self.anomalies]
        return join_list(h("h3", "Anomalies, in forward order"),
                         table(["layer", "hook", "kind", "description"], rows,
                               table_id=f"anomalies-table{self.suffix}"))

    def quant_figure(self) -> Html | None:
        if not self.has_quant:
            return None
        qs = [self.quant(i) for i in self.layers]
        svg = plots.quant_error_svg(self.layers, [q.get("cosine") for q in qs],
                                    [None if q.get("identical") else q.get("snr_db") for q in qs],
                                    [q.get("level") for q in qs], self.th, [bool(q.get("identical")) for q in qs],
                                    prefix=f"quant-error{self.suffix}")
        th = self.th
        return _fig(svg, f"Per layer: cosine (left) and SNR (right) of the variant's resid_post against the "
                         f"reference's; dashed: warning thresholds (cosine {th['warning_cosine']:g}, "
                         f"{th['warning_snr_db']:g} dB), dotted: critical ({th['critical_cosine']:g}, "
                         f"{th['critical_snr_db']:g} dB).")

    def lens_figure(self) -> Html | None:
        if self.lens is None:
            return None
        ls = [i for i in self.layers if i in self.lens_j]
        svg = plots.logit_lens_svg(ls, [self.lens_value(i, "kl_to_final") for i in ls],
                                   [self.lens_value(i, "final_top1_rank") for i in ls],
                                   _int(self.lens.get("decisive_layer")), self.final_token(),
                                   prefix=f"logit-lens{self.suffix}")
        return _fig(svg, "Logit lens at the last lensed position: KL(p_final ‖ p_layer) per layer (left) and the "
                         "rank of the final top-1 token per layer (right, symmetric log scale, 0 = top-1); dashed: "
                         "the decisive layer, from which the final top-1 stays top-1.")

    def final_token(self) -> str | None:
        strs = _l((self.lens or {}).get("top_token_strs"))
        if self.final_tracked is not None and self.final_tracked.get("token_str") is not None:
            return str(self.final_tracked.get("token_str"))
        return str(strs[-1]) if strs else None

    def tracked_table(self) -> Html | None:
        tracked = [_d(t) for t in _l((self.lens or {}).get("tracked_tokens"))]
        if not tracked:
            return None
        ls = [i for i in self.layers if i in self.lens_j]
        rows = []
        for t in tracked:
            ranks = _l(t.get("per_layer_rank"))
            rows.append([td(tok(t.get("token_str")), cls="ctx"), td_num(t.get("token_id"), "d"),
                         td_num(t.get("final_probability"), ".4f"), td_num(t.get("final_rank"), "d"),
                         *[td_num(_at(ranks, self.lens_j.get(i)), "d") for i in ls]])
        return join_list(h("h3", "Tracked tokens: rank per layer"),
                         table(["token", "id", "final p", "final rank", *[f"L{i}" for i in ls]], rows,
                               table_id=f"tracked-table{self.suffix}"))

    def attention(self) -> tuple[Html | None, Html | None]:
        """(figure, per-layer table) of the attention summary, or (None, None)."""
        traces = [_d(a) for a in _l(self.fwd.get("attention"))]
        if not traces:
            return None, None
        by_layer: dict[int, list[dict]] = {}
        for a in traces:
            if _int(a.get("layer")) is not None:
                by_layer.setdefault(_int(a.get("layer")), []).append(a)
        layers = sorted(by_layer)
        ents = [[_num(a.get("entropy")) for a in by_layer[i]] for i in layers]
        uniform = []
        for i in layers:
            ks = [_num(a.get("n_keys")) for a in by_layer[i] if _num(a.get("n_keys")) > 0]
            uniform.append(sum(math.log(k) for k in ks) / len(ks) if ks else None)
        svg = plots.attention_entropy_svg(layers, ents, uniform, prefix=f"attention{self.suffix}")
        rows = []
        for i, es, u in zip(layers, ents, uniform):
            ts = by_layer[i]
            fin = [e for e in es if math.isfinite(e)]

            def mean(key: str, ts=ts) -> float:
                vals = [_num(a.get(key)) for a in ts if math.isfinite(_num(a.get(key)))]
                return sum(vals) / len(vals) if vals else math.nan

            sinks = sum(_num(a.get("first_token_weight")) > self.sink_threshold for a in ts)
            rows.append([td_num(i, "d"), td_num(len({a.get("head") for a in ts}), "d"),
                         td_num(len({(a.get("batch_index"), a.get("query_pos")) for a in ts}), "d"),
                         td_num(sum(fin) / len(fin) if fin else None, ".3f"), td_num(min(fin) if fin else None, ".3f"),
                         td_num(max(fin) if fin else None, ".3f"), td_num(u, ".3f"), td_num(mean("max_weight"), ".3f"),
                         td_num(mean("first_token_weight"), ".3f"), td_num(sinks, "d"), td_num(mean("tail_mass"), ".3f")])
        tab = table(["layer", "heads", ("queries", "query positions (and batch rows) traced"),
                     ("mean entropy", "nats, over heads and queries"), "min entropy", "max entropy",
                     ("uniform", "entropy of uniform attention over the keys: ln n_keys"),
                     ("mean max weight", "the largest attention weight, averaged"),
                     ("mean sink weight", "attention to the first token, averaged"),
                     ("sink heads", f"heads × queries with more than {self.sink_threshold:g} on the first token"),
                     ("tail mass", "weight outside the top-k positions, averaged")], rows,
                    table_id=f"attention-table{self.suffix}")
        fig = _fig(svg, "Attention entropy per layer: every traced head and query (grey), their mean (blue) and "
                        "uniform attention over the keys (dotted). Low entropy: a head attends to few positions.")
        return fig, tab

    def tokens_block(self) -> Html | None:
        toks = _l(self.fwd.get("tokens"))
        ids = _l(self.fwd.get("input_ids"))
        if not toks and not ids:
            return None
        parts = []
        for b in range(max(len(toks), len(ids))):
            row_t, row_i = _l(_at(toks, b, [])), _l(_at(ids, b, []))
            rows = [[td_num(j, "d"), td_num(_at(row_i, j), "d"), td(tok(_at(row_t, j)) if j < len(row_t) else "n/a",
                                                                     cls="ctx")]
                    for j in range(max(len(row_t), len(row_i)))]
            parts.append(table(["#", "id", "token"], rows, table_id=f"tokens-table{self.suffix}-{b}",
                               caption=f"batch row {b}"))
        return h("details", h("summary", f"{self.label}: input tokens"), parts)


def join_list(*pieces: Any) -> Html:
    return Html("".join(p for p in pieces if p))


# ------------------------------------------------------------------------------------------------ the page
def _as_dict(result: Any) -> dict:
    if isinstance(result, Mapping):
        d = dict(result)
    elif hasattr(result, "to_dict"):
        d = _d(result.to_dict())
    else:
        d = {}
    if "forwards" not in d and "layers" in d:  # one ForwardTrace
        d = {"kind": "trace.tracer", "forwards": [d]}
    return d


def _model_items(m: Mapping) -> list[tuple[str, Any]]:
    q = _d(m.get("quant_info"))
    return [("name", m.get("name")), ("spec", m.get("spec")), ("architecture", m.get("architecture")),
            ("layers", m.get("n_layers")), ("d_model", m.get("d_model")), ("dtype", m.get("dtype")),
            ("quantization", m.get("quantization") or "none"), ("library", q.get("library")),
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
        kv = _d(gen.get("kv_cache"))
        steps = [_d(s) for s in _l(kv.get("steps"))]
        text = _l(gen.get("text"))
        suffix = "" if g == 0 else f"-{g}"
        head = kv_table([("generated", tok(text[0]) if text else ", ".join(str(x) for x in _l(_at(
                             _l(gen.get("generated_ids")), 0, [])))),
                         ("cache", f"{kv.get('kind', 'n/a')} ({kv.get('cache_class', 'n/a')})" if kv else "not traced"),
                         ("steps", len(steps)),
                         ("peak size", fmt(kv.get("peak_memory_bytes"), ".1f", 1 / 1024, " KiB") if kv else None),
                         ("evictions", kv.get("total_evictions")),
                         ("mean hit rate", fmt(kv.get("avg_hit_rate"), ".3f") if kv else None),
                         *[("note", n) for n in _l(kv.get("notes"))]])
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
            _fig(svg, "Per generation step: positions held and bytes of the cache (left)" +
                 ("; relative error of the de-quantized keys and values and the next-token KL against a "
                  "full-precision cache (right)." if quantized else ".")),
            table(headers, rows, table_id=f"kv-table{suffix}")))
    return section("kv", "KV cache", blocks,
                   intro="Greedy generation, each step a traced forward pass; the cache read after every step.")


def tracer_body(result: Any) -> tuple[list, list, str, str]:
    """Sections, table of contents, title and subtitle of a tracer result's page."""
    d = _as_dict(result)
    model, ref, config = _d(d.get("model")), _d(d.get("reference")), _d(d.get("config"))
    forwards = [_d(f) for f in _l(d.get("forwards"))]
    generations = [_d(g) for g in _l(d.get("generations"))]
    gen_steps = {i for g in generations for i in _l(g.get("forward_indices"))}
    traced = [f for f in forwards if f.get("index") not in gen_steps] or forwards[:1]
    th = {k[len("quant_"):]: config[k] for k in ("quant_warning_cosine", "quant_warning_snr_db",
                                                   "quant_critical_cosine", "quant_critical_snr_db") if k in config}
    sink = _num(_d(config.get("attention_config")).get("sink_threshold"))
    passes = []
    for n, f in enumerate(traced):
        idx = f.get("index", n)
        step = " (generation step)" if idx in gen_steps else ""
        p = _Pass(f, th, f"pass {idx}{step}" if len(traced) > 1 or step else "traced pass", "" if n == 0 else f"-{idx}")
        if math.isfinite(sink):
            p.sink_threshold = sink
        passes.append(p)

    # ---------------------------------------------------------------- summary numbers
    s = _d(d.get("summary"))
    n_fwd = _int(s.get("total_forwards"))
    n_fwd = len(forwards) if n_fwd is None else n_fwd
    n_anom = _int(s.get("anomalies_detected"))
    n_anom = sum(bool(f.get("anomaly")) for f in forwards) if n_anom is None else n_anom
    qes = [_d(f.get("quant_error")) for f in forwards if f.get("quant_error")]
    n_warn = _int(s.get("quant_warnings"))
    n_warn = sum(_int(q.get("warnings")) or 0 for q in qes) if n_warn is None else n_warn
    n_crit = _int(s.get("quant_criticals"))
    n_crit = sum(_int(q.get("criticals")) or 0 for q in qes) if n_crit is None else n_crit
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
        div = _d(q.get("first_divergence"))
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
        kvs = [_d(g.get("kv_cache")) for g in generations if g.get("kv_cache")]
        items.append(("KV cache", f"{s.get('kv_steps', 'n/a')} steps in {len(generations)} generations; "
                                  f"{s.get('total_evictions', 'n/a')} evictions; mean hit rate "
                                  f"{fmt(s.get('avg_hit_rate'), '.3f')}" +
                                  (f"; peak {fmt(max(_num(k.get('peak_memory_bytes')) for k in kvs), '.1f', 1 / 1024)}"
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

    def heading(p: _Pass) -> Html | None:
        return h("h3", f"{p.label}: {p.fwd.get('n_tokens', 'n/a')} tokens") if many else None

    layer_parts, quant_parts, lens_parts, attn_parts = [], [], [], []
    for p in passes:
        layer_parts += [heading(p), p.layer_table() if p.layers else note("No per-layer records."),
                        p.anomaly_table(), note("; ".join(f"note: {x}" for x in _l(p.fwd.get("notes"))))
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
                    h("ul", [h("li", str(x)) for x in _l(d.get("notes"))]) if d.get("notes") else None,
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
