"""Logit lens: read each layer's residual stream through the model's own output head (the seed's MLT-03).

At layer l the lens logits are ``unembed(final_norm(resid_post[l]))`` (nostalgebraist 2020, "interpreting GPT:
the logit lens"), soft-capped as the model caps its final logits when its config sets
``final_logit_softcapping`` (Gemma 2: ``c * tanh(x / c)``), so the last layer's lens logits are the model's
logits. For each lensed position a :class:`LogitLensTrace` records

- for every tracked token (``tracked_tokens``, or the final top-k), its logit and rank per layer (rank 0 = top;
  rank = number of vocabulary entries with a strictly higher logit, the seed's ``compute_rank``);
- the top token per layer, and the rank per layer of the final top-1 token;
- ``kl_to_final[l]`` = KL(p_final || p_l) = sum_v p_final(v) (ln p_final(v) - ln p_l(v)), in nats, as the
  tuned-lens paper (Belrose et al. 2023) measures a lens against the final distribution; 0 at the last layer;
- ``decisive_layer``: the first layer from which the final top-1 token stays top-1 through the last layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass
class TokenLogitEvolution:
    """One token's logit and rank through the layers (the seed's ``TokenLogitEvolution``)."""

    token_id: int
    token_str: str = ""
    per_layer_logit: list[float] = field(default_factory=list)
    per_layer_rank: list[int] = field(default_factory=list)
    final_probability: float = 0.0
    final_rank: int = 0

    def record_layer(self, logit: float, rank: int) -> None:
        self.per_layer_logit.append(logit)
        self.per_layer_rank.append(rank)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LogitLensTrace:
    """The logit lens at one position of one forward pass."""

    position: int
    layers: list[int] = field(default_factory=list)
    tracked_tokens: list[TokenLogitEvolution] = field(default_factory=list)
    top_tokens: list[int] = field(default_factory=list)
    top_token_strs: list[str] = field(default_factory=list)
    top_probs: list[float] = field(default_factory=list)
    kl_to_final: list[float] = field(default_factory=list)
    final_top1: int | None = None
    final_top1_rank: list[int] = field(default_factory=list)
    decisive_layer: int | None = None
    batch_index: int = 0
    logits: torch.Tensor | None = field(default=None, repr=False, compare=False)  # [n_layers, vocab], opt-in

    def rank_of(self, token_id: int) -> list[int] | None:
        for t in self.tracked_tokens:
            if t.token_id == token_id:
                return t.per_layer_rank
        return None

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "logits"}
        d["tracked_tokens"] = [t.to_dict() for t in self.tracked_tokens]
        return d


def softcap(model) -> float | None:
    """The final-logit soft cap of ``model``'s config (Gemma 2), or None."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def lens_logits(loaded, resid: torch.Tensor) -> torch.Tensor:
    """Lens logits of residual-stream vectors ``resid`` [..., d_model] (any device/dtype) as float32 CPU."""
    arch = loaded.arch
    param = next(arch.unembed.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    with torch.no_grad():
        logits = arch.unembed(arch.final_norm(resid.to(device=device, dtype=dtype)))
        cap = softcap(loaded.model)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
    return logits.detach().to(device="cpu", dtype=torch.float32)


def compute_rank(logits: torch.Tensor, token_id: int) -> int:
    """Number of vocabulary entries with a strictly higher logit than ``token_id`` (0 = top)."""
    return int((logits > logits[token_id]).sum())


def build_lens_trace(layer_logits: torch.Tensor, layers: list[int], position: int, tracked: list[int] | None,
                     top_k: int, decode=None, batch_index: int = 0, keep_logits: bool = False) -> LogitLensTrace:
    """A :class:`LogitLensTrace` from ``layer_logits`` [n_layers, vocab] (the last row is the final layer).

    ``tracked``: token ids to follow (None: the final top-``top_k``); ``decode``: id -> string, optional;
    ``keep_logits``: keep ``layer_logits`` on the trace (not written to JSON).
    """
    decode = decode or (lambda i: "")
    logits = layer_logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    final_logp = logp[-1]
    final_p = final_logp.exp()
    # KL(p_final || p_l); xlogy-free form is safe: p_final > 0 wherever it matters, 0 * finite = 0.
    kl = (final_p * (final_logp - logp)).sum(-1).clamp_min(0.0)
    kl[-1] = 0.0
    top_ids = logits.argmax(-1)
    top_probs = logp.gather(-1, top_ids[:, None]).squeeze(-1).exp()
    final_top1 = int(top_ids[-1])
    ids = list(tracked) if tracked is not None else final_logp.topk(min(top_k, logits.shape[-1])).indices.tolist()
    id_t = torch.tensor(ids, dtype=torch.long)
    vals = logits[:, id_t]  # [L, k]
    ranks = (logits[:, None, :] > vals[:, :, None]).sum(-1)  # [L, k]
    evolutions = []
    for j, tid in enumerate(ids):
        evo = TokenLogitEvolution(token_id=int(tid), token_str=decode(int(tid)),
                                  per_layer_logit=vals[:, j].tolist(), per_layer_rank=ranks[:, j].tolist(),
                                  final_probability=float(final_p[tid]), final_rank=int(ranks[-1, j]))
        evolutions.append(evo)
    top1_rank = (logits > logits[:, final_top1:final_top1 + 1]).sum(-1).tolist()
    top_list = top_ids.tolist()
    decisive = len(top_list) - 1
    while decisive > 0 and top_list[decisive - 1] == final_top1:
        decisive -= 1
    return LogitLensTrace(position=position, layers=list(layers), tracked_tokens=evolutions, top_tokens=top_list,
                          top_token_strs=[decode(i) for i in top_list], top_probs=top_probs.tolist(),
                          kl_to_final=kl.tolist(), final_top1=final_top1,
                          final_top1_rank=top1_rank, decisive_layer=layers[decisive],
                          batch_index=batch_index, logits=layer_logits if keep_logits else None)
