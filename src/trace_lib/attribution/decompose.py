"""Where the refusal direction is written (``dim_decompose``): each block's share of the projection.

The residual stream after block l is the embedding plus every attention and MLP output before it::

    <resid_post_l, r_hat> = <embed, r_hat> + sum_{i<=l} (<attn_out_i, r_hat> + <mlp_out_i, r_hat>)

(sequential pre-norm blocks; read at the last prompt token, averaged over prompts). Each attention output is
further the sum of its heads' writes plus the output projection's bias::

    <attn_out_i, r_hat> = sum_h <z_{i,h} W_O,h^T, r_hat> + <b_O, r_hat>,   W_O,h = W_O[:, h*d_head:(h+1)*d_head]

with z the input of the output projection. The reference and the variant are decomposed onto the same
reference direction, so their difference shows which block writes less (or more) of it in the variant.
Families whose attention output passes through a norm (Gemma) get no per-head split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from trace_lib.attribution.components import Component, n_heads, o_proj
from trace_lib.attribution.metric import MetricBatch
from trace_lib.attribution.patching import recording, sites_of
from trace_lib.models.device import model_device, to_device

_HEAD_SPLIT = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox")


@dataclass
class Decomposition:
    """Mean projections onto r_hat per writer, for one model: ``attn[i]``, ``mlp[i]``, ``heads[i][h]``."""

    embed: float
    attn: list[float]
    mlp: list[float]
    heads: list[list[float]] | None
    total: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _head_vectors(loaded, layer: int, r_hat: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(W_O^T r_hat)`` as a vector over the z width, and ``<b_O, r_hat>``."""
    _, mod = o_proj(loaded, layer)
    w = mod.weight.detach().float().cpu()  # r_hat and the means are float32 CPU tensors, wherever the model runs
    v = r_hat @ w if isinstance(mod, nn.Linear) else w @ r_hat  # Linear [out, in]; GPT-2 Conv1D [in, out]
    bias = getattr(mod, "bias", None)
    return v, float(bias.detach().float().cpu() @ r_hat) if bias is not None else 0.0


def decompose(loaded, batches: Sequence[MetricBatch], r_hat: torch.Tensor, layer: int) -> Decomposition:
    """Mean projection onto ``r_hat`` of every writer up to block ``layer``, at the batches' read positions."""
    r_hat = r_hat.float().cpu()
    split = loaded.arch.model_type in _HEAD_SPLIT and not loaded.arch.layout.parallel
    comps = [Component(0, "resid_pre"), Component(layer + 1, "resid_pre")]
    for i in range(layer + 1):
        comps += [Component(i, "attn"), Component(i, "mlp")]
        if split:
            comps.append(Component(i, "head", 0))
    sites, where = sites_of(loaded, comps)
    heads = n_heads(loaded) if split else 0
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for b in batches:
        with torch.no_grad(), recording(sites) as store:
            loaded.model(**to_device(b.forward_kwargs(next(loaded.model.parameters()).dtype), model_device(loaded)),
                         use_cache=False)
        for name, t in store.items():
            x = t[b.read.to(t.device)].float()
            sums[name] = sums.get(name, 0) + x.sum(0)
        n += int(b.read.sum())
    mean = {k: (v / n).cpu() for k, v in sums.items()}

    def proj(c: Component) -> float:
        return float(mean[where[c][0]] @ r_hat)

    head_rows = None
    if split:
        head_rows = []
        for i in range(layer + 1):
            v, _ = _head_vectors(loaded, i, r_hat)
            z = mean[where[Component(i, "head", 0)][0]]
            d = z.shape[-1] // heads
            head_rows.append([float(z[h * d:(h + 1) * d] @ v[h * d:(h + 1) * d]) for h in range(heads)])
    return Decomposition(proj(comps[0]), [proj(Component(i, "attn")) for i in range(layer + 1)],
                         [proj(Component(i, "mlp")) for i in range(layer + 1)], head_rows, proj(comps[1]))
