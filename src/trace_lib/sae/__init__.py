"""Sparse autoencoders: read a model's residual stream as sparse, (hopefully) interpretable latents.

* :class:`SAE` / :class:`SAEConfig` -- one module for ReLU, TopK and JumpReLU SAEs with SAELens parameter
  names and encode semantics (:mod:`trace_lib.sae.model`); ``SAE.content_hash()`` identifies an SAE for
  caches and checks. JumpReLU's straight-through estimators: :mod:`trace_lib.sae.jumprelu`.
* :func:`save_sae`, :func:`load_sae`, :func:`load_sae_dir`, :func:`check_sae_fits` -- SAELens folders (read and
  write, :mod:`trace_lib.sae.formats_saelens`) and EleutherAI sparsify folders (read,
  :mod:`trace_lib.sae.formats_sparsify`), through :mod:`trace_lib.sae.io`.
* :func:`train_sae` / :class:`SAETrainingConfig` -- deterministic, checkpointed training
  (:mod:`trace_lib.sae.training`).
* :func:`evaluate_sae` and the metric functions -- SAELens definitions (:mod:`trace_lib.sae.quality`).

See ``docs/sae.md``.
"""

from __future__ import annotations

from trace_lib.sae.formats_sparsify import hookpoint_to_hook_name
from trace_lib.sae.io import check_sae_fits, load_sae, load_sae_dir, save_sae
from trace_lib.sae.model import SAE, SUPPORTED_ARCHITECTURES, SAEConfig
from trace_lib.sae.quality import (
    ce_loss_recovered,
    dead_fraction,
    dense_fraction,
    evaluate_sae,
    explained_variance,
    feature_frequencies,
    mean_l0,
)
from trace_lib.sae.training import SAETrainingConfig, geometric_median, train_sae

__all__ = [
    "SAE",
    "SAEConfig",
    "SAETrainingConfig",
    "SUPPORTED_ARCHITECTURES",
    "ce_loss_recovered",
    "check_sae_fits",
    "dead_fraction",
    "dense_fraction",
    "evaluate_sae",
    "explained_variance",
    "feature_frequencies",
    "geometric_median",
    "hookpoint_to_hook_name",
    "load_sae",
    "load_sae_dir",
    "mean_l0",
    "save_sae",
    "train_sae",
]
