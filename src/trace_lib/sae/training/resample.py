"""Resampling dead latents of a ReLU SAE (Towards Monosemanticity, Bricken et al. 2023).

A latent that has not fired for ``dead_feature_window`` tokens is dead. Each dead latent gets an input of
the current batch, drawn with probability ∝ (its squared reconstruction error)²: the decoder row becomes the
centred input's direction ``v = (x - b_dec) / ||x - b_dec||``, the encoder column ``0.2 * mean alive encoder
norm * v``, ``b_enc = 0``, and Adam's moments of those weights are reset.
"""

from __future__ import annotations

import torch
from torch import nn

from trace_lib.sae.model import SAE


@torch.no_grad()
def resample_dead_latents(sae: SAE, x: torch.Tensor, dead: torch.Tensor, opt: torch.optim.Optimizer,
                          params: dict[str, nn.Parameter], gen: torch.Generator,
                          apply_b_dec_to_input: bool) -> torch.Tensor:
    """Resample the latents where ``dead`` is True from the batch ``x`` (in training units); return their ids.

    ``params`` names ``opt``'s parameters (``W_enc``, ``W_dec``, ``b_enc`` have their moments reset);
    ``gen`` draws the inputs. Nothing changes (and no ids come back) when no latent is dead or the batch is
    reconstructed exactly.
    """
    idx = dead.nonzero().squeeze(1)
    if idx.numel() == 0:
        return idx
    x_hat = sae.activation((x - sae.b_dec if apply_b_dec_to_input else x) @ sae.W_enc + sae.b_enc)
    x_hat = x_hat @ sae.W_dec + sae.b_dec
    per_input = (x - x_hat).pow(2).sum(dim=-1).double().cpu()
    probs = per_input.pow(2)
    if not bool(probs.sum() > 0):
        return idx[:0]
    chosen = torch.multinomial(probs, idx.numel(), replacement=True, generator=gen).to(x.device)
    v = x[chosen] - sae.b_dec
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean().item() if bool(alive.any()) else 1.0
    sae.W_dec[idx] = v
    sae.W_enc[:, idx] = v.T * (0.2 * enc_norm)
    sae.b_enc[idx] = 0.0
    for name, p in params.items():
        state = opt.state.get(p)
        if not state:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if name == "W_enc":
                state[key][:, idx] = 0.0
            elif name in ("W_dec", "b_enc"):
                state[key][idx] = 0.0
    return idx
