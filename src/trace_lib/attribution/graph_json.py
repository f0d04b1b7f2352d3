"""Attribution graphs as circuit-tracer's frontend reads them (``frontend/graph_models.py``,
``utils/create_graph_files.py``), and a validator for that schema.

The file is ``{"metadata", "qParams", "nodes", "links"}``. Nodes after pruning (:func:`prune_graph`), each with
circuit-tracer's fields ``node_id, feature, layer, ctx_idx, feature_type, token_prob, is_target_logit, run_idx,
reverse_ctx_idx, jsNodeId, clerp, influence, activation``; ``influence`` is the node's cumulative-influence
score (the frontend's pruning slider compares it with a threshold). Per kind:

=========  ======================  ==========================  ==============  =======================
kind       node_id                 feature                     layer           feature_type
=========  ======================  ==========================  ==============  =======================
feature    ``{layer}_{feat}_{pos}``  Cantor pair (layer, feat)   ``"{layer}"``   cross layer transcoder
error      ``{layer}_-1_{pos}``      -1                          ``"{layer}"``   mlp reconstruction error
token      ``E_{token_id}_{pos}``    pos                         ``"E"``         embedding
logit      ``{L+1}_{vocab}_{pos}``   vocab index                 ``"{L+1}"``     logit
=========  ======================  ==========================  ==============  =======================

(L the number of layers; a custom target's vocab index is ``vocab_size + i``.) circuit-tracer 0.5.0 gives
error nodes ``0_{layer}_{pos}``, which collides with feature ``{layer}`` of layer 0 at the same position;
trace uses ``{layer}_-1_{pos}``, the id circuit-tracer adopted to fix that (decoderesearch/circuit-tracer#78,
PR #102). Links are ``{"source", "target", "weight"}`` (node ids; the weight is the adjacency entry) for the
edges pruning keeps; nodes without a link are dropped except tokens and logits. ``metadata`` holds
circuit-tracer's fields (``schema_version`` 1) and trace's own under ``trace_info`` (scores, model), which
circuit-tracer's pydantic models ignore.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from trace_lib.attribution.graph import Graph
from trace_lib.attribution.graph_prune import PruneResult, graph_scores, prune_graph
from trace_lib.cache import atomic_write_json
from trace_lib.errors import GraphError

SCHEMA_VERSION = 1
FEATURE_TYPES = {"feature": "cross layer transcoder", "error": "mlp reconstruction error", "token": "embedding",
                 "logit": "logit"}
NODE_FIELDS = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str,
               "token_prob": (int, float), "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int,
               "jsNodeId": str, "clerp": str, "influence": (int, float, type(None)),
               "activation": (int, float, type(None))}
METADATA_FIELDS = {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list, "prompt": str,
                   "node_threshold": (int, float, type(None)), "schema_version": int}
QPARAM_FIELDS = {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str}
_ID = {"feature": re.compile(r"^(\d+)_(\d+)_(\d+)$"), "error": re.compile(r"^(\d+)_-1_(\d+)$"),
       "token": re.compile(r"^E_(\d+)_(\d+)$"), "logit": re.compile(r"^(\d+)_(\d+)_(\d+)$")}
_ID_FORMAT = {"feature": "{layer}_{feature}_{pos}", "error": "{layer}_-1_{pos}", "token": "E_{token_id}_{pos}",
              "logit": "{n_layers+1}_{vocab_idx}_{pos}"}


def cantor(x: int, y: int) -> int:
    """circuit-tracer's ``feature`` number of a transcoder feature: the Cantor pairing of (layer, feature)."""
    return (x + y) * (x + y + 1) // 2 + y


def _node(graph: Graph, i: int, influence: float) -> dict:
    kind = graph.kind(i)
    base = {"node_id": graph.node_id(i), "feature": 0, "layer": "", "ctx_idx": 0, "feature_type": FEATURE_TYPES[kind],
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "",
            "clerp": "", "influence": influence, "activation": None}
    if kind == "feature":
        layer, pos, feat = graph.feature(i)
        act = float(graph.activations[graph.selected[i]])
        base.update(feature=cantor(layer, feat), layer=str(layer), ctx_idx=pos, jsNodeId=f"{layer}_{feat}-0",
                    activation=act)
    elif kind == "error":
        layer, pos = divmod(i - graph.error_start, graph.n_pos)
        base.update(feature=-1, layer=str(layer), ctx_idx=pos, jsNodeId=f"{layer}_{pos}-0")
    elif kind == "token":
        pos = i - graph.token_start
        base.update(feature=pos, layer="E", ctx_idx=pos, jsNodeId=f"E_{graph.tokens[pos]}-{pos}")
    else:
        k = i - graph.logit_start
        t = graph.targets[k]
        pos = graph.n_pos - 1
        base.update(feature=t.vocab_idx, layer=str(graph.n_layers + 1), ctx_idx=pos, token_prob=t.weight,
                    is_target_logit=k == 0, jsNodeId=f"L_{t.vocab_idx}-{pos}",
                    clerp=f'Output "{t.label}" (p={t.weight:.3f})', influence=None)
    return base


def graph_to_json(graph: Graph, slug: str = "trace-graph", scan: str | None = None, node_threshold: float = 0.8,
                  edge_threshold: float = 0.98, prune: PruneResult | None = None) -> dict:
    """The pruned graph in circuit-tracer's frontend schema (module docstring)."""
    pr = prune or prune_graph(graph, node_threshold, edge_threshold)
    kept = pr.node_mask.nonzero().flatten().tolist()
    nodes = {i: _node(graph, i, float(pr.cumulative_scores[i])) for i in kept}
    links = []
    for dst, src in pr.edge_mask.nonzero().tolist():
        if src in nodes and dst in nodes:
            links.append({"source": nodes[src]["node_id"], "target": nodes[dst]["node_id"],
                          "weight": float(graph.adjacency[dst, src])})
    linked = {x for link in links for x in (link["source"], link["target"])}
    used = [n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    replacement, completeness = graph_scores(graph)
    metadata = {"slug": slug, "scan": scan or graph.scan or "trace", "transcoder_list": [],
                "prompt_tokens": list(graph.token_strs), "prompt": graph.prompt, "node_threshold": node_threshold,
                "schema_version": SCHEMA_VERSION,
                "trace_info": {"model": graph.model_name, "edge_threshold": edge_threshold,
                               "replacement_score": replacement, "completeness_score": completeness,
                               "n_features": graph.n_features, "n_active_features": len(graph.active_features),
                               "n_nodes_kept": len(used), "n_links": len(links)}}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


def write_graph_files(graph: Graph, out_dir: str | Path, slug: str = "trace-graph", **kwargs) -> Path:
    """``out_dir/{slug}.json`` plus the ``graph-metadata.json`` index beside it (circuit-tracer's
    ``create_graph_files`` layout, which its local server serves); returns the graph file's path."""
    out = Path(out_dir)
    data = graph_to_json(graph, slug=slug, **kwargs)
    validate_graph_json(data)
    path = atomic_write_json(out / f"{slug}.json", data)
    index_path = out / "graph-metadata.json"
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else {"graphs": []}
    index["graphs"] = [g for g in index.get("graphs", []) if g.get("slug") != slug] + [data["metadata"]]
    atomic_write_json(index_path, index)
    return path


def _check_fields(obj, fields: dict, where: str, problems: list[str]) -> None:
    if not isinstance(obj, dict):
        problems.append(f"{where} is a {type(obj).__name__}, not an object")
        return
    for name, kind in fields.items():
        if name not in obj:
            problems.append(f"{where} lacks {name!r}")
        elif not isinstance(obj[name], kind) or (kind in (int, (int, float)) and isinstance(obj[name], bool)):
            problems.append(f"{where}.{name} is {obj[name]!r}, of the wrong type")


def _check_node(n: dict, n_layers: int | None, n_tokens: int, problems: list[str]) -> None:
    nid, kind = n["node_id"], {v: k for k, v in FEATURE_TYPES.items()}.get(n["feature_type"])
    if kind is None:
        problems.append(f"node {nid}: feature_type {n['feature_type']!r} is not one of {sorted(FEATURE_TYPES.values())}")
        return
    m = _ID[kind].match(nid)
    if not m:
        problems.append(f"node {nid!r}: a {kind} node id has the form {_ID_FORMAT[kind]}")
        return
    g = [int(x) for x in m.groups()]
    if not 0 <= n["ctx_idx"] < max(n_tokens, 1):
        problems.append(f"node {nid}: ctx_idx {n['ctx_idx']} outside the {n_tokens} prompt tokens")
    if kind == "feature":
        ok = (n["layer"] == str(g[0]) and n["ctx_idx"] == g[2] and n["feature"] == cantor(g[0], g[1])
              and isinstance(n["activation"], (int, float)))
    elif kind == "error":
        ok = n["layer"] == str(g[0]) and n["ctx_idx"] == g[1] and n["feature"] == -1
    elif kind == "token":
        ok = n["layer"] == "E" and n["ctx_idx"] == g[1] and n["feature"] == g[1]
    else:
        ok = n["layer"] == str(g[0]) and n["feature"] == g[1] and n["ctx_idx"] == g[2] and (
            n_layers is None or g[0] == n_layers + 1)
    if not ok:
        problems.append(f"node {nid}: its layer/feature/ctx_idx fields do not match its id")


def validate_graph_json(d: dict) -> None:
    """GraphError (listing the first problems) unless ``d`` follows the schema of the module docstring: field
    names and types, ``schema_version``, node-id formats that agree with each node's fields, unique ids, links
    between existing nodes with finite weights, and at least one token and one logit node."""
    problems: list[str] = []
    if not isinstance(d, dict):
        raise GraphError(f"a graph JSON is an object, not a {type(d).__name__}")
    missing = [k for k in ("metadata", "qParams", "nodes", "links") if k not in d]
    if missing:
        raise GraphError(f"the graph JSON lacks {', '.join(missing)}")
    _check_fields(d["metadata"], METADATA_FIELDS, "metadata", problems)
    _check_fields(d["qParams"], QPARAM_FIELDS, "qParams", problems)
    meta = d["metadata"] if isinstance(d["metadata"], dict) else {}
    if meta.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"metadata.schema_version is {meta.get('schema_version')!r}, not {SCHEMA_VERSION}")
    tokens = meta.get("prompt_tokens") if isinstance(meta.get("prompt_tokens"), list) else []
    if not isinstance(d["nodes"], list) or not isinstance(d["links"], list):
        raise GraphError("the graph JSON's nodes and links must be lists")
    ids: set[str] = set()
    layers = [int(n["layer"]) for n in d["nodes"] if isinstance(n, dict) and n.get("feature_type") == "logit"
              and isinstance(n.get("layer"), str) and n["layer"].isdigit()]
    n_layers = layers[0] - 1 if layers and len(set(layers)) == 1 else None
    if layers and n_layers is None:
        problems.append("logit nodes disagree about the layer count")
    for i, n in enumerate(d["nodes"]):
        before = len(problems)
        _check_fields(n, NODE_FIELDS, f"nodes[{i}]", problems)
        if len(problems) > before:
            continue
        if n["node_id"] in ids:
            problems.append(f"node id {n['node_id']!r} is not unique")
        ids.add(n["node_id"])
        _check_node(n, n_layers, len(tokens), problems)
    kinds = {n.get("feature_type") for n in d["nodes"] if isinstance(n, dict)}
    for need in ("embedding", "logit"):
        if need not in kinds:
            problems.append(f"no {need} node: tokens and logits are always kept")
    for i, link in enumerate(d["links"]):
        before = len(problems)
        _check_fields(link, {"source": str, "target": str, "weight": (int, float)}, f"links[{i}]", problems)
        if len(problems) > before:
            continue
        for end in ("source", "target"):
            if link[end] not in ids:
                problems.append(f"links[{i}].{end} {link[end]!r} names no node")
        if not math.isfinite(link["weight"]):
            problems.append(f"links[{i}].weight is not finite")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise GraphError("invalid graph JSON: " + "; ".join(problems[:5]) + more)
