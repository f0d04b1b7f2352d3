"""What :func:`~trace_lib.sae.training.train_sae` trains: :class:`SAETrainingConfig` and its defaults.

The defaults follow SAELens and sparsify (Adam 4e-4, betas 0.9/0.999, batch 4096, TopK k=32 with AuxK 1/32,
8x expansion, geometric-median ``b_dec``, inputs scaled to mean norm ``sqrt(d_in)``); the comments beside the
fields say what each does, and :mod:`trace_lib.sae.training` how they fit together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from trace_lib.errors import SAEError
from trace_lib.sae.model import SUPPORTED_ARCHITECTURES, SUPPORTED_NORMALIZATIONS

DEFAULT_DEAD_WINDOW = 10_000_000  # tokens (Gao et al. 2024; sparsify's dead_feature_threshold)
IMPLEMENTATIONS = ("fast", "reference")  # the gradient engines' families (see trace_lib.sae.training.steps)


@dataclass
class SAETrainingConfig:
    """Hyper-parameters for :func:`~trace_lib.sae.training.train_sae` (see :mod:`trace_lib.sae.training`)."""

    architecture: str = "topk"
    d_sae: int | None = None  # number of latents; None -> expansion_factor * d_in
    expansion_factor: int = 8
    k: int = 32  # topk: active latents per token
    # sparsity penalties
    l1_coefficient: float = 5.0  # relu; on inputs scaled to mean norm sqrt(d_in)
    target_l0: float | None = None  # relu: adapt the L1 coefficient (dual ascent) until mean L0 is this
    l1_adapt_rate: float = 0.03  # relu with target_l0: step size of the log-coefficient update
    l1_adapt_window: tuple[float, float] = (0.45, 0.85)  # target_l0: the fraction of training it adapts in
    l0_coefficient: float = 1.0  # jumprelu (SAELens default)
    jumprelu_bandwidth: float = 0.001  # SAELens / Gemma Scope
    jumprelu_init_threshold: float = 0.001
    sparsity_warmup_steps: int | None = None  # linear warm-up of l1/l0 coefficient; None -> 5% of steps
    # optimisation
    lr: float = 4e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_warmup_steps: int | None = None  # None -> min(1000, 5% of steps)
    lr_decay_fraction: float = 0.2  # linear decay to 0 over the last 20% of steps
    grad_clip_norm: float | None = 1.0
    batch_size: int = 4096
    total_tokens: int | None = None  # None -> `epochs` passes over the data
    epochs: int = 1
    shuffle_buffer_tokens: int = 131072  # mixing buffer for streamed chunks
    seed: int = 0
    device: str = "auto"  # "auto" -> cuda if available, else cpu
    # data scaling and initialisation
    normalize_activations: str = "expected_average_only_in"
    fold_scaling: bool = True
    init_tokens: int = 65536  # rows used to estimate the scaling factor and b_dec
    b_dec_init: str = "geometric_median"  # or "mean", "zeros"
    apply_b_dec_to_input: bool = True
    normalize_decoder: bool = True
    refit_decoder: bool = False  # after training, least-squares decoder for the fixed encoder (training.refit)
    # dead latents
    dead_feature_window: int | None = None  # tokens; None -> min(10M, 10% of training tokens)
    auxk_coefficient: float = 1 / 32  # Gao et al. 2024
    auxk_k: int | None = None  # None -> d_in // 2
    resample_dead: bool = True  # relu only
    resample_every: int | None = None  # steps; None -> every 20% of training
    # bookkeeping
    checkpoint_every: int = 1000  # steps

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise SAEError(
                f"unknown SAE architecture '{self.architecture}': trace trains {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.normalize_activations not in SUPPORTED_NORMALIZATIONS:
            raise SAEError(
                f"normalize_activations must be one of {', '.join(SUPPORTED_NORMALIZATIONS)}, "
                f"got '{self.normalize_activations}'"
            )
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise SAEError(f"b_dec_init must be geometric_median, mean or zeros, got '{self.b_dec_init}'")
        for name in ("batch_size", "epochs", "checkpoint_every", "init_tokens", "shuffle_buffer_tokens",
                     "expansion_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SAEError(f"SAETrainingConfig.{name} must be a positive integer, got {v!r}")
        for name in ("d_sae", "total_tokens", "dead_feature_window", "auxk_k", "resample_every"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise SAEError(f"SAETrainingConfig.{name} must be a positive integer or None, got {v!r}")
        if self.architecture == "topk" and (not isinstance(self.k, int) or self.k < 1):
            raise SAEError(f"SAETrainingConfig.k must be a positive integer for topk, got {self.k!r}")
        if not self.lr > 0:
            raise SAEError(f"SAETrainingConfig.lr must be positive, got {self.lr}")
        if self.target_l0 is not None:
            if self.architecture != "relu":
                raise SAEError(f"target_l0 steers the L1 coefficient of a relu SAE; a {self.architecture} SAE "
                               "sets its sparsity with k (topk) or l0_coefficient (jumprelu)")
            if not self.target_l0 > 0:
                raise SAEError(f"SAETrainingConfig.target_l0 must be positive, got {self.target_l0}")
        lo, hi = self.l1_adapt_window
        if not 0 <= lo < hi <= 1:
            raise SAEError(f"l1_adapt_window must be two fractions 0 <= start < end <= 1, got {self.l1_adapt_window}")
        if not self.l1_adapt_rate > 0:
            raise SAEError(f"SAETrainingConfig.l1_adapt_rate must be positive, got {self.l1_adapt_rate}")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise SAEError(f"lr_decay_fraction must be in [0, 1], got {self.lr_decay_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_implementation(implementation: str) -> None:
    """SAEError unless ``implementation`` is one of :data:`IMPLEMENTATIONS`."""
    if implementation not in IMPLEMENTATIONS:
        raise SAEError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda if available, else cpu; otherwise ``torch.device(name)`` (SAEError if unknown)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise SAEError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N") from e
