"""Influence, pruning and the two graph scores, as circuit-tracer's ``graph.py`` defines them.

Ameisen et al. 2025, "Circuit Tracing" (§3.1 appendix on pruning, §2.4 on the scores). With A the adjacency
(``A[t, s]`` the direct effect of source s on target t) and ``w`` the logit weights placed on the logit rows:

* **normalise**: ``Â[t, s] = |A[t, s]| / sum_s' |A[t, s']|`` (a row of zeros stays zero);
* **influence**: ``I = w Â + w Â² + ...`` (the total, indirect, share of the logits' inputs each node carries),
  summed until the product vanishes (A is nilpotent: every edge goes forward in layers);
* **node pruning**: keep the nodes with the largest influence until ``node_threshold`` (0.8) of the total is
  covered (``find_threshold``: the score at which the sorted cumulative share reaches the threshold); tokens and
  logits are always kept;
* **edge pruning**: on the node-pruned matrix, an edge's score is ``Â'[t, s] * (I'[t] + w[t])`` (its share of
  t's input times t's own influence, logits counting their weight); keep edges until ``edge_threshold`` (0.98);
* **no orphans**: repeatedly drop feature and error nodes with no kept outgoing edge and feature nodes with no
  kept incoming edge (and their edges), until nothing changes;
* **replacement score**: ``I[tokens] / (I[tokens] + I[errors])``, the share of token-to-logit influence that
  flows through features rather than error nodes;
* **completeness score**: ``sum_t (1 - sum_{s in errors} Â[t, s]) (I[t] + w[t]) / sum_t (I[t] + w[t])``, each
  node's non-error share of its input, weighted by its influence.

``cumulative_scores`` (a node's position in the sorted cumulative influence, 0..1) is what circuit-tracer's
graph JSON stores as ``influence``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from trace_lib.errors import GraphError
from trace_lib.validate import Range

if TYPE_CHECKING:
    from trace_lib.attribution.graph import Graph

_THRESHOLD = Range(0, 1)


def normalize_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """Rows of ``|A|`` scaled to sum to 1 (rows of zeros stay zero)."""
    a = matrix.abs()
    return a / a.sum(dim=1, keepdim=True).clamp(min=1e-10)


def compute_influence(normalized: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """``w Â + w Â² + ...`` until the product is exactly zero (Â nilpotent)."""
    term = weights @ normalized
    total = term.clone()
    for _ in range(max_iter):
        if not bool(term.any()):
            return total
        term = term @ normalized
        total += term
    raise GraphError(f"influence did not vanish after {max_iter} steps: the adjacency has a cycle")


def compute_node_influence(adjacency: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return compute_influence(normalize_matrix(adjacency), weights)


def compute_edge_influence(pruned: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Edge scores ``Â[t, s] * (I[t] + w[t])`` on an (already node-pruned) adjacency."""
    normalized = normalize_matrix(pruned)
    influence = compute_influence(normalized, weights) + weights
    return normalized * influence[:, None]


def find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The score at which the descending cumulative share of ``scores`` first reaches ``threshold``."""
    ordered = torch.sort(scores, descending=True).values
    share = torch.cumsum(ordered, dim=0) / torch.sum(ordered)
    i = min(int(torch.searchsorted(share, torch.tensor(threshold, dtype=share.dtype))), len(share) - 1)
    return ordered[i]


def logit_weight_vector(graph: Graph) -> torch.Tensor:
    """``w``: zeros except the target weights on the logit rows."""
    w = torch.zeros(graph.n_nodes, dtype=graph.adjacency.dtype)
    w[graph.logit_start:] = graph.target_weights.to(w.dtype)
    return w


@dataclass
class PruneResult:
    """Boolean ``node_mask`` [n_nodes], ``edge_mask`` [n_nodes, n_nodes] (target, source), the full-graph node
    ``influence`` and each node's ``cumulative_scores``."""

    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    influence: torch.Tensor
    cumulative_scores: torch.Tensor


def prune_graph(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Node then edge pruning by cumulative influence, then orphan removal (module docstring)."""
    _THRESHOLD.check("node_threshold", node_threshold)
    _THRESHOLD.check("edge_threshold", edge_threshold)
    a = graph.adjacency
    w = logit_weight_vector(graph)
    n_feat, keep_from = graph.n_features, graph.token_start  # tokens and logits: always kept

    influence = compute_node_influence(a, w)
    node_mask = influence >= find_threshold(influence, node_threshold)
    node_mask[keep_from:] = True

    pruned = a.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    edge_scores = compute_edge_influence(pruned, w)
    edge_mask = edge_scores >= find_threshold(edge_scores.flatten(), edge_threshold)

    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:keep_from] &= edge_mask[:, :keep_from].any(0)  # features and errors need an outgoing edge
        node_mask[:n_feat] &= edge_mask[:n_feat].any(1)  # features need an incoming edge
        if torch.equal(node_mask, before):
            break
    edge_mask[~node_mask] = False
    edge_mask[:, ~node_mask] = False

    ordered, order = torch.sort(influence, descending=True)
    cumulative = torch.zeros_like(influence)
    cumulative[order] = torch.cumsum(ordered, dim=0) / torch.sum(ordered)
    return PruneResult(node_mask, edge_mask, influence, cumulative)


def graph_scores(graph: Graph) -> tuple[float, float]:
    """``(replacement_score, completeness_score)`` of the full graph (module docstring)."""
    normalized = normalize_matrix(graph.adjacency)
    w = logit_weight_vector(graph)
    influence = compute_influence(normalized, w)
    errors = slice(graph.error_start, graph.token_start)
    tokens = slice(graph.token_start, graph.logit_start)
    tok, err = influence[tokens].sum(), influence[errors].sum()
    replacement = tok / (tok + err)
    non_error = 1 - normalized[:, errors].sum(dim=-1)
    out = influence + w
    completeness = (non_error * out).sum() / out.sum()
    return float(replacement), float(completeness)


def error_share(graph: Graph, influence: torch.Tensor | None = None) -> float:
    """The error nodes' share of the influence of all feature, error and token nodes."""
    if influence is None:
        influence = compute_node_influence(graph.adjacency, logit_weight_vector(graph))
    total = influence[:graph.logit_start].sum()
    return float(influence[graph.error_start:graph.token_start].sum() / total) if total > 0 else 0.0


def partial_influences(rows: torch.Tensor, weights: torch.Tensor, row_nodes: torch.Tensor,
                       max_iter: int = 128) -> torch.Tensor:
    """Influence of every column node computed from the rows attributed so far (circuit-tracer's
    ``compute_partial_influences``, used to pick which feature to attribute next when ``max_feature_nodes`` caps
    them): ``rows`` [r, n_nodes], ``row_nodes[r]`` the node each row belongs to, ``weights`` on the last nodes."""
    normalized = normalize_matrix(rows)
    n = rows.shape[1]
    mass = torch.zeros(n, dtype=rows.dtype)
    mass[n - len(weights):] = weights.to(rows.dtype)
    total = torch.zeros(n, dtype=rows.dtype)
    for _ in range(max_iter):
        mass = mass[row_nodes] @ normalized
        if not bool(mass.any()):
            return total
        total += mass
    raise GraphError("partial influences did not vanish: the adjacency has a cycle")
