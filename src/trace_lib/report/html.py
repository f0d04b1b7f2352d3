"""One self-contained HTML page for a trace result: the verdict first, then the evidence.

>>> from trace_lib.report import render_html, write_html
>>> write_html(load_result("trace-out/audit.json"), "trace-out/audit.html")

The page holds everything it shows: inline CSS, inline SVG figures (see :mod:`trace_lib.report.plots`) and
a short inline script that makes tables sortable and the feature table filterable. It loads nothing: a
Content-Security-Policy allows no network, no inline script but that one (by its hash) and no event-handler
attributes, so even a page built from hostile text runs nothing else.

Every string that comes from a result (prompts, replies, model and config names, token texts, reasons) goes
through :func:`esc` (``html.escape(..., quote=True)``); the page is put together from :class:`Html` pieces
by :func:`h`, which escapes every child and attribute value that is not already an :class:`Html` piece.

Sections: Verdict, Models & settings, Features (sortable, filterable), Hooks, Decay curves (sweep), Output
statistics (KL), Directions, Behaviour (red-team), Degraded-feature examples.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from trace_lib import __version__
from trace_lib.cache import atomic_write_text
from trace_lib.report import plots
from trace_lib.report.load import load_result, result_kind


# ------------------------------------------------------------------------------------------------ building
class Html(str):
    """A piece of markup that is already safe (built by :func:`h` or from escaped text)."""


def esc(x: Any) -> str:
    """Any value as HTML text: ``html.escape(str(x), quote=True)``."""
    return html.escape("" if x is None else str(x), quote=True)


def _children(items: Iterable[Any]) -> str:
    out = []
    for c in items:
        if c is None or c is False:
            continue
        if isinstance(c, Html):
            out.append(c)
        elif isinstance(c, (list, tuple)):
            out.append(_children(c))
        else:
            out.append(esc(c))
    return "".join(out)


_VOID = {"meta", "br", "hr", "input", "col", "img", "link"}
_ATTR_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


def h(tag: str, *children: Any, **attrs: Any) -> Html:
    """``<tag attrs>children</tag>``; ``cls`` is ``class``, ``data_x`` is ``data-x``; values and children are
    escaped unless they are :class:`Html`; ``None``/``False`` attributes are left out, ``True`` ones bare."""
    parts = [tag]
    for k, v in attrs.items():
        if v is None or v is False:
            continue
        name = "class" if k == "cls" else k.rstrip("_").replace("_", "-")
        if not _ATTR_NAME.match(name) or name.startswith("on"):
            raise ValueError(f"attribute name {name!r} is not allowed")
        parts.append(name if v is True else f'{name}="{esc(v)}"')
    start = "<" + " ".join(parts) + ">"
    if tag in _VOID:
        return Html(start)
    return Html(f"{start}{_children(children)}</{tag}>")


def join(*pieces: Any) -> Html:
    return Html(_children(pieces))


# ------------------------------------------------------------------------------------------------ numbers
def _d(x: Any) -> dict:
    """A result field as a dict (a missing or malformed one as empty), so a page renders from any file."""
    return dict(x) if isinstance(x, Mapping) else {}


def _l(x: Any) -> list:
    """A result field as a list (a missing or malformed one as empty)."""
    return list(x) if isinstance(x, (list, tuple)) else []


def _num(x: Any) -> float:
    if isinstance(x, bool) or x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def fmt(x: Any, spec: str = ".3f", scale: float = 1.0, suffix: str = "") -> str:
    """A number as text; ``n/a`` for None/NaN/non-numbers."""
    v = _num(x)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if spec.endswith("d"):
        return format(round(v * scale), spec) + suffix
    return format(v * scale, spec) + suffix


def fmt_unc(x: Any, u: Any, spec: str = ".4f", scale: float = 1.0, suffix: str = "") -> str:
    if math.isnan(_num(u)):
        return fmt(x, spec, scale, suffix)
    return f"{fmt(x, spec, scale)} ± {fmt(u, spec, scale)}{suffix}"


def _sort_key(x: Any) -> str | None:
    v = _num(x)
    return None if math.isnan(v) else repr(v)


def td_num(x: Any, spec: str = ".3f", scale: float = 1.0, suffix: str = "", text: str | None = None,
           cls: str = "num") -> Html:
    """A numeric cell: the formatted number shown, the exact value in ``data-sort`` (empty: n/a, sorted last)."""
    return h("td", fmt(x, spec, scale, suffix) if text is None else text, cls=cls,
             data_sort=_sort_key(x) if _sort_key(x) is not None else "")


def td(x: Any, **attrs: Any) -> Html:
    return h("td", x, **attrs)


def table(headers: Sequence[str | tuple[str, str]], rows: Iterable[Sequence[Any] | Html], *, table_id: str | None = None,
          cls: str = "sortable", caption: Any = None, row_attrs: Sequence[Mapping[str, Any]] | None = None,
          wrap_cls: str = "table-wrap") -> Html:
    """A table; a header given as ``(text, tooltip)`` gets a ``title``. Cells that are not :class:`Html`
    (``td``) are escaped text cells."""
    head = h("thead", h("tr", [h("th", hd[0], title=hd[1], scope="col") if isinstance(hd, tuple)
                               else h("th", hd, scope="col") for hd in headers]))
    body_rows = []
    for i, r in enumerate(rows):
        if isinstance(r, Html):
            body_rows.append(r)
            continue
        cells = [c if isinstance(c, Html) and c.startswith("<td") else td(c) for c in r]
        attrs = dict(row_attrs[i]) if row_attrs else {}
        body_rows.append(h("tr", cells, **attrs))
    return h("div", h("table", h("caption", caption) if caption is not None else None, head,
                      h("tbody", body_rows), id=table_id, cls=cls), cls=wrap_cls)


def kv_table(items: Iterable[tuple[str, Any]], table_id: str | None = None) -> Html:
    rows = [h("tr", h("th", k, scope="row"), v if isinstance(v, Html) and v.startswith("<td") else td(v))
            for k, v in items if v is not None]
    return h("div", h("table", h("tbody", rows), cls="kv", id=table_id), cls="table-wrap")


def section(sid: str, title: str, *content: Any, intro: Any = None) -> Html:
    return h("section", h("h2", title), h("p", intro, cls="intro") if intro else None, content, id=sid)


def note(*text: Any) -> Html:
    return h("p", *text, cls="note")


def _figure(svg: str, caption: str) -> Html | None:
    if not svg:
        return None
    return h("figure", Html(svg), h("figcaption", caption))


# ------------------------------------------------------------------------------------------------ page
CSS = """
:root{--ok:#1e8449;--warn:#b9770e;--bad:#c0392b;--muted:#5d6d7e;--line:#d5d8dc;--bg:#fbfcfc;--head:#eef2f4}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1b2631;margin:0;
background:#fff}
header.page{background:#17202a;color:#fff;padding:14px 28px}
header.page h1{margin:0;font-size:20px}
header.page p{margin:4px 0 0;color:#d5dbdb;font-size:13px}
main{padding:8px 28px 40px;max-width:1500px}
nav.toc{font-size:13px;margin:10px 0 4px}
nav.toc a{margin-right:14px;color:#1f618d;text-decoration:none}
section{margin-top:26px;border-top:1px solid var(--line);padding-top:6px}
h2{font-size:18px;margin:10px 0 8px}
h3{font-size:15px;margin:18px 0 6px}
p.intro,p.note{color:var(--muted);max-width:1000px;margin:4px 0 10px}
.banner{padding:12px 16px;border-radius:6px;font-size:16px;font-weight:600;margin:14px 0 10px}
.banner.ok{background:#e9f7ef;color:var(--ok);border:1px solid #a9dfbf}
.banner.warning{background:#fdedec;color:var(--bad);border:1px solid #f5b7b1}
.banner.info{background:#ebf5fb;color:#1f618d;border:1px solid #aed6f1}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid var(--line);border-left:6px solid var(--muted);border-radius:6px;padding:10px 14px;
flex:1 1 420px;max-width:740px;background:var(--bg)}
.card.ok{border-left-color:var(--ok)}.card.warning{border-left-color:var(--bad)}.card.skipped{border-left-color:var(--warn)}
.card h3{margin:0 0 4px;font-size:15px;word-break:break-all}
.card ul{margin:6px 0 0;padding-left:18px}.card li{margin:2px 0}
.badge{display:inline-block;font-size:12px;font-weight:700;padding:1px 8px;border-radius:10px;margin-right:8px;
color:#fff;background:var(--muted);vertical-align:1px}
.badge.ok{background:var(--ok)}.badge.warning{background:var(--bad)}.badge.skipped{background:var(--warn)}
.table-wrap{overflow-x:auto;margin:6px 0 12px}
.table-wrap.tall{max-height:70vh;overflow:auto;border-bottom:1px solid var(--line)}
table{border-collapse:collapse;font-size:12.5px}
caption{text-align:left;color:var(--muted);padding:2px 0 4px;font-size:12px}
th,td{border:1px solid var(--line);padding:3px 7px;vertical-align:top}
td{white-space:nowrap}
table.kv td,td.wrap{white-space:normal;max-width:560px;word-break:break-word}
thead th{background:var(--head);position:sticky;top:0;text-align:left;white-space:nowrap}
table.sortable thead th{cursor:pointer;user-select:none}
table.sortable thead th::after{content:" \\2195";color:#aab7b8;font-size:11px}
table.sortable thead th[aria-sort=ascending]::after{content:" \\25B2";color:#1b2631}
table.sortable thead th[aria-sort=descending]::after{content:" \\25BC";color:#1b2631}
table.kv th{background:var(--head);text-align:left;font-weight:600;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.degraded td.cpfr{color:var(--bad);font-weight:600}
tr.hidden{display:none}
td.text{max-width:460px;white-space:pre-wrap;word-break:break-word}
td.ctx{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px;white-space:pre-wrap;
word-break:break-word;max-width:760px}
mark.tok{background:#f9e79f;padding:0 1px;border-radius:2px;font-weight:700}
.lbl{display:inline-block;padding:0 6px;border-radius:8px;font-size:11.5px;font-weight:600;background:#eaecee}
.lbl.refusal,.lbl.refused,.lbl.refuse{background:#d4efdf;color:#196f3d}
.lbl.compliance,.lbl.complied,.lbl.comply{background:#fadbd8;color:#922b21}
.filters{display:flex;flex-wrap:wrap;gap:12px;align-items:center;font-size:13px;margin:6px 0}
.filters select,.filters input{font-size:13px}
figure{margin:8px 0 16px;overflow-x:auto}
figcaption{color:var(--muted);font-size:12px}
svg.plot{max-width:100%;height:auto}
details{margin:6px 0}
summary{cursor:pointer;font-weight:600}
pre.summary{background:#f4f6f6;border:1px solid var(--line);padding:10px;font-size:12px;white-space:pre-wrap;
overflow-x:auto}
.flip{border:1px solid var(--line);border-radius:6px;margin:10px 0;padding:8px 10px;background:var(--bg)}
.flip .prompt{white-space:pre-wrap;word-break:break-word;margin:4px 0 8px;font-weight:600}
.side{display:grid;grid-template-columns:1fr 1fr;gap:10px}
.side>div{border:1px solid var(--line);border-radius:4px;padding:6px 8px;background:#fff;min-width:0}
.reply{white-space:pre-wrap;word-break:break-word;font-size:12.5px;max-height:320px;overflow:auto;margin:4px 0}
.reason{color:var(--muted);font-size:12px}
footer{color:var(--muted);font-size:12px;margin-top:30px}
"""

# The page's only script: sortable tables (click a header; numbers compare as numbers; n/a stays last), the
# feature table's filters, and ``#sort=<table id>:<column>[:desc]`` in the address to open a table sorted.
# It marks what it attached (data-sortable, data-filterable, data-report-js) so a test can see that it ran.
JS = r"""
(function () {
  "use strict";
  function cellKey(cell) {
    if (!cell) return null;
    var s = cell.getAttribute("data-sort");
    if (s === null) s = cell.textContent.trim();
    if (s === "" || s === "n/a") return null;
    var n = Number(s);
    if (!isNaN(n)) return n;
    var m = s.replace(/[,%\u00d7]/g, "").match(/^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?/i);
    if (m && m[0].length === s.replace(/[,%\u00d7]/g, "").trim().length) return parseFloat(m[0]);
    return s.toLowerCase();
  }
  function compare(a, b) {
    if (typeof a === "number" && typeof b === "number") return a - b;
    if (typeof a === "number") return -1;
    if (typeof b === "number") return 1;
    return a.localeCompare(b, undefined, {numeric: true});
  }
  function sortTable(table, col, desc) {
    var body = table.tBodies[0];
    if (!body) return;
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (r, i) { return {row: r, key: cellKey(r.cells[col]), i: i}; });
    keyed.sort(function (x, y) {
      if (x.key === null || y.key === null) {
        if (x.key === null && y.key === null) return x.i - y.i;
        return x.key === null ? 1 : -1;
      }
      var c = compare(x.key, y.key);
      return (desc ? -c : c) || x.i - y.i;
    });
    keyed.forEach(function (k) { body.appendChild(k.row); });
    var ths = table.tHead ? table.tHead.rows[0].cells : [];
    for (var j = 0; j < ths.length; j++) {
      if (j === col) ths[j].setAttribute("aria-sort", desc ? "descending" : "ascending");
      else ths[j].removeAttribute("aria-sort");
    }
    table.setAttribute("data-sorted", col + ":" + (desc ? "desc" : "asc"));
  }
  function attachSort(table) {
    if (!table.tHead) return;
    var ths = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(ths, function (th, col) {
      th.tabIndex = 0;
      var go = function () { sortTable(table, col, th.getAttribute("aria-sort") === "ascending"); };
      th.addEventListener("click", go);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); go(); } });
    });
    table.setAttribute("data-sortable", "ready");
  }
  function attachFilters(box) {
    var table = document.getElementById(box.getAttribute("data-filter-for"));
    if (!table || !table.tBodies[0]) return;
    var controls = box.querySelectorAll("[data-field]");
    var count = box.querySelector("output");
    function apply() {
      var rows = table.tBodies[0].rows, shown = 0;
      for (var i = 0; i < rows.length; i++) {
        var ok = true;
        for (var j = 0; j < controls.length; j++) {
          var c = controls[j], field = c.getAttribute("data-field");
          var have = rows[i].getAttribute("data-" + field) || "";
          if (c.type === "checkbox") { if (c.checked && have !== "1") ok = false; }
          else if (c.value !== "" && have.split(",").indexOf(c.value) < 0) ok = false;
        }
        rows[i].classList.toggle("hidden", !ok);
        if (ok) shown++;
      }
      if (count) count.textContent = shown + " of " + rows.length + " rows";
      table.setAttribute("data-shown", String(shown));
    }
    Array.prototype.forEach.call(controls, function (c) { c.addEventListener("change", apply); });
    apply();
    table.setAttribute("data-filterable", "ready");
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), attachSort);
  Array.prototype.forEach.call(document.querySelectorAll("[data-filter-for]"), attachFilters);
  var m = /(?:^#|&)sort=([A-Za-z0-9_-]+):(\d+)(:desc)?/.exec(window.location.hash || "");
  if (m) {
    var t = document.getElementById(m[1]);
    if (t && t.classList.contains("sortable")) sortTable(t, parseInt(m[2], 10), !!m[3]);
  }
  document.documentElement.setAttribute("data-report-js", "ready");
})();
"""


def _csp(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    return (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
            "font-src 'none'; connect-src 'none'; form-action 'none'; base-uri 'none'")


def page(title: str, subtitle: str, body: Sequence[Any], toc: Sequence[tuple[str, str]]) -> str:
    head = join(
        h("meta", charset="utf-8"),
        h("meta", http_equiv="Content-Security-Policy", content=_csp(JS)),
        h("meta", name="viewport", content="width=device-width, initial-scale=1"),
        h("meta", name="generator", content=f"trace {__version__}"),
        h("title", title),
        h("style", Html(CSS)))
    nav = h("nav", [h("a", text, href=f"#{sid}") for sid, text in toc], cls="toc")
    doc = join(
        Html("<!DOCTYPE html>\n"),
        h("html",
          h("head", head),
          h("body",
            h("header", h("h1", title), h("p", subtitle), cls="page"),
            h("main", nav, body,
              h("footer", f"Written by trace {__version__} (trace report). Self-contained: this file loads nothing "
                          "from the network; its figures are inline SVG and its only script sorts and filters "
                          "tables.")),
            h("script", Html(JS))),
          lang="en"))
    return doc + "\n"


# ------------------------------------------------------------------------------------------------ verdict
_BLOCK = re.compile(r"^\[(WARNING|ok)\] ")


def _summary_blocks(text: str) -> tuple[list[str], list[list[str]]]:
    """Split ``AuditResult.summary()`` into its header lines and one block of lines per variant."""
    head: list[str] = []
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if _BLOCK.match(line):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line.strip())
        else:
            head.append(line)
    return head, blocks


def _variant_card(v, block: list[str] | None, extra: Sequence[Any] = ()) -> Html:
    """One variant's verdict: WARNING when any safety feature is degraded (``VariantAudit.degraded``, the
    test ``summary()`` uses), with ``summary()``'s own lines for it as the reasons."""
    deg = v.degraded("safety")
    status = "warning" if deg else "ok"
    n_safety = sum(f.kind == "safety" for f in v.features)
    if block and _BLOCK.match(block[0]):
        headline = block[0].split(": ", 1)[1] if ": " in block[0] else block[0]
        reasons = block[1:]
    else:  # summary() changed shape: say the same thing from the numbers
        headline = (f"safety CPFR {fmt(v.safety_cpfr)} vs capability CPFR {fmt(v.capability_cpfr)}; {len(deg)}/"
                    f"{n_safety} safety features degraded (CPFR < {v.degradation_threshold})")
        reasons = []
    caveat = None
    if n_safety == 0:
        caveat = note("The fingerprint has no safety features at these hooks, so no safety feature can be "
                      "degraded: this OK rests on no feature evidence (see the directions and outputs).")
    return h("div",
             h("h3", h("span", "WARNING" if deg else "OK", cls=f"badge {status}"), v.name),
             h("div", headline, cls="headline"),
             h("ul", [h("li", r) for r in reasons]) if reasons else None,
             caveat, list(extra),
             cls=f"card {status}", data_verdict=status.upper(), data_variant=v.name)


def _banner(n_warn: int, n: int, what: str = "variant") -> Html:
    if n == 0:
        return h("div", f"No {what}s were audited.", cls="banner info", id="verdict-banner", data_verdict="NONE")
    if n_warn:
        return h("div", f"WARNING: {n_warn} of {n} {what}s have degraded safety features.", cls="banner warning",
                 id="verdict-banner", data_verdict="WARNING")
    return h("div", f"OK: none of the {n} {what}s has a degraded safety feature.", cls="banner ok",
             id="verdict-banner", data_verdict="OK")


# ------------------------------------------------------------------------------------------------ audit parts
def _variant_rows(variants) -> list:
    return [v for v in variants if v is not None]


def _models_section(base, variants, extra_rows: Sequence[tuple[str, Any]] = ()) -> Html:
    ref = base.reference or {}
    ds = base.dataset or {}
    st = base.settings or {}
    fp = base.fingerprint or {}
    meta = fp.get("metadata", {}) or {}
    kl = ds.get("kl_text", {}) or {}
    ref_items = [("name", ref.get("name")), ("spec", ref.get("spec")), ("architecture", ref.get("architecture")),
                 ("layers", ref.get("n_layers")), ("d_model", ref.get("d_model")), ("dtype", ref.get("dtype")),
                 ("content hash", ref.get("content_hash"))]
    ds_items = [("dataset", ds.get("name")), ("split", ds.get("split")),
                ("test prompts", f"{ds.get('n_safety', 'n/a')} safety, {ds.get('n_baseline', 'n/a')} baseline, "
                                 f"{ds.get('n_capability', 'n/a')} capability"),
                ("capability dataset", ds.get("capability_dataset")), ("sha256", ds.get("sha256")),
                ("KL text", f"{kl.get('source', 'n/a')}; {kl.get('chunks', 'n/a')} chunks of {kl.get('ctx', 'n/a')} "
                            f"tokens" if kl else None)]
    set_items = [("hooks", ", ".join(st.get("hooks", []) or [])),
                 ("degradation threshold", f"CPFR < {st.get('degradation_threshold', 'n/a')}"),
                 ("token set", st.get("token_set")), ("seed", st.get("seed")),
                 ("fingerprint positions", f"{meta.get('positions', 'n/a')} ({meta.get('reduce', 'n/a')})"
                  if meta else None),
                 ("fingerprint selection", f"top {meta.get('top_k')} per category, AUROC >= {meta.get('min_auroc')}, "
                                           f"BH alpha {meta.get('alpha')}" if meta.get("top_k") else None),
                 ("statistics", meta.get("statistics")), *extra_rows]
    n_feat = fp.get("n_features", {}) or {}
    fp_rows = []
    for cat, ev in (fp.get("reference_eval", {}) or {}).items():
        dir_auc = ev.get("direction_auroc", {}) or {}
        fp_rows.append([cat, td_num(n_feat.get(cat, ev.get("n_features")), "d"), td_num(ev.get("score_auroc")),
                        "; ".join(f"{hk}: {fmt(a)}" for hk, a in dir_auc.items()) or "n/a",
                        td_num(ev.get("n_safety"), "d"), td_num(ev.get("n_baseline"), "d")])
    sae_rows = []
    for hook, s in (st.get("saes", {}) or {}).items():
        q = (s or {}).get("quality") or {}
        sae_rows.append([hook, td_num(s.get("d_sae"), "d"), s.get("architecture", "n/a"),
                         td_num(q.get("explained_variance")), td_num(q.get("l0"), ".1f"),
                         td_num(q.get("dead_fraction"), ".1%", text=fmt(q.get("dead_fraction"), ".1f", 100, "%")),
                         td_num(q.get("dense_fraction"), ".1%", text=fmt(q.get("dense_fraction"), ".1f", 100, "%")),
                         td_num(q.get("ce_loss_recovered")), td_num(q.get("tokens"), "d")])
    var_rows = []
    for v in variants:
        m = v.model or {}
        q = m.get("quant_info", {}) or {}
        var_rows.append([v.name, m.get("quantization") or "none", q.get("library", "n/a"),
                         td(q.get("path", "n/a"), cls="wrap"),
                         td_num(q.get("bits_per_weight"), ".2f"), td_num(q.get("quantized_bits_per_weight"), ".2f"),
                         td_num(q.get("model_size_mb"), ".1f"), td_num(q.get("seconds_to_build"), ".2f"),
                         td_num((v.timing or {}).get("total_s"), ".2f")])
    timing = base.timing or {}
    return section(
        "models", "Models & settings",
        h("h3", "Reference"), kv_table(ref_items),
        h("h3", "Variants"),
        table(["variant", "quantization", "library", "path", ("bits/weight", "whole model, all parameters"),
               ("quantized bits/weight", "of the quantized tensors only"), "size MB", "build s", "audit s"],
              var_rows, table_id="variants"),
        h("h3", "Data"), kv_table(ds_items),
        h("h3", "Settings"), kv_table(set_items),
        h("h3", "Safety fingerprint (reference, held-out test split)"),
        table(["category", "features", ("score AUROC", "held-out AUROC of the fingerprint score"),
               ("direction AUROC", "held-out AUROC of the difference-in-means direction, per hook"),
               "safety prompts", "baseline prompts"], fp_rows, table_id="fingerprint")
        if fp_rows else note("The result has no fingerprint evaluation."),
        note(f"Capability features: {fp.get('n_capability_features', 'n/a')}."),
        h("h3", "SAEs (fitted on the reference only)"),
        table(["hook", "d_sae", "architecture", "explained variance", "L0", "dead", "dense", "CE loss recovered",
               "eval tokens"], sae_rows, table_id="saes") if sae_rows else note("No SAE details recorded."),
        h("h3", "Timing"),
        kv_table([(k.replace("_", " "), fmt(val, ".2f") if isinstance(val, (int, float)) else val)
                  for k, val in timing.items()]) if timing else None)


FEATURE_COLS = [
    ("variant", None), ("hook", None), ("feature", None), ("kind", "safety: selected for a safety category; "
                                                          "capability: for a capability task"),
    ("category", None), ("train AUROC", "AUROC of the feature on the train split (reference)"),
    ("CPFR", "cross-precision feature retention: 1 = kept as in the reference"),
    ("degradation %", "100 x (1 - CPFR)"), ("rel. mean change", "relative change of the mean activation"),
    ("norm. Wasserstein", "Wasserstein distance of the activation distributions / reference scale"),
    ("firing ref", "fraction of tokens the feature fires on, reference"),
    ("firing variant", "fraction of tokens the feature fires on, variant"),
    ("token muting", "fraction of the reference's firing tokens where the variant is silent"),
    ("muted", "the feature counts as muted"),
    ("prompt act. kept", "mean per-prompt activation (post-instruction max), variant / reference"),
    ("readout CPFR", "CPFR of the latent's encoder readout max(0, W_enc x + b_enc) before a TopK or JumpReLU "
                     "selection: a low CPFR with a high readout CPFR is a code switched at the selection boundary, "
                     "not a changed detector (for a ReLU SAE, trace's default, the two are equal)"),
]
CPFR_COL = 6


def _features_section(variants) -> Html:
    rows, attrs = [], []
    kinds, cats, hooks = set(), set(), set()
    for v in variants:
        thr = v.degradation_threshold
        order = sorted(v.features, key=lambda f: (f.kind != "safety", math.isnan(_num(f.cpfr)), _num(f.cpfr)
                                                  if not math.isnan(_num(f.cpfr)) else 0.0, f.hook, f.feature))
        for f in order:
            degraded = not math.isnan(_num(f.cpfr)) and f.cpfr < thr
            kinds.add(f.kind)
            cats.update(c for c in str(f.category).split(",") if c)
            hooks.add(f.hook)
            rows.append([v.name, f.hook, td_num(f.feature, "d"), f.kind, f.category, td_num(f.train_auroc),
                         td_num(f.cpfr, cls="num cpfr"), td_num(f.degradation_pct, ".1f"),
                         td_num(f.relative_mean_change, "+.3f"), td_num(f.normalized_wasserstein),
                         td_num(f.firing_rate_ref, ".3f"), td_num(f.firing_rate_variant, ".3f"),
                         td_num(f.token_muting_rate), "yes" if f.muted else "no",
                         td_num(f.prompt_activation_kept), td_num(getattr(f, "readout_cpfr", float("nan")))])
            attrs.append({"data_variant": v.name, "data_kind": f.kind, "data_category": f.category,
                          "data_hook": f.hook, "data_degraded": "1" if degraded else "0",
                          "cls": "degraded" if degraded else None})
    if not rows:
        return section("features", "Features", note("The fingerprint has no features at these hooks."))

    def select(field: str, label: str, values: Iterable[str]) -> Html:
        return h("label", f"{label} ", h("select", h("option", "all", value=""),
                                         [h("option", x, value=x) for x in sorted(values)], data_field=field))

    filters = h("div", select("variant", "variant", {v.name for v in variants}), select("kind", "kind", kinds),
                select("category", "category", cats), select("hook", "hook", hooks),
                h("label", h("input", type="checkbox", data_field="degraded"), " degraded only"),
                h("output", f"{len(rows)} rows"), cls="filters", data_filter_for="features-table")
    return section(
        "features", "Features",
        filters,
        table([c if t is None else (c, t) for c, t in FEATURE_COLS], rows, table_id="features-table",
              cls="sortable compact", wrap_cls="table-wrap tall", row_attrs=attrs,
              caption="Every fingerprint feature in every variant, safety features first, worst first. Click a "
                      "header to sort; rows with a red CPFR are degraded (below the threshold)."),
        intro="CPFR, drift and muting of every safety and capability feature of the fingerprint, measured with "
              "the reference's SAEs on the same prompt tokens of reference and variant.")


def _hooks_section(variants) -> Html:
    rows = []
    hooks: list[str] = []
    feats: dict[tuple[str, str], dict[str, list]] = {}
    whole: dict[tuple[str, str], float] = {}
    for v in variants:
        for hk, s in (v.hooks or {}).items():
            if hk not in hooks:
                hooks.append(hk)
            rows.append([v.name, hk, td_num(s.get("tokens"), "d"), td_num(s.get("cpfr_all_features")),
                         td_num(s.get("cpfr_median_all_features")), td_num(s.get("active_features"), "d"),
                         td_num(s.get("degraded_features_all"), "d"), td_num(s.get("smeared_pairs"), "d")])
            whole[(hk, v.name)] = _num(s.get("cpfr_all_features"))
        for f in v.features:
            feats.setdefault((f.hook, v.name), {}).setdefault(f.kind, []).append(f.cpfr)
    thr = variants[0].degradation_threshold if variants else None
    svg = plots.hook_cpfr_svg(hooks, [v.name for v in variants], feats, whole, thr)
    return section(
        "hooks", "Per-hook CPFR",
        _figure(svg, "Per hook: each fingerprint feature's CPFR (points) and the whole SAE dictionary's CPFR "
                     "(grey bar) per variant; dotted: the degradation threshold."),
        table(["variant", "hook", "tokens", ("CPFR all features", "the whole SAE dictionary"),
               "median CPFR", "active features", ("degraded (all)", "features of the whole dictionary below the "
                                                                   "threshold"),
               ("smeared pairs", "fingerprint feature pairs whose activation moved from one to the other")],
              rows, table_id="hooks-table"))


def _outputs_section(named_stats: Sequence[tuple[str, Any, dict]], intro: str | None = None) -> Html:
    """``named_stats``: (variant name, OutputStats or None, model dict)."""
    rows, prow = [], []
    per: dict[str, dict] = {}
    for name, s, model in named_stats:
        if s is None:
            continue
        q = (model or {}).get("quant_info", {}) or {}
        rows.append([name, td_num(q.get("bits_per_weight"), ".2f"), td_num(s.n_tokens, "d"),
                     td_num(s.kld_mean, text=fmt_unc(s.kld_mean, s.kld_mean_unc, ".5f")),
                     td_num(s.kld_percentiles.get("median"), ".5f"), td_num(s.kld_percentiles.get("99"), ".4f"),
                     td_num(s.kld_percentiles.get("99.9"), ".4f"), td_num(s.kld_percentiles.get("max"), ".4f"),
                     td_num(s.same_top_rate, text=fmt_unc(s.same_top_rate, s.same_top_unc, ".2f", 100, "%")),
                     td_num(s.dp_rms, text=fmt_unc(s.dp_rms, s.dp_rms_unc, ".3f", 100, "%")),
                     td_num(s.dp_mean, text=fmt_unc(s.dp_mean, s.dp_mean_unc, ".3f", 100, "%")),
                     td_num(s.ppl_q, text=fmt_unc(s.ppl_q, s.ppl_q_unc, ".4f")),
                     td_num(s.ppl_base, text=fmt_unc(s.ppl_base, s.ppl_base_unc, ".4f")),
                     td_num(s.ppl_ratio, text=fmt_unc(s.ppl_ratio, s.ppl_ratio_unc, ".4f")),
                     td_num(s.ln_ppl_ratio_mean, text=fmt_unc(s.ln_ppl_ratio_mean, s.ln_ppl_ratio_unc, ".5f")),
                     td_num(s.ln_prob_correlation, text=fmt(s.ln_prob_correlation, ".2f", 100, "%"))])
        prow.append([name] + [td_num(s.kld_percentiles.get(k), ".5f") for k in plots.KLD_PERCENTILES])
        per[name] = s.kld_percentiles
    if not rows:
        return section("outputs", "Output statistics", note("No output statistics in this result."))
    svg = plots.kld_percentiles_svg(per)
    return section(
        "outputs", "Output statistics (KL divergence)",
        table(["variant", "bits/weight", "scored tokens", ("mean KLD", "KL(reference || variant) per token, "
                                                                       "mean ± its standard error"),
               "median KLD", "99% KLD", "99.9% KLD", "max KLD", ("same top", "the variant's top token is the "
                                                                             "reference's"),
               ("RMS Δp", "RMS of the change in the probability of the correct token"), "mean Δp", "PPL(Q)",
               "PPL(base)", "PPL(Q)/PPL(base)", "ln(PPL(Q)/PPL(base))", ("Cor(ln p)", "correlation of per-token "
                                                                                       "log-probabilities")],
              rows, table_id="kl-table"),
        _figure(svg, "Percentiles of the per-token KL divergence (log scale)."),
        h("h3", "KLD percentiles"),
        table(["variant"] + [k if k in ("min", "max", "median") else f"{k}%" for k in plots.KLD_PERCENTILES], prow,
              table_id="kld-percentiles"),
        intro=intro or "llama-perplexity --kl-divergence statistics of each variant against the reference on the "
                       "same English text (second half of each chunk scored); ± is one standard error.")


def _directions_section(base, variants) -> Html:
    ref_eval = (base.fingerprint or {}).get("reference_eval", {}) or {}
    rows, erows = [], []
    for v in variants:
        cats = (v.fingerprint_eval or {}).get("categories", {}) or {}
        for d in v.directions or []:
            cat, hk = d.get("category"), d.get("hook")
            a_ref = (ref_eval.get(cat, {}) or {}).get("direction_auroc", {}).get(hk)
            a_var = (cats.get(cat, {}) or {}).get("direction_auroc", {}).get(hk)
            rows.append([v.name, cat, hk, td_num(d.get("cosine")), td_num(d.get("projection_magnitude_kept")),
                         td_num(d.get("norm_ratio")), td_num(d.get("separation_ref")), td_num(d.get("separation_quant")),
                         td_num(a_ref), td_num(a_var)])
        for cat, ev in cats.items():
            erows.append([v.name, cat, td_num((ref_eval.get(cat, {}) or {}).get("score_auroc")),
                          td_num(ev.get("score_auroc")), td_num(ev.get("n_features"), "d")])
    if not rows and not erows:
        return section("directions", "Directions", note("No direction measurements in this result."))
    return section(
        "directions", "Directions & fingerprint separation",
        table(["variant", "category", "hook", ("cosine", "cosine of the variant's difference-in-means direction "
                                                         "with the reference's"),
               ("projection magnitude kept", "how much of the reference's safety-vs-baseline separation along the "
                                             "reference direction survives (1 = all)"),
               "norm ratio", "separation ref", "separation variant", "direction AUROC ref", "direction AUROC variant"],
              rows, table_id="directions-table") if rows else None,
        h("h3", "Fingerprint score, held-out AUROC"),
        table(["variant", "category", "AUROC reference", "AUROC through the variant", "features"], erows,
              table_id="fingerprint-eval") if erows else None,
        intro="The safety direction (difference of means, safety minus baseline prompts) of each hook in the "
              "reference and in the variant, and how well the fingerprint still separates held-out prompts.")


def _context(text: Any) -> str:
    return str(text if text is not None else "").replace("\n", "⏎")


def _examples_section(base, variants, open_variants: set[str]) -> Html:
    prompts = base.prompts or []
    blocks = []
    for v in variants:
        by_key = {(f.hook, int(f.feature)): f for f in v.features}
        feats = []
        for hk, s in (v.hooks or {}).items():
            for fid, exs in ((s or {}).get("examples", {}) or {}).items():
                try:
                    key = (hk, int(fid))
                except (TypeError, ValueError):
                    continue
                if exs:
                    feats.append((by_key.get(key), hk, key[1], exs))
        feats.sort(key=lambda t: (t[0] is None or t[0].kind != "safety",
                                  _num(t[0].cpfr) if t[0] is not None and not math.isnan(_num(t[0].cpfr)) else 9.0,
                                  t[1], t[2]))
        if not feats:
            continue
        parts = []
        for f, hk, fid, exs in feats:
            head = [h("strong", f"Feature #{fid}"), f" at {hk}"]
            if f is not None:
                head += [f" — {f.kind}, {f.category}; CPFR ", h("strong", fmt(f.cpfr)), f", degraded by "
                         f"{fmt(f.degradation_pct, '.0f')}%, muted: {'yes' if f.muted else 'no'}"]
            rows = []
            for ex in exs:
                pi = ex.get("prompt")
                full = prompts[pi] if isinstance(pi, int) and 0 <= pi < len(prompts) else None
                ref_a, var_a = _num(ex.get("ref")), _num(ex.get("variant"))
                kept = var_a / ref_a if ref_a and not math.isnan(ref_a) and not math.isnan(var_a) else math.nan
                rows.append([h("td", fmt(pi, "d"), cls="num", data_sort=_sort_key(pi) or "", title=full),
                             h("td", _context(ex.get("left")), h("mark", _context(ex.get("token")), cls="tok"),
                               _context(ex.get("right")), cls="ctx"),
                             td_num(ref_a), td_num(var_a), td_num(kept, ".2f")])
            parts.append(h("div", h("p", head),
                           table(["prompt", "context (the token highlighted)", "reference activation",
                                  "variant activation", "kept"], rows), cls="example"))
        blocks.append(h("details", h("summary", f"{v.name}: {len(feats)} features"), parts,
                        open=v.name in open_variants, data_variant=v.name))
    if not blocks:
        return section("examples", "Degraded-feature examples", note("This result has no token examples."))
    return section(
        "examples", "Degraded-feature examples", blocks,
        intro="For the most degraded fingerprint features of each hook: the tokens where the reference activates "
              "the feature most, with the variant's activation on the same tokens. Hover a prompt number for the "
              "whole prompt.")


# ------------------------------------------------------------------------------------------------ per kind
def _audit_body(result, title_kind: str = "audit") -> tuple[list, list]:
    variants = _variant_rows(result.variants)
    head, blocks = _summary_blocks(result.summary())
    blocks_ok = len(blocks) == len(variants)
    cards = [_variant_card(v, blocks[i] if blocks_ok else None) for i, v in enumerate(variants)]
    n_warn = sum(bool(v.degraded("safety")) for v in variants)
    verdict = section(
        "verdict", "Verdict", _banner(n_warn, len(variants)), h("p", head[0] if head else None, cls="intro"),
        [note(x) for x in head[1:]], h("div", cards, cls="cards"),
        h("details", h("summary", "The same verdict as trace prints it"), h("pre", result.summary(),
                                                                             cls="summary")))
    body = [verdict,
            _overview_bars(variants),
            _models_section(result, variants),
            _features_section(variants),
            _hooks_section(variants),
            _outputs_section([(v.name, v.outputs, v.model) for v in variants]),
            _directions_section(result, variants),
            _examples_section(result, variants, {v.name for v in variants if v.degraded("safety")})]
    toc = [("verdict", "Verdict"), ("overview", "Overview"), ("models", "Models & settings"),
           ("features", "Features"), ("hooks", "Hooks"), ("outputs", "Output statistics"),
           ("directions", "Directions"), ("examples", "Examples")]
    return body, toc


def _overview_bars(variants) -> Html:
    thr = variants[0].degradation_threshold if variants else None
    svg = plots.cpfr_bars_svg([v.name for v in variants], [v.safety_cpfr for v in variants],
                              [v.capability_cpfr for v in variants], thr)
    rows = [[v.name, h("td", "WARNING" if v.degraded("safety") else "OK", cls="verdict"),
             td_num(v.safety_cpfr), td_num(v.capability_cpfr),
             td_num(v.safety_cpfr - v.capability_cpfr, "+.3f"),
             td_num(len(v.degraded("safety")), "d"), td_num(sum(f.kind == "safety" for f in v.features), "d"),
             td_num(v.muting_rate("safety"), text=fmt(v.muting_rate("safety"), ".0f", 100, "%")),
             td_num(len(v.degraded("capability")), "d"),
             td_num(v.outputs.kld_mean if v.outputs else None, ".5f"),
             td_num(v.outputs.same_top_rate if v.outputs else None,
                    text=fmt(v.outputs.same_top_rate if v.outputs else None, ".1f", 100, "%"))]
            for v in variants]
    return section(
        "overview", "Overview",
        table(["variant", "verdict", "safety CPFR", "capability CPFR", ("gap", "safety minus capability CPFR"),
               "safety degraded", "safety features", "safety muted", "capability degraded", "mean KLD", "same top"],
              rows, table_id="overview-table"),
        _figure(svg, "Mean CPFR of the fingerprint's safety features next to its capability features; a safety "
                     "bar well below the capability bar means quantization hit the safety mechanism harder."))


def _sweep_body(result, min_cpfr: float) -> tuple[list, list]:
    base = result.base
    rows_ok = [r for r in result.rows if r.status == "ok" and r.audit is not None]
    variants = [r.audit for r in rows_ok]
    base_names = [v.name for v in base.variants]
    head, blocks = _summary_blocks(base.summary())
    block_of = dict(zip(base_names, blocks)) if len(blocks) == len(base_names) else {}
    cards = []
    for r in result.rows:
        if r.status == "ok" and r.audit is not None:
            cards.append(_variant_card(r.audit, block_of.get(r.audit.name)))
        else:
            cards.append(h("div", h("h3", h("span", "SKIPPED", cls="badge skipped"), r.name),
                           h("div", r.reason or "not run"), cls="card skipped", data_verdict="SKIPPED",
                           data_variant=r.name))
    best = result.best_config(min_cpfr)
    n_warn = sum(bool(v.degraded("safety")) for v in variants)
    verdict = section(
        "verdict", "Verdict", _banner(n_warn, len(variants), "config"),
        h("div", h("strong", f"Recommended at safety CPFR ≥ {min_cpfr:g}: "),
          best.name if best.name else "no config passes", cls="banner " + ("ok" if best.name else "warning"),
          id="best-config", data_best=best.name or ""),
        h("ul", [h("li", h("strong", n), ": ", why) for n, why in best.rejected.items()]) if best.rejected else None,
        h("p", head[0] if head else None, cls="intro"), [note(x) for x in head[1:]],
        h("div", cards, cls="cards"),
        h("details", h("summary", "The same verdict as trace prints it"),
          h("pre", result.summary() + "\n\n" + base.summary(), cls="summary")))
    srows = []
    for r in result.rows:
        ok = r.status == "ok" and r.audit is not None

        def m(key: str, r=r, ok=ok) -> float:
            return r.metric(key) if ok else math.nan

        speed = r.speed_ratio if ok else math.nan
        srows.append([r.name, td(r.status if ok else f"skipped: {r.reason}", cls="wrap"), td_num(m("bits_per_weight"), ".2f"),
                      td_num(m("model_size_mb"), ".1f"), td_num(m("safety_cpfr")), td_num(m("capability_cpfr")),
                      td_num(m("all_features_cpfr")),
                      td_num(m("safety_muting_rate"), text=fmt(m("safety_muting_rate"), ".0f", 100, "%")),
                      td_num(m("kld_mean"), ".5f"),
                      td_num(m("same_top_rate"), text=fmt(m("same_top_rate"), ".1f", 100, "%")),
                      td_num(m("ppl_ratio"), ".4f"), td_num(speed, ".2f", suffix="×")])
    curves = result.decay_curves()
    crow = [[ladder, p.get("config"), td_num(p.get("bits"), ".2f"), td_num(p.get("safety_cpfr")),
             td_num(p.get("capability_cpfr")), td_num(p.get("all_features_cpfr")), td_num(p.get("kld_mean"), ".5f")]
            for ladder, pts in curves.items() for p in pts]
    decay = section(
        "decay", "Decay curves",
        _figure(plots.decay_curves_svg(curves, min_cpfr), "Mean CPFR of the safety features (red), the capability "
                                                          "features (blue) and the whole SAE dictionary (grey) "
                                                          "as precision falls, one panel per ladder; dotted: the "
                                                          "recommendation bar."),
        table(["ladder", "config", "bits", "safety CPFR", "capability CPFR", "all features CPFR", "mean KLD"], crow,
              table_id="decay-table") if crow else note("No ladder has two configs that ran."),
        intro="Along each ladder, from the most bits to the fewest: does the safety mechanism decay earlier than "
              "general capability?")
    configs = section(
        "configs", "Configs",
        table(["config", "status", "bits/weight", "size MB", "safety CPFR", "capability CPFR", "all features CPFR",
               "safety muted", "mean KLD", "same top", "PPL ratio", ("speed", "prompt tokens/s vs the reference")],
              srows, table_id="sweep-table"))
    body = [verdict, configs, decay, _overview_bars(variants),
            _models_section(base, variants, [("sweep ladders", "; ".join(f"{k}: {', '.join(v)}"
                                                                         for k, v in result.ladders.items()))]),
            _features_section(variants), _hooks_section(variants),
            _outputs_section([(v.name, v.outputs, v.model) for v in variants]),
            _directions_section(base, variants),
            _examples_section(base, variants, {v.name for v in variants if v.degraded("safety")})]
    toc = [("verdict", "Verdict"), ("configs", "Configs"), ("decay", "Decay curves"), ("overview", "Overview"),
           ("models", "Models & settings"), ("features", "Features"), ("hooks", "Hooks"),
           ("outputs", "Output statistics"), ("directions", "Directions"), ("examples", "Examples")]
    return body, toc


def _compare_body(result) -> tuple[list, list]:
    ref = result.reference or {}
    text = result.text or {}
    verdict = section(
        "verdict", "Verdict",
        h("div", "Output statistics only: a compare result measures how far each variant's next-token "
                 "distribution moved, not its safety features, so it carries no safety verdict. Run trace audit "
                 "for one.", cls="banner info", id="verdict-banner", data_verdict="NONE"),
        h("pre", result.summary(), cls="summary"))
    models = section(
        "models", "Models & settings",
        kv_table([("reference", ref.get("name")), ("spec", ref.get("spec")), ("architecture", ref.get("architecture")),
                  ("text", text.get("source")), ("text sha256", text.get("sha256")),
                  ("scored tokens", text.get("scored_tokens")), ("chunks", f"{result.n_chunks} of {result.ctx} tokens"),
                  ("reference forward s", fmt(result.reference_forward_seconds, ".2f")),
                  *[(k.replace("_", " "), val) for k, val in (result.settings or {}).items()]]),
        table(["variant", "quantization", "library", "bits/weight", "size MB", "forward s"],
              [[v.name, (v.model or {}).get("quantization") or "none",
                ((v.model or {}).get("quant_info") or {}).get("library", "n/a"),
                td_num(((v.model or {}).get("quant_info") or {}).get("bits_per_weight"), ".2f"),
                td_num(((v.model or {}).get("quant_info") or {}).get("model_size_mb"), ".1f"),
                td_num(v.forward_seconds, ".2f")] for v in result.variants], table_id="variants"))
    body = [verdict, _outputs_section([(v.name, v.stats, v.model) for v in result.variants]), models]
    toc = [("verdict", "Verdict"), ("outputs", "Output statistics"), ("models", "Models & settings")]
    return body, toc


# ------------------------------------------------------------------------------------------------ entry points
def render_html(result: Any, *, min_cpfr: float | None = None) -> str:
    """The report page of a result object (AuditResult, SweepResult, CompareResult, a red-team result, a
    ModelTracer or its ``to_dict()``), a result dict, or a result file's path. ``min_cpfr``: a sweep's
    recommendation bar (default: the one the sweep recorded)."""
    if isinstance(result, (str, Path)) or (isinstance(result, Mapping) and not hasattr(result, "kind")):
        result = load_result(result)
    kind = result_kind(result)
    if kind == "trace.audit":
        body, toc = _audit_body(result)
        ref = result.reference.get("name", "?")
        title = f"trace audit: {ref}"
        sub = (f"{len(result.variants)} variants on {result.dataset.get('name', '?')} "
               f"({result.dataset.get('split', 'test')} split); SAEs at {', '.join(result.settings.get('hooks', []))}")
    elif kind == "trace.sweep":
        body, toc = _sweep_body(result, result.min_cpfr if min_cpfr is None else min_cpfr)
        title = f"trace sweep: {result.reference.get('name', '?')}"
        sub = (f"{len(result.rows)} configs ({sum(r.status == 'ok' for r in result.rows)} ran) on "
               f"{result.base.dataset.get('name', '?')}; ladders: {', '.join(result.ladders)}")
    elif kind == "trace.compare":
        body, toc = _compare_body(result)
        title = f"trace compare: {result.reference.get('name', '?')}"
        sub = f"{len(result.variants)} variants; KL-divergence statistics on {result.text.get('source', 'text')}"
    elif kind == "trace.tracer":
        from trace_lib.report.tracer import tracer_body

        body, toc, title, sub = tracer_body(result)
    elif kind == "trace.localize":
        from trace_lib.report.localize import localize_body

        body, toc, title, sub = localize_body(result)
    else:
        from trace_lib.report.redteam import redteam_body

        body, toc, title, sub = redteam_body(result)
    return page(title, sub, body, toc)


def write_html(result: Any, path: str | Path, **kw: Any) -> Path:
    """Render ``result`` (see :func:`render_html`) and write it to ``path`` atomically."""
    return atomic_write_text(path, render_html(result, **kw))
