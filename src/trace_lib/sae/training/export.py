"""The trained SAE as a standalone :class:`~trace_lib.sae.SAE` in raw activation units.

Training works on inputs scaled by ``s`` (:mod:`trace_lib.sae.training.init`) with a log-parameterised
JumpReLU threshold. The export copies the weights to the CPU, sets ``threshold = exp(log_threshold)``, records
``s`` as ``norm_scaling_factor`` and, with ``fold_scaling`` (default), folds it into the weights as SAELens does
(``W_enc *= s``, ``W_dec /= s``, ``b_dec /= s``), so the SAE reads raw activations. The training config, the
final L1 coefficient (ReLU) and the refit's MSEs go to ``cfg.metadata``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from trace_lib.sae.model import SAE, SAEConfig

if TYPE_CHECKING:
    from trace_lib.sae.training.trainer import SAETrainer


@torch.no_grad()
def export_sae(t: SAETrainer, hook_name: str, model_name: str | None, extra: dict[str, Any]) -> SAE:
    """A new SAE (CPU) from the trainer's current weights; ``extra`` joins ``cfg.metadata``."""
    cfg = t.cfg
    c = t.sae.cfg
    out_cfg = SAEConfig(
        d_in=c.d_in, d_sae=c.d_sae, architecture=c.architecture, k=c.k, hook_name=hook_name,
        normalize_activations="expected_average_only_in" if t.scale != 1.0 else "none",
        norm_scaling_factor=t.scale if t.scale != 1.0 else None,
        apply_b_dec_to_input=c.apply_b_dec_to_input, model_name=model_name,
        metadata={"trained_by": "trace", "training": cfg.to_dict(), "norm_scaling_factor": t.scale, **extra},
    )
    if cfg.architecture == "relu":
        out_cfg.metadata["final_l1_coefficient"] = t.l1.final_coefficient
    if t.refit:
        out_cfg.metadata["decoder_refit"] = dict(t.refit)
    sae = SAE(out_cfg)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        getattr(sae, name).copy_(getattr(t.sae, name).detach().cpu())
    if t.log_threshold is not None:
        sae.threshold.copy_(torch.exp(t.log_threshold.detach()).cpu())  # type: ignore[union-attr]
    if cfg.fold_scaling:
        sae.fold_scaling_factor()
    return sae
