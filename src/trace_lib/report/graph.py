"""The ``trace.graph`` report page: the pruned attribution graph as a layered node-link SVG (x = token position,
y = layer: tokens at the bottom, logits at the top), node radius by influence, edge opacity by |weight|, hover
titles; with a variant, the union of both graphs with nodes coloured kept / lost / new, and the diff's tables.

The SVG is built from escaped pieces (:func:`trace_lib.report.kit.h`), so prompt tokens and labels cannot inject
markup; it needs no script and no network.
"""

from __future__ import annotations

from typing import Any

from trace_lib.report.kit import Html, fmt, h, join, kv_table, note, section, table, td_num
from trace_lib.report.kit import as_dict as _d
from trace_lib.report.kit import as_list as _l
from trace_lib.report.kit import num as _num

COLORS = {"kept": "#1b6ca8", "lost": "#c0392b", "new": "#0b8a5f", "logit": "#7a4fa0", "embedding": "#666666",
          "mlp reconstruction error": "#c9711a"}
COL_W, ROW_H, PAD = 64, 46, 40


def _row(layer: str, n_layers: int) -> int:
    """Row from the bottom: tokens 0, block l at l + 1, logits at n_layers + 1."""
    return 0 if layer == "E" else int(layer) + 1 if int(layer) < n_layers else n_layers + 1


def _n_layers(nodes: list[dict]) -> int:
    logit = [int(n["layer"]) for n in nodes if n.get("feature_type") == "logit" and str(n.get("layer")).isdigit()]
    if logit:
        return logit[0] - 1
    return max([int(n["layer"]) for n in nodes if str(n.get("layer")).isdigit()] or [0]) + 1


def _title(n: dict, status: str | None) -> str:
    kind = n.get("feature_type")
    parts = [f"node {n.get('node_id')}", f"kind {kind}", f"layer {n.get('layer')}", f"position {n.get('ctx_idx')}"]
    if kind == "cross layer transcoder":
        parts.insert(1, f"feature {str(n.get('node_id')).split('_')[1]}")
    if n.get("activation") is not None:
        parts.append(f"activation {fmt(n.get('activation'), '.4g')}")
    if n.get("influence") is not None:
        parts.append(f"influence (cumulative) {fmt(n.get('influence'), '.3f')}")
    if n.get("clerp"):
        parts.append(str(n["clerp"]))
    if status:
        parts.append(status)
    return "\n".join(parts)


def graph_svg(ref: dict, var: dict | None, tokens: list[str]) -> Html:
    """The layered SVG of ``ref`` (a ``{"nodes", "links"}`` pruned graph); with ``var`` the union of both."""
    nodes = {n["node_id"]: n for n in _l(ref.get("nodes"))}
    status: dict[str, str] = {}
    links = [(lk, "ref") for lk in _l(ref.get("links"))]
    if var is not None:
        vnodes = {n["node_id"]: n for n in _l(var.get("nodes"))}
        status = {i: ("kept" if i in vnodes else "lost") for i in nodes}
        for i, n in vnodes.items():
            if i not in nodes:
                nodes[i], status[i] = n, "new"
        ref_ends = {(lk["source"], lk["target"]) for lk in _l(ref.get("links"))}
        links += [(lk, "new") for lk in _l(var.get("links")) if (lk["source"], lk["target"]) not in ref_ends]
    n_layers = _n_layers(list(nodes.values()))
    n_pos = max([len(tokens)] + [int(n.get("ctx_idx", 0)) + 1 for n in nodes.values()])
    cells: dict[tuple[int, int], list[str]] = {}
    for i, n in sorted(nodes.items()):
        cells.setdefault((int(n.get("ctx_idx", 0)), _row(str(n.get("layer")), n_layers)), []).append(i)
    width, height = PAD * 2 + COL_W * n_pos, PAD * 2 + ROW_H * (n_layers + 1) + 24
    xy: dict[str, tuple[float, float]] = {}
    for (pos, row), ids in cells.items():
        for k, i in enumerate(ids):
            off = (k - (len(ids) - 1) / 2) * min(10.0, (COL_W - 12) / max(1, len(ids)))
            xy[i] = (PAD + COL_W * pos + COL_W / 2 + off, height - PAD - 24 - ROW_H * row)
    wmax = max([abs(_num(lk.get("weight"))) for lk, _ in links if _num(lk.get("weight")) == _num(lk.get("weight"))]
               or [1.0]) or 1.0
    parts: list[Any] = []
    for row in range(n_layers + 2):
        y = height - PAD - 24 - ROW_H * row
        name = "tokens" if row == 0 else "logits" if row == n_layers + 1 else f"L{row - 1}"
        parts.append(h("line", x1=PAD, x2=width - PAD / 2, y1=y, y2=y, stroke="#eeeeee"))
        parts.append(h("text", name, x=4, y=y + 4, font_size=10, fill="#777777"))
    for pos, tok in enumerate(tokens):
        parts.append(h("text", tok, x=PAD + COL_W * pos + COL_W / 2, y=height - 8, font_size=10,
                       text_anchor="middle", fill="#333333"))
    for lk, kind in links:
        s, t = xy.get(lk.get("source")), xy.get(lk.get("target"))
        if s is None or t is None:
            continue
        w = _num(lk.get("weight"))
        opacity = 0.08 + 0.8 * min(1.0, abs(w) / wmax) if w == w else 0.1
        color = COLORS["new"] if kind == "new" else ("#2a6fdb" if w >= 0 else "#d9534f")
        parts.append(h("line", h("title", f"{lk.get('source')} -> {lk.get('target')}: weight {fmt(w, '.4g')}"),
                       x1=f"{s[0]:.1f}", y1=f"{s[1]:.1f}", x2=f"{t[0]:.1f}", y2=f"{t[1]:.1f}", stroke=color,
                       stroke_opacity=f"{opacity:.3f}", stroke_width="1.2",
                       stroke_dasharray="3 2" if kind == "new" else None, cls="edge"))
    for i, n in nodes.items():
        x, y = xy[i]
        infl = n.get("influence")
        r = 3.0 + 6.0 * (1.0 - min(1.0, max(0.0, _num(infl)))) if infl is not None else 6.0
        st = status.get(i)
        fill = COLORS[st] if st else COLORS.get(n.get("feature_type"), COLORS["kept"])
        parts.append(h("circle", h("title", _title(n, st)), cx=f"{x:.1f}", cy=f"{y:.1f}", r=f"{r:.1f}", fill=fill,
                       stroke="#ffffff", stroke_width="0.8", cls=f"node {st or ''}".strip(),
                       data_node=i))
    # kit.h refuses camel-case attribute names (viewBox): the root tag is written here, from integers only.
    return Html(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {int(width)} {int(height)}" '
                f'width="{int(width)}" height="{int(height)}" role="img" class="plot graph" '
                f'aria-label="attribution graph">{join(*parts)}</svg>')


def _changes(items: list[dict], caption: str, table_id: str):
    rows = [[c.get("id"), td_num(c.get("ref"), ".4g"), td_num(c.get("var"), ".4g"), td_num(c.get("delta"), "+.4g")]
            for c in items]
    return table(["id", "reference", "variant", "change"], rows, table_id=table_id, caption=caption)


def graph_body(result: Any) -> tuple[list, list, str, str]:
    d = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    ref, var, diff = _d(d.get("reference")), d.get("variant"), d.get("diff")
    model, tc, settings = _d(d.get("model")), _d(d.get("transcoders")), _d(d.get("settings"))
    tokens = [str(t) for t in _l(d.get("tokens"))]
    body, toc = [], []
    rs, rc = _d(ref.get("scores")), _d(ref.get("counts"))
    items = [("prompt", d.get("prompt")), ("tokens", len(tokens)),
             ("target", ", ".join(f"{t.get('label')} ({fmt(t.get('weight'), '.3f')})" for t in _l(d.get("targets")))),
             ("replacement score", fmt(rs.get("replacement"))), ("completeness score", fmt(rs.get("completeness"))),
             ("nodes / edges kept", f"{rc.get('n_nodes_kept')} / {rc.get('n_links')}"),
             ("active features", rc.get("n_active_features"))]
    if diff:
        dd = _d(diff)
        items += [("variant", _d(d.get("variant_model")).get("name")),
                  ("node / edge Jaccard", f"{fmt(dd.get('node_jaccard'))} / {fmt(dd.get('edge_jaccard'))}")]
    body.append(section("summary", "Summary", kv_table(items, table_id="summary-table")))
    toc.append(("summary", "Summary"))
    legend = ("Tokens at the bottom, logits at the top, one row per block; a node's radius grows with its "
              "influence on the logits, an edge's opacity with |weight| (blue positive, red negative). Hover for "
              "details.")
    if var is not None:
        legend += " Nodes: blue kept in both graphs, red lost (reference only), green new (variant only); " \
                  "dashed green edges appear only in the variant."
    body.append(section("graph", "Graph", h("figure", graph_svg(ref, var, tokens), h("figcaption", legend)),
                        intro="The pruned graph, as circuit-tracer's graph JSON holds it."))
    toc.append(("graph", "Graph"))
    if diff:
        dd = _d(diff)
        rows = [[k, td_num(_d(dd.get(k)).get("ref")), td_num(_d(dd.get(k)).get("var")),
                 td_num(_d(dd.get(k)).get("delta"), "+.3f")]
                for k in ("replacement_score", "completeness_score", "error_share")]
        body.append(section("diff", "Diff", table(["score", "reference", "variant", "change"], rows,
                                                  table_id="diff-scores"),
                            _changes(_l(dd.get("nodes_lost")), "nodes lost", "nodes-lost"),
                            _changes(_l(dd.get("nodes_new")), "nodes new", "nodes-new"),
                            _changes(_l(dd.get("edges_lost")), "edges lost", "edges-lost"),
                            _changes(_l(dd.get("edges_new")), "edges new", "edges-new"),
                            intro="Influence-weighted Jaccard overlap of kept nodes and edges; items ranked by "
                                  "|influence change|."))
        toc.append(("diff", "Diff"))
    nodes = sorted(_l(ref.get("nodes")), key=lambda n: _num(n.get("influence")) if n.get("influence") is not None
                   else -1.0)
    rows = [[n.get("node_id"), n.get("feature_type"), n.get("layer"), td_num(n.get("ctx_idx"), "d"),
             td_num(n.get("activation"), ".4g"), td_num(n.get("influence"), ".3f")] for n in nodes]
    body.append(section("nodes", "Nodes (reference)", table(["node", "kind", "layer", "position", "activation",
                                                             "influence"], rows, table_id="nodes-table")))
    toc.append(("nodes", "Nodes"))
    body.append(section("setup", "Setup", kv_table([
        ("model", model.get("name")), ("transcoders", tc.get("folder")), ("transcoder set", tc.get("scan")),
        ("width", tc.get("width")), ("node / edge threshold",
                                     f"{settings.get('node_threshold')} / {settings.get('edge_threshold')}"),
        ("max feature nodes", settings.get("max_feature_nodes")),
        ("chat-formatted prompt", settings.get("chat_formatted")),
        ("graph files", ", ".join(str(x) for x in (ref.get("file"), _d(var).get("file")) if x))],
        table_id="setup-table"), note("The graph JSON files open in circuit-tracer's frontend.")))
    toc.append(("setup", "Setup"))
    title = f"Attribution graph: {model.get('name')}"
    sub = f"{len(tokens)} tokens" + (f", variant {_d(d.get('variant_model')).get('name')}" if diff else "")
    return body, toc, title, sub
