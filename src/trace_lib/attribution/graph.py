"""Attribution graphs on the local replacement model (Ameisen et al. 2025, "Circuit Tracing"; circuit-tracer).

Nodes, in adjacency order (circuit-tracer's):

* **features**: every active transcoder feature (layer l, position p, feature f), sorted by (l, p, f); its
  *value* as a target is the pre-activation ``W_enc[:, f] . x_l[p] + b_enc[f]`` and as a source it writes
  ``a * W_dec[f]`` into block l's MLP output;
* **errors** (l, p), layer-major: ``e = mlp_out - skip(x) - b_dec - sum_f a_f W_dec[f]``, what the
  transcoder misses;
* **tokens** p: the token embedding ``E[p]``;
* **logits**: the targets (:mod:`trace_lib.attribution.graph_targets`), value ``u . h[last] + beta``.

In the frozen model (:mod:`trace_lib.attribution.replacement`) every target value is affine in the sources::

    value(t) = sum_s A[t, s] + bias(t),    A[t, s] = g_t(site of s) . v_s

where ``v_s`` is what source s writes (``a W_dec[f]``, ``e``, ``E[p]``) and ``g_t`` the gradient of t's value
(injected as ``W_enc[:, f]`` at the MLP input, or ``u`` at the final norm's output) at the site s writes to.
One forward pass with the batch dimension holding B copies of the prompt, then one backward pass per batch of
B targets: row b of the batch gets target b's gradient, so each backward fills B rows of ``A`` (circuit-tracer's
``AttributionContext.compute_batch``; trace uses ``torch.autograd.grad`` on leaves instead of hooks).

``bias(t)`` is computed separately, by a frozen pass with every source set to zero (token embeddings 0, MLP
outputs ``skip(x) + b_dec``): what the transcoders' and the model's biases alone give t. Together the rows are
exact: ``A[t].sum() + bias[t]`` is t's real value (tests/test_graph.py checks it to 1e-4).

As circuit-tracer, features and errors at position 0 are not nodes by default (``zero_first_position``: the
first position, a BOS token, has outsized activations); there the real MLP output is part of the constant
term. With ``max_feature_nodes`` only the most influential features (ranked by partial influence on the rows
computed so far) get rows and columns; the row sums then miss the dropped features.

The dense adjacency has ``(features + (layers + 1) * tokens + logits)^2`` entries and the feature count itself
grows with the tokens, so its memory grows with the square of the prompt length: prompts are limited to
:data:`MAX_GRAPH_TOKENS` tokens unless ``max_tokens`` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trace_lib.attribution.graph_prune import partial_influences
from trace_lib.attribution.graph_targets import LogitTarget, Targets, resolve_targets, token_label
from trace_lib.attribution.replacement import check_family, frozen, real_pass, run_embeds
from trace_lib.attribution.transcoder import TranscoderSet
from trace_lib.errors import GraphError
from trace_lib.validate import POSITIVE_INT, Range

MAX_GRAPH_TOKENS = 64


@dataclass
class Graph:
    """A dense attribution graph (module docstring). ``adjacency[t, s]``: direct effect of s on t; only
    feature and logit rows are filled. ``bias[t]`` and ``values[t]`` (the real value) for those rows."""

    prompt: str
    tokens: list[int]
    token_strs: list[str]
    n_layers: int
    active_features: torch.Tensor  # [n_active, 3] (layer, pos, feature)
    activations: torch.Tensor  # [n_active]
    selected: torch.Tensor  # [n_features] indices into active_features that are nodes
    adjacency: torch.Tensor
    bias: torch.Tensor
    values: torch.Tensor
    targets: list[LogitTarget]
    target_weights: torch.Tensor
    vocab_size: int
    scan: str = ""
    model_name: str = ""
    target_vectors: torch.Tensor | None = field(default=None, repr=False)
    target_biases: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.selected)

    @property
    def n_logits(self) -> int:
        return len(self.targets)

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_start + self.n_logits

    def feature(self, i: int) -> tuple[int, int, int]:
        """(layer, pos, feature) of feature node i."""
        layer, pos, feat = self.active_features[self.selected[i]].tolist()
        return layer, pos, feat

    def feature_index(self, layer: int, pos: int, feat: int) -> int | None:
        """The node index of a feature, or None when it is not a node."""
        rows = self.active_features[self.selected]
        hit = ((rows[:, 0] == layer) & (rows[:, 1] == pos) & (rows[:, 2] == feat)).nonzero()
        return int(hit[0, 0]) if len(hit) else None

    def error_index(self, layer: int, pos: int) -> int:
        return self.error_start + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.token_start + pos

    def logit_index(self, i: int) -> int:
        return self.logit_start + i

    def kind(self, i: int) -> str:
        """``feature``, ``error``, ``token`` or ``logit``."""
        if i < self.error_start:
            return "feature"
        if i < self.token_start:
            return "error"
        return "token" if i < self.logit_start else "logit"

    def node_id(self, i: int) -> str:
        """circuit-tracer's graph-JSON ``node_id`` of node i (:mod:`trace_lib.attribution.graph_json`)."""
        kind = self.kind(i)
        if kind == "feature":
            layer, pos, feat = self.feature(i)
            return f"{layer}_{feat}_{pos}"
        if kind == "error":
            layer, pos = divmod(i - self.error_start, self.n_pos)
            return f"{layer}_-1_{pos}"
        if kind == "token":
            pos = i - self.token_start
            return f"E_{self.tokens[pos]}_{pos}"
        return f"{self.n_layers + 1}_{self.targets[i - self.logit_start].vocab_idx}_{self.n_pos - 1}"

    def target_spec(self) -> list:
        """Targets in the form :func:`attribute` takes, to attribute another model (a variant) to the same
        logit nodes: token ids, or CustomTargets carrying the same vectors."""
        from trace_lib.attribution.graph_targets import CustomTarget

        if all(t.vocab_idx < self.vocab_size for t in self.targets):
            return [t.vocab_idx for t in self.targets]
        return [CustomTarget(t.label, t.weight, self.target_vectors[i], float(self.target_biases[i]))
                for i, t in enumerate(self.targets)]


def _tokenize(loaded, prompt, max_tokens: int) -> tuple[torch.Tensor, str]:
    """Token ids [n_pos] of a prompt; a string gets a special token in front unless it starts with one, as
    circuit-tracer's ``ensure_tokenized`` does."""
    if isinstance(prompt, str):
        tok = loaded.tokenizer
        if tok is None:
            raise GraphError("a text prompt needs a tokenizer and this model has none: give token ids")
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        special = [t for t in (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) if t is not None]
        if special and (not ids or ids[0] not in tok.all_special_ids):
            ids = [special[0], *ids]
        text = prompt
    else:
        ids = [int(t) for t in (prompt.flatten().tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        text = tok_text(loaded, ids)
    if not ids:
        raise GraphError("the prompt is empty: an attribution graph needs at least one token")
    if len(ids) > max_tokens:
        raise GraphError(
            f"the prompt has {len(ids)} tokens, over the limit of {max_tokens} for an attribution graph: the dense "
            f"adjacency has (features + (layers+1) x tokens + logits)^2 entries and the active features grow with "
            f"the tokens, so memory grows with the square of the prompt length; shorten the prompt (or raise "
            f"max_tokens and cap max_feature_nodes)")
    vocab = loaded.arch.embed.weight.shape[0]
    if any(not 0 <= t < vocab for t in ids):
        raise GraphError(f"prompt token ids must lie in 0..{vocab - 1}")
    return torch.tensor(ids, dtype=torch.long), text


def tok_text(loaded, ids: list[int]) -> str:
    return loaded.tokenizer.decode(ids) if loaded.tokenizer is not None else " ".join(map(str, ids))


@dataclass
class _Nodes:
    """The active features and error vectors of one prompt."""

    active: torch.Tensor  # [n_active, 3]
    acts: torch.Tensor  # [n_active]
    pre: torch.Tensor  # [n_active]
    enc: torch.Tensor  # [n_active, d] encoder vectors (what a feature's pre-activation reads)
    dec: torch.Tensor  # [n_active, d] a * W_dec[f] (what a feature writes)
    b_enc: torch.Tensor  # [n_active]
    errors: torch.Tensor  # [n_layers, n_pos, d]
    rest: list[torch.Tensor]  # per layer [n_pos, d]: real mlp_out - skip(x), everything but the skip
    const: list[torch.Tensor]  # per layer [n_pos, d]: the part of `rest` that is no node (b_dec; position 0)


@torch.no_grad()
def _nodes(rp, transcoders: TranscoderSet, zero: int) -> _Nodes:
    acts_l, pre_l, errors, rest, const = [], [], [], [], []
    for layer, tc in enumerate(transcoders):
        x = rp.mlp_in[layer].float()
        pre = tc.pre(x)
        a = tc.act(pre)
        a[:zero] = 0
        r = rp.mlp_out[layer].float() - tc.skip(x)
        e = r - tc.b_dec - a @ tc.W_dec
        e[:zero] = 0
        c = tc.b_dec.expand_as(r).clone()
        c[:zero] = r[:zero]
        acts_l.append(a), pre_l.append(pre), errors.append(e), rest.append(r), const.append(c)
    acts, pres = torch.stack(acts_l), torch.stack(pre_l)
    active = acts.nonzero()  # row-major: sorted by (layer, pos, feature)
    layer, pos, feat = active.unbind(1)
    a = acts[layer, pos, feat]
    enc = torch.zeros(len(active), transcoders.d_model, device=acts.device)
    dec = torch.zeros_like(enc)
    b_enc = torch.zeros(len(active), device=acts.device)
    for i, tc in enumerate(transcoders):
        m = layer == i
        enc[m] = tc.W_enc.detach()[:, feat[m]].T
        dec[m] = tc.W_dec.detach()[feat[m]] * a[m, None]
        b_enc[m] = tc.b_enc.detach()[feat[m]]
    return _Nodes(active, a, pres[layer, pos, feat], enc, dec, b_enc, torch.stack(errors), rest, const)


class _RowEngine:
    """The frozen forward pass with B prompt copies, kept alive; :meth:`rows` runs one backward per batch."""

    def __init__(self, loaded, transcoders: TranscoderSet, rp, nodes: _Nodes, batch: int) -> None:
        self.nodes, self.n_layers = nodes, loaded.n_layers
        dtype = rp.embeds.dtype
        self.embeds = rp.embeds.unsqueeze(0).expand(batch, -1, -1).clone().requires_grad_(True)
        self.leaves = [r.to(dtype).unsqueeze(0).expand(batch, -1, -1).clone().requires_grad_(True)
                       for r in nodes.rest]
        with torch.enable_grad(), frozen(loaded, rp, lambda i, x: transcoders[i].skip(x) + self.leaves[i]) as run:
            run_embeds(loaded, self.embeds)
        self.reads = [*run.mlp_in, run.final]  # index n_layers: the final norm's output
        self.embed_vecs = rp.embeds.float()
        self.device = self.embeds.device

    def rows(self, layers: torch.Tensor, positions: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
        """``A`` rows [k, n_active + n_layers * n_pos + n_pos] of k <= B targets: target b reads ``vecs[b]`` at
        ``reads[layers[b]][b, positions[b]]``."""
        k = len(layers)
        objective = 0
        for layer in layers.unique().tolist():
            idx = (layers == layer).nonzero().flatten()
            read = self.reads[layer][idx.to(self.device), positions[idx].to(self.device)]
            objective = objective + (read * vecs[idx].to(read)).sum()
        grads = torch.autograd.grad(objective, [self.embeds, *self.leaves], retain_graph=True, allow_unused=True)
        g_embed = grads[0]
        g_mlp = [g if g is not None else torch.zeros_like(self.leaves[0]) for g in grads[1:]]
        nodes = self.nodes
        n_pos = self.embeds.shape[1]
        feat_cols = torch.zeros(k, len(nodes.active), device=self.device)
        for layer in range(self.n_layers):
            sel = (nodes.active[:, 0] == layer).nonzero().flatten()
            if len(sel):
                g = g_mlp[layer][:k, nodes.active[sel, 1]].float()  # [k, n_sel, d]
                feat_cols[:, sel] = (g * nodes.dec[sel]).sum(-1)
        err_cols = torch.einsum("lbpd,lpd->blp", torch.stack(g_mlp)[:, :k].float(), nodes.errors)
        tok_cols = (g_embed[:k].float() * self.embed_vecs).sum(-1) if g_embed is not None \
            else torch.zeros(k, n_pos, device=feat_cols.device)
        return torch.cat([feat_cols, err_cols.reshape(k, -1), tok_cols], dim=1).detach().cpu()


def attribute(loaded, transcoders: TranscoderSet, prompt: str | list[int] | torch.Tensor, targets=None, *,
              max_feature_nodes: int | None = None, batch_size: int = 32, max_n_logits: int = 10,
              desired_logit_prob: float = 0.95, zero_first_position: bool = True,
              max_tokens: int = MAX_GRAPH_TOKENS, update_interval: int = 4) -> Graph:
    """The attribution graph of ``prompt`` on ``loaded`` read through ``transcoders`` (module docstring).

    ``targets``: None (salient logits), token ids, one-token strings or
    :class:`~trace_lib.attribution.graph_targets.CustomTarget` objects (e.g. a logit difference).
    """
    for name, v in (("batch_size", batch_size), ("max_n_logits", max_n_logits), ("max_tokens", max_tokens),
                    ("update_interval", update_interval), ("max_feature_nodes", max_feature_nodes)):
        POSITIVE_INT.check(name, v)
    Range(0, 1, lo_open=True).check("desired_logit_prob", desired_logit_prob)
    check_family(loaded)
    transcoders.check_fits(loaded)
    ids, text = _tokenize(loaded, prompt, max_tokens)
    transcoders = transcoders.to(device=loaded.arch.embed.weight.device)
    rp = real_pass(loaded, ids)
    tg: Targets = resolve_targets(loaded, targets, rp.logits[-1].cpu(), loaded.d_model, max_n_logits,
                                  desired_logit_prob)
    tg = Targets(tg.targets, tg.vectors.cpu(), tg.biases.cpu(), tg.weights.cpu())
    nodes = _nodes(rp, transcoders, 1 if zero_first_position else 0)
    n_layers, n_pos, n_active = loaded.n_layers, len(ids), len(nodes.active)

    # The constant term: every source set to zero.
    with torch.no_grad(), frozen(loaded, rp, lambda i, x: transcoders[i].skip(x) + nodes.const[i]) as zrun:
        run_embeds(loaded, torch.zeros_like(rp.embeds).unsqueeze(0))
    layer, pos, _ = nodes.active.unbind(1)
    feat_bias = ((torch.stack(zrun.mlp_in)[:, 0][layer, pos].float() * nodes.enc).sum(-1) + nodes.b_enc).cpu()
    logit_bias = tg.vectors @ zrun.final[0, -1].float().cpu() + tg.biases
    logit_values = tg.vectors @ rp.final[-1].float().cpu() + tg.biases

    engine = _RowEngine(loaded, transcoders, rp, nodes, batch_size)
    n_logits = len(tg)
    n_sel = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    row_size = n_active + (n_layers + 1) * n_pos
    logit_offset = row_size  # node index of the first logit in the un-pruned numbering
    rows = torch.zeros(n_logits + n_sel, row_size + n_logits)
    row_nodes = torch.zeros(n_logits + n_sel, dtype=torch.long)
    for i in range(0, n_logits, batch_size):
        j = min(i + batch_size, n_logits)
        rows[i:j, :row_size] = engine.rows(torch.full((j - i,), n_layers), torch.full((j - i,), n_pos - 1),
                                           tg.vectors[i:j])
        row_nodes[i:j] = torch.arange(i, j) + logit_offset
    visited = torch.zeros(n_active, dtype=torch.bool)
    filled = n_logits
    while filled - n_logits < n_sel:
        if n_sel == n_active:
            pending = torch.arange(n_active)
        else:
            infl = partial_influences(rows[:filled], tg.weights, row_nodes[:filled])[:n_active]
            ranked = torch.argsort(infl, descending=True)
            pending = ranked[~visited[ranked]][:min(update_interval * batch_size, n_sel - (filled - n_logits))]
        for i in range(0, len(pending), batch_size):
            idx = pending[i:i + batch_size]
            rows[filled:filled + len(idx), :row_size] = engine.rows(nodes.active[idx, 0], nodes.active[idx, 1],
                                                                    nodes.enc[idx])
            row_nodes[filled:filled + len(idx)] = idx
            visited[idx] = True
            filled += len(idx)
    del engine

    selected = visited.nonzero().flatten()
    cols = torch.cat([selected, torch.arange(n_active, row_size + n_logits)])
    n_nodes = len(cols)
    adjacency = torch.zeros(n_nodes, n_nodes)
    feat_rows = rows[n_logits:][torch.argsort(row_nodes[n_logits:])]  # features in (layer, pos, feature) order
    adjacency[:n_sel] = feat_rows[:, cols]
    adjacency[n_nodes - n_logits:] = rows[:n_logits][:, cols]
    bias = torch.zeros(n_nodes)
    values = torch.zeros(n_nodes)
    bias[:n_sel], values[:n_sel] = feat_bias[selected], nodes.pre.cpu()[selected]
    bias[n_nodes - n_logits:], values[n_nodes - n_logits:] = logit_bias, logit_values
    return Graph(prompt=text, tokens=ids.tolist(), token_strs=[token_label(loaded, t) for t in ids.tolist()],
                 n_layers=n_layers, active_features=nodes.active.cpu(), activations=nodes.acts.cpu(), selected=selected,
                 adjacency=adjacency, bias=bias, values=values, targets=tg.targets, target_weights=tg.weights,
                 vocab_size=rp.logits.shape[-1], scan=transcoders.scan, model_name=loaded.name,
                 target_vectors=tg.vectors, target_biases=tg.biases)
