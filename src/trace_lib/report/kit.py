"""The report's widget kit: escaped HTML pieces, numbers, tables, sections, and the page shell with its CSP.

Every page (:mod:`~trace_lib.report.audit`, :mod:`~trace_lib.report.sweep`, :mod:`~trace_lib.report.compare`,
:mod:`~trace_lib.report.redteam`, :mod:`~trace_lib.report.tracer`) is built from these pieces, so every page is
escaped and self-contained the same way.

The page holds everything it shows: inline CSS, inline SVG figures (see :mod:`trace_lib.report.plots`) and
a short inline script that makes tables sortable and the feature table filterable. It loads nothing: a
Content-Security-Policy allows no network, no inline script but that one (by its hash) and no event-handler
attributes, so even a page built from hostile text runs nothing else.

Every string that comes from a result (prompts, replies, model and config names, token texts, reasons) goes
through :func:`esc` (``html.escape(..., quote=True)``); the page is put together from :class:`Html` pieces
by :func:`h`, which escapes every child and attribute value that is not already an :class:`Html` piece.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from trace_lib import __version__


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
    """Pieces as one :class:`Html` (text escaped, lists flattened, None/False left out)."""
    return Html(_children(pieces))


# ------------------------------------------------------------------------------------------------ numbers
def as_dict(x: Any) -> dict:
    """A result field as a dict (a missing or malformed one as empty), so a page renders from any file."""
    return dict(x) if isinstance(x, Mapping) else {}


def as_list(x: Any) -> list:
    """A result field as a list (a missing or malformed one as empty)."""
    return list(x) if isinstance(x, (list, tuple)) else []


def num(x: Any) -> float:
    """A value as a float: NaN for None, booleans and non-numbers."""
    if isinstance(x, bool) or x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def fmt(x: Any, spec: str = ".3f", scale: float = 1.0, suffix: str = "") -> str:
    """A number as text; ``n/a`` for None/NaN/non-numbers."""
    v = num(x)
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if spec.endswith("d"):
        return format(round(v * scale), spec) + suffix
    return format(v * scale, spec) + suffix


def fmt_unc(x: Any, u: Any, spec: str = ".4f", scale: float = 1.0, suffix: str = "") -> str:
    """``x ± u``, both as :func:`fmt` writes them; ``x`` alone when ``u`` is not a number."""
    if math.isnan(num(u)):
        return fmt(x, spec, scale, suffix)
    return f"{fmt(x, spec, scale)} ± {fmt(u, spec, scale)}{suffix}"


def sort_key(x: Any) -> str | None:
    """A cell's ``data-sort``: the exact number's ``repr``; None for n/a."""
    v = num(x)
    return None if math.isnan(v) else repr(v)


def td_num(x: Any, spec: str = ".3f", scale: float = 1.0, suffix: str = "", text: str | None = None,
           cls: str = "num") -> Html:
    """A numeric cell: the formatted number shown, the exact value in ``data-sort`` (empty: n/a, sorted last)."""
    return h("td", fmt(x, spec, scale, suffix) if text is None else text, cls=cls,
             data_sort=sort_key(x) if sort_key(x) is not None else "")


def td(x: Any, **attrs: Any) -> Html:
    """A text cell (escaped)."""
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
    """A key/value table, one row per item; items whose value is None are left out."""
    rows = [h("tr", h("th", k, scope="row"), v if isinstance(v, Html) and v.startswith("<td") else td(v))
            for k, v in items if v is not None]
    return h("div", h("table", h("tbody", rows), cls="kv", id=table_id), cls="table-wrap")


def section(sid: str, title: str, *content: Any, intro: Any = None) -> Html:
    """A page section (``id`` = ``sid``, the table of contents' anchor) with its title and an optional intro."""
    return h("section", h("h2", title), h("p", intro, cls="intro") if intro else None, content, id=sid)


def note(*text: Any) -> Html:
    """A muted paragraph."""
    return h("p", *text, cls="note")


def figure(svg: str, caption: str) -> Html | None:
    """An inline SVG figure with its caption; None when there is nothing to draw."""
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
    """The Content-Security-Policy: nothing from the network, and no script but ``script`` (by its sha256)."""
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    return (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
            "font-src 'none'; connect-src 'none'; form-action 'none'; base-uri 'none'")


def page(title: str, subtitle: str, body: Sequence[Any], toc: Sequence[tuple[str, str]]) -> str:
    """The whole self-contained page: head (CSP, inline CSS), header, table of contents, ``body``, footer and
    :data:`JS`."""
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
