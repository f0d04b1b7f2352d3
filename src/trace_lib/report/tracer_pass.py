"""One traced forward pass of a ``trace.tracer`` result as the page shows it (:class:`TracerPass`): its per-layer
table (``resid_post`` statistics, anomalies, logit lens, quantization error highlighted at the thresholds), its
anomaly table, figures (quantization error, logit lens, attention), tracked tokens and input tokens.

Token strings are shown as Python ``repr`` (quotes, ``\\n``), escaped like every other string of the result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from trace_lib.report import plots
from trace_lib.report.kit import Html, as_dict, as_list, figure, fmt, h, num, table, td, td_num

LEVEL_STYLE = {"critical": "background:#fdedec;color:#c0392b;font-weight:700",
               "warning": "background:#fef5e7;color:#9a6a0b;font-weight:600"}
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


def as_int(x: Any) -> int | None:
    """A value as an int; None when it is not a finite number."""
    v = num(x)
    return int(v) if math.isfinite(v) else None


def tok(s: Any) -> str:
    """A token string as the page shows it: its Python ``repr`` (quotes; whitespace and controls visible)."""
    return "n/a" if s is None else repr(str(s))


def at(xs: Sequence, i: Any, default: Any = None) -> Any:
    """``xs[i]`` for a valid int index (not a bool), else ``default``."""
    return xs[i] if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(xs) else default


def _level(value: Any, warn: Any, crit: Any) -> str | None:
    """``critical`` / ``warning`` when ``value`` is below ``crit`` / ``warn``; None when fine or unknown."""
    v = num(value)
    if math.isnan(v):
        return None
    if v < num(crit):
        return "critical"
    if v < num(warn):
        return "warning"
    return None


def _td_level(x: Any, spec: str, level: str | None, text: str | None = None, title: str | None = None) -> Html:
    """A numeric cell highlighted at ``level`` (warning / critical); the exact value in ``data-sort``."""
    v = num(x)
    sort = "" if math.isnan(v) else ("Infinity" if v == math.inf else "-Infinity" if v == -math.inf else repr(v))
    return h("td", fmt(x, spec) if text is None else text, cls=f"num level-{level}" if level else "num",
             data_sort=sort, data_level=level, style=LEVEL_STYLE.get(level or ""), title=title)


# ------------------------------------------------------------------------------------------------ one pass
class TracerPass:
    """The per-layer view of one forward pass's dict (``ForwardTrace.to_dict()``)."""

    sink_threshold: float = 0.5  # first-token weight above which a head counts as a sink (the config's)

    def __init__(self, fwd: Mapping, thresholds: Mapping, label: str, suffix: str) -> None:
        self.fwd = as_dict(fwd)
        self.label, self.suffix = label, suffix
        self.index = self.fwd.get("index")
        acts = as_dict(self.fwd.get("activations"))
        self.records = [as_dict(r) for r in as_list(acts.get("records"))]
        self.resid = {r.get("layer"): as_dict(r.get("stats")) for r in self.records
                      if r.get("point") == "resid_post" and as_int(r.get("layer")) is not None}
        self.anomalies = [(r, as_dict(a)) for r in self.records for a in as_list(r.get("anomalies"))]
        lens_row0 = [as_dict(t) for t in as_list(self.fwd.get("logit_lens")) if as_dict(t).get("batch_index", 0) == 0]
        self.lens = lens_row0[-1] if lens_row0 else None  # the last lensed position predicts the next token
        self.qe = as_dict(self.fwd.get("quant_error")) or None
        self.th = {**DEFAULT_THRESHOLDS, **{k: v for k, v in as_dict(thresholds).items() if v is not None},
                   **{k: v for k, v in as_dict((self.qe or {}).get("thresholds")).items() if v is not None}}
        self.q_layers = {as_int(e.get("layer")): e for e in (as_dict(x) for x in as_list((self.qe or {}).get("layers")))}
        self.rows = {as_int(r.get("layer")): r for r in (as_dict(x) for x in as_list(self.fwd.get("layers")))}
        lens_layers = as_list((self.lens or {}).get("layers"))
        self.lens_j = {as_int(x): j for j, x in enumerate(lens_layers)}
        if self.lens and not lens_layers:
            self.lens_j = {j: j for j in range(len(as_list(self.lens.get("top_tokens"))))}
        keys = set(self.rows) | set(self.resid) | set(self.q_layers) | set(self.lens_j)
        self.layers = sorted(k for k in keys if k is not None)
        final = (self.lens or {}).get("final_top1")
        self.final_tracked = next((as_dict(t) for t in as_list((self.lens or {}).get("tracked_tokens"))
                                   if as_dict(t).get("token_id") == final and final is not None), None)

    @property
    def has_quant(self) -> bool:
        return bool(self.q_layers) or any("cosine" in r for r in self.rows.values())

    # -------------------------------------------------------------- per-layer values
    def lens_value(self, layer: int, key: str, row_key: str | None = None) -> Any:
        row = self.rows.get(layer, {})
        if row_key and row_key in row:
            return row[row_key]
        return at(as_list((self.lens or {}).get(key)), self.lens_j.get(layer))

    def final_logit(self, layer: int) -> Any:
        return at(as_list((self.final_tracked or {}).get("per_layer_logit")), self.lens_j.get(layer))

    def quant(self, layer: int) -> dict:
        """cosine, rel_l2, snr_db (inf when identical), level, median token error, max |Δ| of one layer."""
        e = self.q_layers.get(layer)
        row = self.rows.get(layer, {})
        if e is None and "cosine" not in row:
            return {}
        e = e or {}
        identical = bool(e.get("identical")) or (num(e.get("rel_l2", row.get("rel_l2"))) == 0.0)
        snr = e.get("snr_db", row.get("snr_db"))
        return {"cosine": e.get("cosine", row.get("cosine")), "rel_l2": e.get("rel_l2", row.get("rel_l2")),
                "snr_db": math.inf if identical and snr is None else snr, "identical": identical,
                "level": e.get("level", row.get("quant_level")), "median": e.get("median_token_rel_l2"),
                "max_abs": e.get("max_abs_error"), "worst_token": as_dict(e.get("worst_token"))}

    # -------------------------------------------------------------- views
    def layer_table(self) -> Html:
        rows, attrs = [], []
        quant = self.has_quant
        th = self.th
        for i in self.layers:
            row = self.rows.get(i, {})
            st = self.resid.get(i, {})
            anoms = [a for r, a in self.anomalies if as_int(r.get("layer")) == i]
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
        return figure(svg, f"Per layer: cosine (left) and SNR (right) of the variant's resid_post against the "
                         f"reference's; dashed: warning thresholds (cosine {th['warning_cosine']:g}, "
                         f"{th['warning_snr_db']:g} dB), dotted: critical ({th['critical_cosine']:g}, "
                         f"{th['critical_snr_db']:g} dB).")

    def lens_figure(self) -> Html | None:
        if self.lens is None:
            return None
        ls = [i for i in self.layers if i in self.lens_j]
        svg = plots.logit_lens_svg(ls, [self.lens_value(i, "kl_to_final") for i in ls],
                                   [self.lens_value(i, "final_top1_rank") for i in ls],
                                   as_int(self.lens.get("decisive_layer")), self.final_token(),
                                   prefix=f"logit-lens{self.suffix}")
        return figure(svg, "Logit lens at the last lensed position: KL(p_final ‖ p_layer) per layer (left) and the "
                         "rank of the final top-1 token per layer (right, symmetric log scale, 0 = top-1); dashed: "
                         "the decisive layer, from which the final top-1 stays top-1.")

    def final_token(self) -> str | None:
        strs = as_list((self.lens or {}).get("top_token_strs"))
        if self.final_tracked is not None and self.final_tracked.get("token_str") is not None:
            return str(self.final_tracked.get("token_str"))
        return str(strs[-1]) if strs else None

    def tracked_table(self) -> Html | None:
        tracked = [as_dict(t) for t in as_list((self.lens or {}).get("tracked_tokens"))]
        if not tracked:
            return None
        ls = [i for i in self.layers if i in self.lens_j]
        rows = []
        for t in tracked:
            ranks = as_list(t.get("per_layer_rank"))
            rows.append([td(tok(t.get("token_str")), cls="ctx"), td_num(t.get("token_id"), "d"),
                         td_num(t.get("final_probability"), ".4f"), td_num(t.get("final_rank"), "d"),
                         *[td_num(at(ranks, self.lens_j.get(i)), "d") for i in ls]])
        return join_list(h("h3", "Tracked tokens: rank per layer"),
                         table(["token", "id", "final p", "final rank", *[f"L{i}" for i in ls]], rows,
                               table_id=f"tracked-table{self.suffix}"))

    def attention(self) -> tuple[Html | None, Html | None]:
        """(figure, per-layer table) of the attention summary, or (None, None)."""
        traces = [as_dict(a) for a in as_list(self.fwd.get("attention"))]
        if not traces:
            return None, None
        by_layer: dict[int, list[dict]] = {}
        for a in traces:
            if as_int(a.get("layer")) is not None:
                by_layer.setdefault(as_int(a.get("layer")), []).append(a)
        layers = sorted(by_layer)
        ents = [[num(a.get("entropy")) for a in by_layer[i]] for i in layers]
        uniform = []
        for i in layers:
            ks = [num(a.get("n_keys")) for a in by_layer[i] if num(a.get("n_keys")) > 0]
            uniform.append(sum(math.log(k) for k in ks) / len(ks) if ks else None)
        svg = plots.attention_entropy_svg(layers, ents, uniform, prefix=f"attention{self.suffix}")
        rows = []
        for i, es, u in zip(layers, ents, uniform):
            ts = by_layer[i]
            fin = [e for e in es if math.isfinite(e)]

            def mean(key: str, ts=ts) -> float:
                vals = [num(a.get(key)) for a in ts if math.isfinite(num(a.get(key)))]
                return sum(vals) / len(vals) if vals else math.nan

            sinks = sum(num(a.get("first_token_weight")) > self.sink_threshold for a in ts)
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
        fig = figure(svg, "Attention entropy per layer: every traced head and query (grey), their mean (blue) and "
                        "uniform attention over the keys (dotted). Low entropy: a head attends to few positions.")
        return fig, tab

    def tokens_block(self) -> Html | None:
        toks = as_list(self.fwd.get("tokens"))
        ids = as_list(self.fwd.get("input_ids"))
        if not toks and not ids:
            return None
        parts = []
        for b in range(max(len(toks), len(ids))):
            row_t, row_i = as_list(at(toks, b, [])), as_list(at(ids, b, []))
            rows = [[td_num(j, "d"), td_num(at(row_i, j), "d"), td(tok(at(row_t, j)) if j < len(row_t) else "n/a",
                                                                     cls="ctx")]
                    for j in range(max(len(row_t), len(row_i)))]
            parts.append(table(["#", "id", "token"], rows, table_id=f"tokens-table{self.suffix}-{b}",
                               caption=f"batch row {b}"))
        return h("details", h("summary", f"{self.label}: input tokens"), parts)


def join_list(*pieces: Any) -> Html:
    """Already-built pieces joined, empty ones left out."""
    return Html("".join(p for p in pieces if p))
