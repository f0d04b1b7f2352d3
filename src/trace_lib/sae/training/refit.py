"""Least-squares decoder refit after training (``refit_decoder=True``).

With the encoder frozen, the best decoder for its codes is a linear regression, solved from sparse moments;
the codes' support, hence L0, does not change, and part of the L1 penalty's shrinkage is paid back.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from trace_lib.errors import SAEError
from trace_lib.sae.model import SAE
from trace_lib.sae.training.steps import group_by_latent


@torch.no_grad()
def refit_decoder(sae: SAE, batches: Iterable[torch.Tensor], scale: float = 1.0, ridge: float = 1e-3
                  ) -> dict[str, float]:
    """Replace the decoder by the least-squares one for the trained, frozen encoder.

    With the codes ``F`` fixed, ``min_{D, b} sum_t ||x_t - F_t D - b||²`` is linear regression:
    ``D = (F_cᵀ F_c + λ I)⁻¹ F_cᵀ X_c`` on centred codes and inputs, ``b = mean(x) - mean(F) D``, with a
    small ridge ``λ = ridge * mean diag(F_cᵀ F_c)`` for latents that rarely fire. It undoes the part of the
    L1 penalty's shrinkage (Wright & Sharkey 2024, "Addressing Feature Suppression in SAEs") that a
    per-latent rescaling or a better decoder can: L0 and which latents fire are unchanged, since the
    encoder's pre-activations are kept exactly (``b_enc`` absorbs the move of ``b_dec`` when it is
    subtracted from the input). Each new row is then rescaled to the old row's norm and the factor moved
    into that latent's encoder column and bias (``c_i f_i · D_i / c_i``), so decoder norms stay as
    trained. Latents that never fire keep their weights. ``FᵀF`` and ``FᵀX`` are summed from the sparse
    codes (``B * L0`` entries per batch, grouped by latent as in training) into float64. Returns the
    in-sample MSE per token before and after.

    ``batches`` are raw rows, multiplied by ``scale`` (the units ``sae`` was trained in); ``sae`` is changed
    in place.
    """
    m, d, dev = sae.d_sae, sae.d_in, sae.device
    ftf = torch.zeros(m, m, dtype=torch.float64, device=dev)
    ftx = torch.zeros(m, d, dtype=torch.float64, device=dev)
    sum_f = torch.zeros(m, dtype=torch.float64, device=dev)
    sum_x = torch.zeros(d, dtype=torch.float64, device=dev)
    sq_x = 0.0
    mse_before = 0.0
    n = 0
    for batch in batches:
        x = batch.to(dev) * scale
        z = sae.encode(x)
        rows, lat = z.nonzero(as_tuple=True)
        vals = z[rows, lat]
        per_row = torch.bincount(rows, minlength=x.shape[0])
        recon = F.embedding_bag(lat, sae.W_dec, per_row.cumsum(0) - per_row, per_sample_weights=vals,
                                mode="sum") + sae.b_dec
        mse_before += (x - recon).double().pow(2).sum().item()
        # FᵀF and FᵀX of the batch: each latent's entries scale rows of z and of x (float32 per batch)
        order, offsets = group_by_latent(lat, m)
        ftf += F.embedding_bag(rows[order], z, offsets, per_sample_weights=vals[order], mode="sum").double()
        ftx += F.embedding_bag(rows[order], x, offsets, per_sample_weights=vals[order], mode="sum").double()
        xd = x.double()
        sum_f += z.double().sum(dim=0)
        sum_x += xd.sum(dim=0)
        sq_x += xd.pow(2).sum().item()
        n += x.shape[0]
    if n == 0:
        raise SAEError("no activations to refit the decoder on")
    mf, mx = sum_f / n, sum_x / n
    alive = torch.diagonal(ftf) > 0
    idx = alive.nonzero().squeeze(1)
    if idx.numel() == 0:
        return {"refit_mse_before": mse_before / n, "refit_mse_after": mse_before / n}
    gram = ftf[idx][:, idx]
    cov = gram - n * torch.outer(mf[idx], mf[idx])
    cross = ftx[idx] - n * torch.outer(mf[idx], mx)
    lam = ridge * torch.diagonal(cov).mean().clamp_min(1e-12)
    d_new = torch.linalg.solve(cov + lam * torch.eye(idx.numel(), dtype=cov.dtype, device=dev), cross)
    b_new = mx - mf[idx] @ d_new
    # in-sample SSE of the new fit from the moments: sum ||x||² - 2 <W, FᵀX'> + <W, Gram W> with the
    # affine design [F, 1] and weights W = [D; b]
    sse = (sq_x - 2 * (d_new * ftx[idx]).sum() - 2 * (b_new * sum_x).sum()
           + (d_new * (gram @ d_new)).sum() + 2 * (b_new * (sum_f[idx] @ d_new)).sum()
           + n * b_new.pow(2).sum()).item()
    old_norm = sae.W_dec.detach().double()[idx].norm(dim=1)
    c = d_new.norm(dim=1) / old_norm.clamp_min(1e-12)
    ok = c > 1e-8
    idx, c, d_new = idx[ok], c[ok], d_new[ok]
    b_old = sae.b_dec.detach().double().clone()
    w_enc = sae.W_enc.detach().double()
    b_enc = sae.b_enc.detach().double()
    if sae.cfg.apply_b_dec_to_input:  # keep pre = (x - b_dec) W_enc + b_enc exactly
        b_enc = b_enc + (b_new - b_old) @ w_enc
    sae.b_enc.copy_(b_enc.to(sae.b_enc.dtype))
    sae.b_dec.copy_(b_new.to(sae.b_dec.dtype))
    sae.W_dec[idx] = (d_new / c.unsqueeze(1)).to(sae.W_dec.dtype)
    sae.W_enc[:, idx] = (w_enc[:, idx] * c).to(sae.W_enc.dtype)
    sae.b_enc[idx] = (b_enc[idx] * c).to(sae.b_enc.dtype)
    return {"refit_mse_before": mse_before / n, "refit_mse_after": max(sse, 0.0) / n}
