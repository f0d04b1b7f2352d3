"""What quantization does to an attribution graph: the same transcoders, the same prompt and logit targets,
read on the reference and on a variant (e.g. ``trace_lib.quant.quantize(ref, "gguf-q4_0")``).

Both graphs are pruned (:func:`~trace_lib.attribution.graph_prune.prune_graph`) and their kept nodes and
edges matched by identity (a feature by (layer, position, feature), an error by (layer, position), a token by
position, a logit by its vocabulary index; edges by their two ends). Each kept node carries its *output
influence* ``I[n] + w[n]`` (its influence on the logits, a logit node its weight) and each kept edge its edge
score ``Â[t, s] (I[t] + w[t])``; both are non-negative. Over the union U of the two graphs' kept items, with
a missing item weighing 0, the influence-weighted Jaccard overlap is::

    J = sum_{i in U} min(w_ref(i), w_var(i)) / sum_{i in U} max(w_ref(i), w_var(i))

(1: the same items with the same influence; 0: nothing in common). Items are **kept** (in both), **lost** (only
in the reference) or **new** (only in the variant), each list ranked by the absolute change of influence. The
diff also reports how the replacement and completeness scores and the error nodes' share of the influence
moved. A graph diffed with itself has J = 1, nothing lost or new, and no kept item whose influence changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trace_lib.attribution.graph import Graph
from trace_lib.attribution.graph_prune import (
    compute_edge_influence,
    error_share,
    graph_scores,
    logit_weight_vector,
    prune_graph,
)
from trace_lib.errors import GraphError


@dataclass
class ItemChange:
    """One node or edge: its id (circuit-tracer node ids; ``"src -> dst"`` for edges), its influence in each graph
    (0 when absent) and the change ``var - ref``."""

    id: str
    ref: float
    var: float

    @property
    def delta(self) -> float:
        return self.var - self.ref

    def to_dict(self) -> dict:
        return {"id": self.id, "ref": self.ref, "var": self.var, "delta": self.delta}


@dataclass
class GraphDiff:
    """The comparison of a reference graph and a variant's (module docstring)."""

    node_jaccard: float
    edge_jaccard: float
    replacement: tuple[float, float]
    completeness: tuple[float, float]
    error_share: tuple[float, float]
    nodes_lost: list[ItemChange] = field(default_factory=list)
    nodes_new: list[ItemChange] = field(default_factory=list)
    nodes_kept: list[ItemChange] = field(default_factory=list)
    edges_lost: list[ItemChange] = field(default_factory=list)
    edges_new: list[ItemChange] = field(default_factory=list)
    edges_kept: list[ItemChange] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """Nothing lost or new, and no kept node or edge whose influence changed."""
        return not (self.nodes_lost or self.nodes_new or self.edges_lost or self.edges_new
                    or any(c.delta for c in self.nodes_kept) or any(c.delta for c in self.edges_kept))

    def to_dict(self, top: int = 20) -> dict:
        def pair(p: tuple[float, float]) -> dict:
            return {"ref": p[0], "var": p[1], "delta": p[1] - p[0]}

        lists = {k: [c.to_dict() for c in getattr(self, k)[:top]] for k in
                 ("nodes_kept", "nodes_lost", "nodes_new", "edges_kept", "edges_lost", "edges_new")}
        return {"node_jaccard": self.node_jaccard, "edge_jaccard": self.edge_jaccard,
                "replacement_score": pair(self.replacement), "completeness_score": pair(self.completeness),
                "error_share": pair(self.error_share), "n_nodes": {k: len(getattr(self, f"nodes_{k}")) for k in
                                                                   ("kept", "lost", "new")},
                "n_edges": {k: len(getattr(self, f"edges_{k}")) for k in ("kept", "lost", "new")}, **lists}


def _weights(graph: Graph, node_threshold: float, edge_threshold: float) -> tuple[dict[str, float], dict[str, float]]:
    """Kept nodes and edges of the pruned graph with their output influence / edge score."""
    pr = prune_graph(graph, node_threshold, edge_threshold)
    w = logit_weight_vector(graph)
    out_influence = pr.influence + w
    ids = [graph.node_id(i) for i in range(graph.n_nodes)]
    nodes = {ids[i]: float(out_influence[i]) for i in pr.node_mask.nonzero().flatten().tolist()}
    pruned = graph.adjacency.clone()
    pruned[~pr.node_mask] = 0
    pruned[:, ~pr.node_mask] = 0
    scores = compute_edge_influence(pruned, w)
    edges = {f"{ids[s]} -> {ids[t]}": float(scores[t, s]) for t, s in pr.edge_mask.nonzero().tolist()}
    return nodes, edges


def jaccard(a: dict[str, float], b: dict[str, float]) -> float:
    """``sum min / sum max`` over the union of keys, on absolute values (1.0 for two empty sets)."""
    keys = a.keys() | b.keys()
    lo = sum(min(abs(a.get(k, 0.0)), abs(b.get(k, 0.0))) for k in keys)
    hi = sum(max(abs(a.get(k, 0.0)), abs(b.get(k, 0.0))) for k in keys)
    return lo / hi if hi > 0 else 1.0


def _split(a: dict[str, float], b: dict[str, float]) -> tuple[list[ItemChange], list[ItemChange], list[ItemChange]]:
    def ranked(keys) -> list[ItemChange]:
        items = [ItemChange(k, a.get(k, 0.0), b.get(k, 0.0)) for k in keys]
        return sorted(items, key=lambda c: (-abs(c.delta), c.id))

    return ranked(a.keys() - b.keys()), ranked(b.keys() - a.keys()), ranked(a.keys() & b.keys())


def graph_diff(graph_ref: Graph, graph_var: Graph, node_threshold: float = 0.8,
               edge_threshold: float = 0.98) -> GraphDiff:
    """Compare the reference's graph with the variant's (same prompt; module docstring)."""
    if graph_ref.tokens != graph_var.tokens:
        raise GraphError("the two graphs were built on different prompts; attribute the variant on the reference's "
                         "prompt (graph_ref.tokens)")
    if graph_ref.n_layers != graph_var.n_layers:
        raise GraphError(f"the graphs have {graph_ref.n_layers} and {graph_var.n_layers} layers: not a model and "
                         "its variant")
    n_ref, e_ref = _weights(graph_ref, node_threshold, edge_threshold)
    n_var, e_var = _weights(graph_var, node_threshold, edge_threshold)
    nodes_lost, nodes_new, nodes_kept = _split(n_ref, n_var)
    edges_lost, edges_new, edges_kept = _split(e_ref, e_var)
    (rep_ref, comp_ref), (rep_var, comp_var) = graph_scores(graph_ref), graph_scores(graph_var)
    return GraphDiff(node_jaccard=jaccard(n_ref, n_var), edge_jaccard=jaccard(e_ref, e_var),
                     replacement=(rep_ref, rep_var), completeness=(comp_ref, comp_var),
                     error_share=(error_share(graph_ref), error_share(graph_var)),
                     nodes_lost=nodes_lost, nodes_new=nodes_new, nodes_kept=nodes_kept,
                     edges_lost=edges_lost, edges_new=edges_new, edges_kept=edges_kept)
