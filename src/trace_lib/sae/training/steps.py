"""The gradient engines: one training step's losses and parameter gradients, selected by :data:`ENGINES`.

An engine takes the trainer and a batch ``x`` (already scaled, on the device) and leaves
``dL/dparam`` in each parameter's ``.grad``; it returns the detached losses (``mse``, the architecture's
auxiliary term ``auxk`` / ``l1`` / ``l0``, ``loss`` and ``l0_mean``) and a ``[d_sae]`` mask of the latents that
fired. The loss is ``||x - x̂||²`` summed over dimensions, averaged over the batch (SAELens), plus

* topk: ``auxk_coefficient * AuxK`` (Gao et al. 2024 App. A.2: the top ``k_aux`` *dead* latents reconstruct
  the main residual, scaled by ``min(n_dead / k_aux, 1)``);
* relu: ``c * sum_i z_i ||W_dec,i||`` (Anthropic April 2024; SAELens ``scale_sparsity_penalty_by_decoder_norm``),
  ``c`` from the warm-up and the L1 controller;
* jumprelu: ``l0_coefficient * L0`` with straight-through threshold gradients (:mod:`trace_lib.sae.jumprelu`).

Engines: :func:`dense_step` (plain autograd on dense ``[batch, d_sae]`` codes; every architecture, and the
test oracle), :func:`topk_sparse_step` and :func:`relu_sparse_step` (dense only in the encoder matmul; the
decoder and the weight gradients go over the selected entries with ``embedding_bag``). Each sums its
entries in a fixed order, so results are deterministic; the sparse engines agree with the dense one to float
rounding, not bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from trace_lib.sae.jumprelu import JumpReLU, Step

if TYPE_CHECKING:
    from trace_lib.sae.training.trainer import SAETrainer

StepResult = tuple[dict[str, torch.Tensor], torch.Tensor]
StepFn = Callable[["SAETrainer", torch.Tensor], StepResult]


# ---------------------------------------------------------------------------------------------- sparse helpers
def group_by_latent(latents: torch.Tensor, n_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, offsets)`` grouping sparse-code entries by latent for ``embedding_bag``: ``order`` sorts the
    entries by latent (stable, so the summation order is deterministic) and ``offsets[i]`` is where latent i's
    run starts. ``embedding_bag(rows[order], source, offsets, per_sample_weights=coef[order])`` is then
    ``Gᵀ @ source`` for the sparse G with entries ``G[rows[e], latents[e]] = coef[e]``: the weight gradient
    of a sparse layer in one pass over the entries, with no dense ``[batch, d_sae]`` matrix."""
    order = latents.argsort(stable=True)
    counts = torch.bincount(latents, minlength=n_latents)
    return order, counts.cumsum(0) - counts


def chunked_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pre.topk(k, dim=-1, sorted=False)`` for 2-D ``pre`` in about 60% of the time on CPU, same values and
    indices (up to which of exactly tied entries is picked, and the order of the k entries).

    torch's CPU top-k costs ~7 ns per element whatever k; it is the second-largest cost of a TopK step after
    the encoder matmul. Cut each row into chunks of ``c`` entries: the k largest entries lie in the k chunks
    with the largest maxima (an entry outside them is beaten by k chunk maxima), so a top-k over the chunk
    maxima and then over those k*c candidates gives the same result.
    """
    n, m = pre.shape
    c = next((c for c in (8, 6, 4) if m % c == 0 and 2 * k * c <= m), None)
    if c is None or not pre.is_contiguous() or pre.device.type != "cpu":
        return pre.topk(k, dim=-1, sorted=False)
    n_chunks = m // c
    best = pre.view(n, n_chunks, c).amax(dim=-1).topk(k, dim=-1, sorted=False).indices  # [n, k] chunk ids
    rows = best + torch.arange(0, n * n_chunks, n_chunks, device=pre.device).unsqueeze(1)
    candidates = F.embedding(rows, pre.view(n * n_chunks, c)).view(n, k * c)  # a fast row gather
    values, j = candidates.topk(k, dim=-1, sorted=False)
    return values, best.gather(1, j // c) * c + j % c


@torch.no_grad()
def _encoder_pre(t: SAETrainer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sae_in, pre)`` of a batch without autograd: the encoder's input and its dense pre-activations."""
    sae = t.sae
    sae_in = x - sae.b_dec.detach() if t.cfg.apply_b_dec_to_input else x
    pre = sae_in @ sae.W_enc.detach()
    pre += sae.b_enc.detach()
    return sae_in, pre


@torch.no_grad()
def _set_encoder_grads(t: SAETrainer, tokens: torch.Tensor, grad_pre: torch.Tensor, offsets: torch.Tensor,
                       sae_in: torch.Tensor, grad_x_hat: torch.Tensor) -> None:
    """``W_enc``'s, ``b_enc``'s and ``b_dec``'s gradients from sparse entries grouped by latent: entry e
    (token ``tokens[e]``, pre-activation gradient ``grad_pre[e]``) adds ``grad_pre[e] * sae_in[tokens[e]]``
    to its latent's encoder column and ``grad_pre[e]`` to its bias; ``b_dec``'s is ``sum(dL/dx_hat)``, less
    ``W_enc @ dL/db_enc`` when ``b_dec`` is subtracted from the input."""
    sae = t.sae
    sae.W_enc.grad = F.embedding_bag(tokens, sae_in, offsets, per_sample_weights=grad_pre,
                                     mode="sum").t().contiguous()
    entries = torch.arange(grad_pre.numel(), device=grad_pre.device)
    grad_b_enc = F.embedding_bag(entries, grad_pre.unsqueeze(1), offsets, mode="sum").squeeze(1)
    sae.b_enc.grad = grad_b_enc
    grad_b_dec = grad_x_hat.sum(dim=0)
    if t.cfg.apply_b_dec_to_input:
        grad_b_dec -= sae.W_enc.detach() @ grad_b_enc
    sae.b_dec.grad = grad_b_dec


# ---------------------------------------------------------------------------------------------- dense engine
def _auxk_penalty(t: SAETrainer, pre: torch.Tensor, z: torch.Tensor, err: torch.Tensor,
                  threshold: torch.Tensor | None) -> tuple[torch.Tensor, float | None]:
    """AuxK over the dead latents (dense); coefficient None (no loss term) while none is dead."""
    cfg, sae = t.cfg, t.sae
    dead = t.tokens_since_fired >= t.dead_window
    n_dead = int(dead.sum().item())
    if not (cfg.auxk_coefficient > 0 and n_dead > 0):
        return err.new_zeros(()), None
    k_aux = min(t.auxk_k, n_dead)
    aux_scale = min(n_dead / t.auxk_k, 1.0)
    aux_pre = torch.where(dead[None, :], pre, torch.full_like(pre, -math.inf))
    top = aux_pre.topk(k_aux, dim=-1, sorted=False)
    aux_z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    e_hat = aux_z @ sae.W_dec
    auxk = aux_scale * (e_hat - err.detach()).pow(2).sum(dim=-1).mean()
    return auxk, cfg.auxk_coefficient


def _l1_penalty(t: SAETrainer, pre: torch.Tensor, z: torch.Tensor, err: torch.Tensor,
                threshold: torch.Tensor | None) -> tuple[torch.Tensor, float | None]:
    """Decoder-norm-weighted L1 of the codes."""
    return (z * t.sae.W_dec.norm(dim=1)).sum(dim=-1).mean(), t.l1.coefficient(t.step)


def _l0_penalty(t: SAETrainer, pre: torch.Tensor, z: torch.Tensor, err: torch.Tensor,
                threshold: torch.Tensor | None) -> tuple[torch.Tensor, float | None]:
    """Mean L0 through the straight-through Heaviside, so the thresholds get its gradient."""
    l0 = Step.apply(pre, threshold, t.cfg.jumprelu_bandwidth).sum(dim=-1).mean()
    return l0, t.schedule.sparsity_coef(t.step, t.cfg.l0_coefficient)


# architecture -> (name of its auxiliary loss, the function returning it and its coefficient)
_PENALTIES = {"topk": ("auxk", _auxk_penalty), "relu": ("l1", _l1_penalty), "jumprelu": ("l0", _l0_penalty)}


def dense_step(t: SAETrainer, x: torch.Tensor) -> StepResult:
    """Losses by plain autograd on dense codes ``[batch, d_sae]``, for every architecture; the reference the
    sparse engines are tested against."""
    cfg = t.cfg
    sae = t.sae
    sae_in = x - sae.b_dec if cfg.apply_b_dec_to_input else x
    pre = sae_in @ sae.W_enc + sae.b_enc
    threshold: torch.Tensor | None = None
    if t.log_threshold is not None:  # jumprelu: the thresholds are trained through exp(log θ)
        threshold = torch.exp(t.log_threshold)
        z = JumpReLU.apply(pre, threshold, cfg.jumprelu_bandwidth)
    else:
        z = sae.activation(pre)
    x_hat = z @ sae.W_dec + sae.b_dec
    err = x - x_hat
    mse = err.pow(2).sum(dim=-1).mean()
    losses: dict[str, torch.Tensor] = {"mse": mse}
    fired = (z > 0).any(dim=0)
    name, penalty_fn = _PENALTIES[cfg.architecture]
    penalty, coefficient = penalty_fn(t, pre, z, err, threshold)
    losses[name] = penalty
    loss = mse if coefficient is None else mse + coefficient * penalty
    losses["loss"] = loss

    t.opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        losses["l0_mean"] = (z != 0).sum(dim=-1).float().mean()
    return {k: v.detach() for k, v in losses.items()}, fired


# ---------------------------------------------------------------------------------------------- sparse engines
@torch.no_grad()
def topk_sparse_step(t: SAETrainer, x: torch.Tensor) -> StepResult:
    """:func:`dense_step` for TopK without dense ``[batch, d_sae]`` maths after the encoder matmul.

    Same losses and gradients up to float rounding (Gao et al. 2024 §5.3 and sparsify decode sparsely too):

    * forward: ``pre = sae_in @ W_enc + b_enc`` stays dense (every latent must be ranked); the k largest
      per row are selected (:func:`chunked_topk`) and decoded as ``x_hat = sum_j relu(v_j) W_dec[i_j] + b_dec``
      with ``embedding_bag`` (B*k row reads instead of a B x d_sae x d_in matmul). AuxK ranks only the
      dead columns and decodes them the same way.
    * backward, by hand: each selected value's gradient is a row dot product (``embedding_bag``'s
      per-sample-weight gradient, ReLU's mask included); ``W_dec``'s and ``W_encᵀ``'s gradients are sums
      of B*k scaled rows grouped by latent (:func:`group_by_latent`); ``b_enc``'s is the per-latent sum of
      the selected gradients and ``b_dec``'s follows as ``sum(dL/dx_hat) - W_enc @ dL/db_enc``.
    """
    cfg = t.cfg
    sae = t.sae
    n = x.shape[0]
    sae_in, pre = _encoder_pre(t, x)
    w_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
    top_v, top_i = chunked_topk(pre, int(cfg.k))
    with torch.enable_grad():
        top_v.requires_grad_()
        vals = torch.relu(top_v)
        recon = F.embedding_bag(top_i, w_dec, per_sample_weights=vals, mode="sum")
    err = x - (recon.detach() + b_dec)
    mse = err.pow(2).sum(dim=-1).mean()
    losses: dict[str, torch.Tensor] = {"mse": mse}
    # the selected entries (main, then aux): decoder outputs, their upstream gradients, the selected
    # pre-activations, their ReLU'd values, and latent ids
    outputs, grad_outputs, selected, coefs, latent_ids = [recon], [err * (-2.0 / n)], [top_v], [vals], [top_i]

    dead = t.tokens_since_fired >= t.dead_window
    n_dead = int(dead.sum().item())
    if cfg.auxk_coefficient > 0 and n_dead > 0:
        k_aux = min(t.auxk_k, n_dead)
        aux_scale = min(n_dead / t.auxk_k, 1.0)
        dead_idx = dead.nonzero().squeeze(1)
        dead_pre = pre.index_select(1, dead_idx)
        if k_aux < n_dead:
            aux_v, local = chunked_topk(dead_pre, k_aux)
            aux_i = dead_idx[local]
        else:  # every dead latent is selected
            aux_v, aux_i = dead_pre, dead_idx.expand(n, n_dead).contiguous()
        with torch.enable_grad():
            aux_v.requires_grad_()
            aux_vals = torch.relu(aux_v)
            e_hat = F.embedding_bag(aux_i, w_dec, per_sample_weights=aux_vals, mode="sum")
        aux_err = e_hat.detach() - err
        auxk = aux_scale * aux_err.pow(2).sum(dim=-1).mean()
        losses["auxk"] = auxk
        losses["loss"] = mse + cfg.auxk_coefficient * auxk
        outputs.append(e_hat)
        grad_outputs.append(aux_err * (2.0 * cfg.auxk_coefficient * aux_scale / n))
        selected.append(aux_v)
        coefs.append(aux_vals)
        latent_ids.append(aux_i)
    else:
        losses["auxk"] = mse.new_zeros(())
        losses["loss"] = mse
    grad_pre = torch.cat([g.reshape(-1) for g in torch.autograd.grad(outputs, selected, grad_outputs)])

    # weight gradients: one embedding_bag per weight over all entries grouped by latent
    latents = torch.cat([i.reshape(-1) for i in latent_ids])
    order, offsets = group_by_latent(latents, t.d_sae)
    tokens = torch.cat([torch.arange(n, device=x.device).repeat_interleave(i.shape[1]) for i in latent_ids])
    dec_rows = tokens.clone()  # W_dec: main entries scale rows of dL/dx_hat, aux entries rows of dL/de_hat
    dec_rows[top_i.numel():] += n
    coef = torch.cat([c.detach().reshape(-1) for c in coefs])
    sae.W_dec.grad = F.embedding_bag(dec_rows[order], torch.cat(grad_outputs), offsets,
                                     per_sample_weights=coef[order], mode="sum")
    _set_encoder_grads(t, tokens[order], grad_pre[order], offsets, sae_in, grad_outputs[0])

    fired = torch.zeros(t.d_sae, dtype=torch.bool, device=x.device)
    positive = top_v.detach() > 0
    fired[top_i[positive]] = True
    losses["l0_mean"] = positive.sum(dim=-1).float().mean()
    return losses, fired


@torch.no_grad()
def relu_sparse_step(t: SAETrainer, x: torch.Tensor) -> StepResult:
    """:func:`dense_step` for ReLU with the L1 penalty, decoding and differentiating only the latents that
    fired (``pre > 0``); same losses and gradients up to float rounding.

    The entries are the ``(row, latent)`` pairs with a positive pre-activation, ``E = B * L0`` of them
    (variable per row, so ``embedding_bag`` takes row offsets). Forward: the encoder matmul is dense,
    ``x_hat = sum_e z_e W_dec[l_e] + b_dec``. Backward: ``dL/dz_e = dL/dx_hat[row_e] . W_dec[l_e] +
    c ||W_dec[l_e]|| / B`` (MSE plus ``c * L1``, ``c`` the warmed-up coefficient), which is also
    ``dL/dpre_e`` since ReLU passes it; ``W_dec``'s gradient is the entries' ``z_e dL/dx_hat[row_e]``
    grouped by latent plus the L1 term ``c / B * sum_e z_e * W_dec[l] / ||W_dec[l]||``, ``W_encᵀ``'s the
    entries' ``dL/dpre_e * sae_in[row_e]``; the biases as in :func:`topk_sparse_step`. Once L0 is
    small (after the L1 warm-up) this is about a third of the dense step's arithmetic; while more than
    an eighth of the latents fire (the first steps), the dense step is faster and is taken instead
    (measured on SmolLM2's residual, d_sae 2304: 65 vs 175 ms at L0 65, 218 vs 236 ms at L0 493).
    """
    sae = t.sae
    n = x.shape[0]
    sae_in, pre = _encoder_pre(t, x)
    w_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
    rows, lat = (pre > 0).nonzero(as_tuple=True)  # row-major: entries sorted by row
    if rows.numel() > n * t.d_sae // 8:  # early in training: dense maths is faster
        with torch.enable_grad():
            return dense_step(t, x)
    per_row = torch.bincount(rows, minlength=n)
    row_offsets = per_row.cumsum(0) - per_row
    with torch.enable_grad():
        vals = pre[rows, lat].requires_grad_()
        recon = F.embedding_bag(lat, w_dec, row_offsets, per_sample_weights=vals, mode="sum")
    err = x - (recon.detach() + b_dec)
    mse = err.pow(2).sum(dim=-1).mean()
    dec_norm = w_dec.norm(dim=1)
    l1 = (vals.detach() * dec_norm[lat]).sum() / n
    c = t.l1.coefficient(t.step)
    grad_out = err * (-2.0 / n)
    (grad_vals,) = torch.autograd.grad(recon, vals, grad_out)
    grad_pre = grad_vals + dec_norm[lat] * (c / n)

    order, offsets = group_by_latent(lat, t.d_sae)
    v = vals.detach()
    grad_w_dec = F.embedding_bag(rows[order], grad_out, offsets, per_sample_weights=v[order], mode="sum")
    entries = torch.arange(lat.numel(), device=x.device)
    sum_z = F.embedding_bag(entries, v[order].unsqueeze(1), offsets, mode="sum").squeeze(1)
    grad_w_dec += (sum_z * (c / n) / dec_norm.clamp_min(1e-12)).unsqueeze(1) * w_dec
    sae.W_dec.grad = grad_w_dec
    _set_encoder_grads(t, rows[order], grad_pre[order], offsets, sae_in, grad_out)

    fired = torch.zeros(t.d_sae, dtype=torch.bool, device=x.device)
    fired[lat] = True
    losses = {"mse": mse, "l1": l1, "loss": mse + c * l1, "l0_mean": per_row.float().mean()}
    return losses, fired


# (implementation, architecture) -> engine. "reference" is plain autograd everywhere; "fast" is sparse where
# a sparse engine exists (JumpReLU's straight-through estimators stay with autograd).
ENGINES: dict[tuple[str, str], StepFn] = {
    ("reference", "topk"): dense_step,
    ("reference", "relu"): dense_step,
    ("reference", "jumprelu"): dense_step,
    ("fast", "topk"): topk_sparse_step,
    ("fast", "relu"): relu_sparse_step,
    ("fast", "jumprelu"): dense_step,
}
