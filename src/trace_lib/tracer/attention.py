"""Attention weights per layer and head, summarised without keeping the matrix (the seed's MLT-02).

For each traced (layer, head, query position) an :class:`AttentionWeightTrace` records

- ``entropy`` = -sum_k w_k ln w_k (nats) over the real (unpadded) key positions; ln(n_keys) is uniform;
- ``max_weight`` and ``max_position``: the most attended key position (absolute position in the sequence);
- ``first_token_weight``: attention to the first real token, the usual *attention sink*;
- the ``top_k`` positions and weights (weights below ``weight_threshold`` left out) and ``tail_mass``, the
  weight outside the listed positions.

Hugging Face models return attention weights (``output_attentions=True``) only under the eager attention
implementation; :func:`eager_attention` switches a model to it for the traced call and restores its own
implementation afterwards, and the tracer says so in its notes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from trace_lib.errors import HookError


@dataclass
class AttentionWeightTrace:
    """Summary of one head's attention from one query position."""

    layer: int
    head: int
    query_pos: int
    entropy: float
    max_weight: float
    max_position: int
    first_token_weight: float | None  # None when a sliding window no longer holds the first token
    n_keys: int
    top_k_positions: list[int] = field(default_factory=list)
    top_k_weights: list[float] = field(default_factory=list)
    tail_mass: float = 0.0
    batch_index: int = 0

    def is_attention_sink(self, threshold: float = 0.5) -> bool:
        """The first token takes more than ``threshold`` of the attention (the seed's rule)."""
        return self.first_token_weight is not None and self.first_token_weight > threshold

    def to_dict(self) -> dict:
        return asdict(self)


def n_heads(model) -> int:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_attention_heads", "n_head"):
        v = getattr(config, name, None)
        if isinstance(v, int):
            return v
    raise HookError(f"cannot find the number of attention heads in {type(model).__name__}'s config")


@contextmanager
def eager_attention(model):
    """Run the block with ``model`` on eager attention; yields the implementation it replaced (``None`` when the
    model already ran eager). The original implementation is restored even if the block raises."""
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield None
        return
    _set_attn(model, "eager")
    try:
        yield before
    finally:
        _set_attn(model, before)


def _set_attn(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(impl)
            return
        except (ValueError, ImportError, AttributeError):
            pass
    model.config._attn_implementation = impl


def summarise_attention(attentions, attention_mask: torch.Tensor | None, config, position: int = 0
                        ) -> list[AttentionWeightTrace]:
    """Summaries of ``attentions`` (one [batch, heads, queries, keys] tensor per layer, as transformers returns
    them) for the layers, heads and query positions ``config`` (an ``AttentionTraceConfig``) selects.

    ``attention_mask`` is [batch, keys] (1 = real token); ``position`` is the sequence position of this forward
    pass's first query (the cache length during generation), so reported positions are absolute.
    """
    out: list[AttentionWeightTrace] = []
    for layer, a in enumerate(attentions):
        if a is None or not config.should_trace_layer(layer):
            continue
        a = a.detach().float().cpu()
        b_size, h_size, q_size, k_size = a.shape
        heads = [h for h in range(h_size) if config.should_trace_head(h)]
        if not heads:
            continue
        for b in range(b_size):
            mask = (attention_mask[b, -k_size:].bool().cpu() if attention_mask is not None
                    and attention_mask.shape[-1] >= k_size else torch.ones(k_size, dtype=torch.bool))
            first_real = int(mask.nonzero()[0]) if mask.any() else 0
            # The forward's queries are the last q_size key positions; keys may start after position 0
            # (a sliding-window cache keeps only the most recent ones).
            key_offset = max(0, position + q_size - k_size)
            real_queries = [q for q in range(q_size) if q_size > k_size or bool(mask[k_size - q_size + q])]
            queries = _select_queries(config.query_positions, real_queries)
            if not queries:
                continue
            w = a[b][heads][:, queries, :]  # [h, q, k]
            w = torch.where(mask, w, torch.zeros((), dtype=w.dtype))
            entropy = -torch.special.xlogy(w, w).sum(-1)
            max_w, max_pos = w.max(-1)
            k = min(config.top_k, k_size)
            top_w, top_p = w.topk(k, dim=-1)
            first_w = w[..., first_real]
            total = w.sum(-1)
            ent_l, maxw_l, maxp_l = entropy.tolist(), max_w.tolist(), max_pos.tolist()
            topw_l, topp_l, first_l, total_l = top_w.tolist(), top_p.tolist(), first_w.tolist(), total.tolist()
            n_keys = int(mask.sum())
            for hi, h in enumerate(heads):
                for qi, q in enumerate(queries):
                    kept = [(p, x) for p, x in zip(topp_l[hi][qi], topw_l[hi][qi]) if x >= config.weight_threshold]
                    out.append(AttentionWeightTrace(
                        layer=layer, head=h, query_pos=position + q, entropy=ent_l[hi][qi],
                        max_weight=maxw_l[hi][qi], max_position=key_offset + maxp_l[hi][qi],
                        first_token_weight=first_l[hi][qi] if key_offset == 0 else None, n_keys=n_keys,
                        top_k_positions=[key_offset + p for p, _ in kept], top_k_weights=[x for _, x in kept],
                        tail_mass=max(0.0, total_l[hi][qi] - sum(x for _, x in kept)), batch_index=b))
    return out


def _select_queries(positions, real_queries: list[int]) -> list[int]:
    """Query indices for ``positions`` (indices into the real queries; negative counts from the last)."""
    if positions is None:
        return list(real_queries)
    out: list[int] = []
    n = len(real_queries)
    for p in positions:
        i = n + p if p < 0 else p
        if 0 <= i < n and real_queries[i] not in out:
            out.append(real_queries[i])
    return out
