"""Where training starts: the input scaling factor and the initial weights (fresh, or from an SAE).

* Scaling (``normalize_activations="expected_average_only_in"``, Anthropic April 2024; SAELens
  ``ActivationScaler``): ``s = sqrt(d_in) / mean ||x||`` on the first ``init_tokens`` rows, so the
  hyper-parameters transfer between models. Training works on ``s * x``.
* Fresh weights: decoder rows random unit vectors, ``W_enc = W_decᵀ`` (Gao et al. 2024 §2.4), ``b_enc = 0``,
  ``b_dec`` the geometric median of the scaled sample (Towards Monosemanticity), its mean, or 0.
* Warm start: an existing SAE re-expressed in scaled units (``W_enc / s``, ``W_dec * s``, ``b_dec * s``), with
  its decoder norms folded into the encoder when training keeps unit-norm decoder rows.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from trace_lib.errors import SAEError
from trace_lib.sae.model import SAE
from trace_lib.sae.training.config import SAETrainingConfig


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """Weiszfeld's algorithm in float64: the point minimising the summed Euclidean distance to the rows of x."""
    x = x.to(torch.float64)
    m = x.mean(dim=0)
    for _ in range(iters):
        d = (x - m).norm(dim=1).clamp_min(1e-12)
        w = 1.0 / d
        new = (w[:, None] * x).sum(dim=0) / w.sum()
        moved = (new - m).norm().item()
        m = new
        if moved <= tol * (m.norm().item() + 1e-12):
            break
    return m.to(torch.float32)


def input_scale(sample: torch.Tensor, cfg: SAETrainingConfig) -> float:
    """``sqrt(d_in) / mean ||x||`` over the sample's rows with ``expected_average_only_in``, else 1."""
    if cfg.normalize_activations != "expected_average_only_in":
        return 1.0
    mean_norm = sample.double().norm(dim=1).mean().item()
    return math.sqrt(sample.shape[1]) / mean_norm if mean_norm > 0 else 1.0


@torch.no_grad()
def init_fresh(sae: SAE, x: torch.Tensor, cfg: SAETrainingConfig) -> None:
    """Fresh weights for ``sae`` from the scaled sample ``x`` (decoder drawn from a generator seeded ``cfg.seed``)."""
    g = torch.Generator().manual_seed(cfg.seed)
    w_dec = torch.randn(sae.d_sae, sae.d_in, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    sae.W_dec.copy_(w_dec)
    sae.W_enc.copy_(w_dec.T)
    sae.b_enc.zero_()
    if cfg.b_dec_init == "geometric_median":
        sae.b_dec.copy_(geometric_median(x))
    elif cfg.b_dec_init == "mean":
        sae.b_dec.copy_(x.mean(dim=0))
    else:
        sae.b_dec.zero_()


@torch.no_grad()
def warm_start(sae: SAE, log_threshold: nn.Parameter | None, init: SAE, cfg: SAETrainingConfig,
               scale: float) -> None:
    """Copy ``init`` (raw units) into ``sae`` (trained in units scaled by ``scale``); JumpReLU thresholds go to
    ``log_threshold`` as ``log(max(θ, 1e-6))``. SAEError if the two SAEs' shapes or input handling differ."""
    c = init.cfg
    want = (cfg.architecture, sae.d_in, sae.d_sae, cfg.k if cfg.architecture == "topk" else None)
    got = (c.architecture, c.d_in, c.d_sae, c.k if c.architecture == "topk" else None)
    if want != got:
        raise SAEError(
            f"init_from SAE is (architecture, d_in, d_sae, k)={got} but training asks for {want}: "
            "set SAETrainingConfig to match the SAE you start from"
        )
    if c.apply_b_dec_to_input != cfg.apply_b_dec_to_input:
        raise SAEError(
            f"init_from SAE has apply_b_dec_to_input={c.apply_b_dec_to_input}: set "
            f"SAETrainingConfig.apply_b_dec_to_input={c.apply_b_dec_to_input} to fine-tune it"
        )
    src = copy.deepcopy(init).to(device="cpu", dtype=torch.float32).fold_scaling_factor()
    s = scale
    w_enc, b_enc = src.W_enc / s, src.b_enc.clone()
    w_dec, b_dec = src.W_dec * s, src.b_dec * s
    thr = src.threshold.clone() if src.threshold is not None else None
    if cfg.normalize_decoder:  # fold decoder norms into the encoder (SAELens fold_W_dec_norm)
        norms = w_dec.norm(dim=1).clamp_min(1e-12)
        w_dec = w_dec / norms[:, None]
        w_enc = w_enc * norms[None, :]
        b_enc = b_enc * norms
        if thr is not None:
            thr = thr * norms
    for name, t in (("W_enc", w_enc), ("b_enc", b_enc), ("W_dec", w_dec), ("b_dec", b_dec)):
        getattr(sae, name).copy_(t)
    if thr is not None and log_threshold is not None:
        log_threshold.copy_(torch.log(thr.clamp_min(1e-6)))
