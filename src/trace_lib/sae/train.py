"""Training SAEs on stored activations: deterministic, checkpointed, resumable.

``train_sae(activations, cfg, hook_name)`` trains one SAE on float32 [N, d_in] activations given as one
tensor, a sequence of tensors, a one-shot iterable of tensors, or a callable returning a fresh iterable.

What happens, in order (defaults in :class:`SAETrainingConfig`):

1. **Input scaling** (``normalize_activations="expected_average_only_in"``, SAELens's name for Anthropic's
   April 2024 recipe): a scalar ``s = sqrt(d_in) / mean ||x||`` is estimated on the first ``init_tokens``
   rows (SAELens ``ActivationScaler``) and every batch is multiplied by it, so hyper-parameters (lr, L1/L0
   coefficients) transfer between models. At the end ``s`` is folded into the weights (``W_enc *= s``,
   ``W_dec /= s``, ``b_dec /= s``, as SAELens does), so the returned SAE works on raw activations.
2. **Initialisation**: decoder rows random unit vectors, encoder = decoder transpose (Gao et al. 2024,
   §2.4), ``b_enc = 0``, ``b_dec`` = geometric median of the sample (Towards Monosemanticity; SAELens
   ``b_dec_init_method="geometric_median"``).
3. **Loss**: ``||x - x̂||²`` summed over dimensions, averaged over the batch (SAELens convention), plus
   topk: ``auxk_coefficient * AuxK`` (Gao et al. 2024 App. A.2: the top ``k_aux`` *dead* latents
   reconstruct the main residual; ``k_aux = d_in // 2`` as SAELens and sparsify, loss scaled by
   ``min(n_dead / k_aux, 1)``); relu: ``l1_coefficient * sum_i z_i ||W_dec,i||`` (Anthropic April 2024
   update; SAELens ``scale_sparsity_penalty_by_decoder_norm``); jumprelu: ``l0_coefficient * L0`` with
   straight-through threshold gradients (Rajamanoharan et al. 2024; SAELens ``JumpReLUTrainingSAE``:
   ``log_threshold`` parameter, rectangle kernel of width ``jumprelu_bandwidth``).
4. **Optimiser**: Adam (lr 4e-4, betas 0.9/0.999), linear warm-up then constant then linear decay to 0 over
   the last ``lr_decay_fraction`` of steps, global grad-norm clip 1.0 (SAELens). With
   ``normalize_decoder`` the decoder-gradient component parallel to each decoder row is removed before the
   step and rows are renormalised to unit norm after it (sparsify / Gao et al.).
5. **Dead latents**: a latent that has not fired for ``dead_feature_window`` tokens is dead. TopK SAEs feed
   dead latents to AuxK; ReLU SAEs resample them every ``resample_every`` steps (Towards Monosemanticity:
   choose inputs with probability ∝ squared reconstruction loss, set the decoder row to the centred input
   direction, the encoder column to it times 0.2 × the mean alive encoder norm, ``b_enc = 0``, and reset
   Adam's moments for those weights; the inputs are taken from the current batch).

**Determinism**: batch order comes from a ``torch.Generator`` seeded from ``seed``; weights init and
resampling use their own seeded generators. The same inputs, config and seed give bit-identical weights on
the same device and torch build (checked on CPU; on CUDA cuBLAS may differ run to run unless
``torch.use_deterministic_algorithms(True)`` and ``CUBLAS_WORKSPACE_CONFIG`` are set).

**Speed** (``implementation="fast"``, the default): a TopK step is dense only in the encoder matmul; the
decoder, the weight gradients and AuxK work on the k selected latents per token through ``embedding_bag``
(see :meth:`_Trainer._topk_sparse_grads`), and Adam is fused. ``implementation="reference"`` keeps the
plain dense autograd code as test oracle and benchmark baseline (``benchmarks/sae_training.py``).

**Checkpoints**: with ``checkpoint_dir``, every ``checkpoint_every`` steps (and at the end or at
``max_steps``) the whole state -- weights, Adam moments, step, dead-latent counters, RNG state, scaling
factor -- is written atomically to ``checkpoint_dir/checkpoint.safetensors`` (safetensors + JSON metadata,
no pickle). Calling ``train_sae`` again with the same activations, config and ``checkpoint_dir`` resumes:
the data pipeline is replayed (cheap: no SAE maths) to the checkpoint's step and training continues, giving
the same final weights as an uninterrupted run. A finished checkpoint is returned without retraining.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from trace_lib.cache import atomic_write, stable_hash
from trace_lib.errors import SAEError
from trace_lib.progress import track
from trace_lib.sae.model import SAE, SUPPORTED_ARCHITECTURES, SUPPORTED_NORMALIZATIONS, SAEConfig
from trace_lib.sae.quality import Activations, validated_chunks

CHECKPOINT_FILE = "checkpoint.safetensors"
_CKPT_FORMAT = "trace-sae-checkpoint-1"
_DEFAULT_DEAD_WINDOW = 10_000_000  # tokens (Gao et al. 2024; sparsify's dead_feature_threshold)
IMPLEMENTATIONS = ("fast", "reference")


@dataclass
class SAETrainingConfig:
    """Hyper-parameters for :func:`train_sae` (see the module docstring for what each does and why)."""

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
    refit_decoder: bool = False  # after training, least-squares decoder for the fixed encoder (see module doc)
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


# ---------------------------------------------------------------------------------------------- JumpReLU STE
def _rectangle(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x)


class _JumpReLU(torch.autograd.Function):
    """``x * (x > threshold)`` with a straight-through gradient for the threshold (SAELens ``JumpReLU``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold).to(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        x_grad = (x > threshold).to(grad) * grad
        t_grad = (-(threshold / bw) * _rectangle((x - threshold) / bw) * grad).sum(dim=0)
        return x_grad, t_grad, None


class _Step(torch.autograd.Function):
    """Heaviside ``x > threshold`` with a straight-through threshold gradient (SAELens ``Step``), for L0."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        t_grad = (-(1.0 / bw) * _rectangle((x - threshold) / bw) * grad).sum(dim=0)
        return None, t_grad, None


# ---------------------------------------------------------------------------------------------- data
class _Data:
    """The activations, the first rows (for initialisation) and a replayable, seeded batch iterator."""

    def __init__(self, activations: Activations, cfg: SAETrainingConfig):
        self.cfg = cfg
        self.tensor: torch.Tensor | None = None
        self.n_rows: int | None = None
        self._factory: Callable[[], Iterable[torch.Tensor]] | None = None
        self._cache: list[torch.Tensor] | None = None
        self._first_iter: Iterator[torch.Tensor] | None = None
        if isinstance(activations, torch.Tensor):
            if activations.ndim < 2:
                raise SAEError(f"activations have shape {list(activations.shape)}: expected [N, d_in]")
            for _ in validated_chunks(activations):  # NaN/Inf/shape checks, chunk by chunk
                pass
            flat = activations.reshape(-1, activations.shape[-1]).to(torch.float32)
            if flat.shape[0] == 0:
                raise SAEError("no activations to train on: the tensor has 0 rows")
            self.tensor = flat
            self.n_rows = flat.shape[0]
            self.d_in = flat.shape[1]
            self.sample_source = flat
            self.fingerprint = _fingerprint(flat[:8], f"tensor:{flat.shape[0]}")
            return
        if callable(activations):
            self._factory = activations
            first: Iterable[torch.Tensor] = activations()
        elif isinstance(activations, Sequence):
            seq = list(activations)
            self._factory = lambda: seq
            first = seq
            try:
                self.n_rows = sum(int(math.prod(c.shape[:-1])) for c in seq)
            except (AttributeError, TypeError):
                self.n_rows = None  # validated_chunks will name the bad chunk
        else:
            first = activations
        it = validated_chunks(first)
        peeked: list[torch.Tensor] = []
        rows = 0
        for chunk in it:
            peeked.append(chunk)
            rows += chunk.shape[0]
            if rows >= cfg.init_tokens:
                break
        if rows == 0:
            raise SAEError("no activations to train on: the stream yielded no rows")
        self.d_in = peeked[0].shape[1]
        self.sample_source = torch.cat(peeked)[: cfg.init_tokens]
        kind = "callable" if callable(activations) else "sequence" if self.n_rows is not None else "iterable"
        self.fingerprint = _fingerprint(peeked[0][:8], f"{kind}:{self.n_rows}")
        self._first_iter = chain(peeked, _checked(it, self.d_in))
        if self._factory is None and (cfg.epochs > 1 or cfg.refit_decoder):
            self._cache = []  # one-shot iterable read several times: keep it in memory

    def replayable(self) -> bool:
        return self.tensor is not None or self._factory is not None

    def _epoch_chunks(self, epoch: int) -> Iterator[torch.Tensor]:
        if epoch == 0 and self._first_iter is not None:
            it, self._first_iter = self._first_iter, None
            for chunk in it:
                if self._cache is not None:
                    self._cache.append(chunk)
                yield chunk
        elif self._factory is not None:
            yield from validated_chunks(self._factory(), self.d_in)
        elif self._cache is not None:
            yield from self._cache

    def batches(self, n_epochs: int | None, skip: int = 0) -> Iterator[torch.Tensor]:
        """CPU batches of ``batch_size`` rows (the last may be shorter); ``n_epochs=None``: cycle forever.

        The first ``skip`` batches are drawn (same RNG use, same order) but not materialised, for resuming;
        SAEError if the data end before them.
        """
        bs = self.cfg.batch_size
        gen = torch.Generator().manual_seed(self.cfg.seed + 1_000_003)
        epochs: Iterable[int] = range(n_epochs) if n_epochs is not None else _count()
        index = 0
        if self.tensor is not None:
            x = self.tensor
            for _ in epochs:
                perm = torch.randperm(x.shape[0], generator=gen)
                for i in range(0, x.shape[0], bs):
                    if index >= skip:
                        yield x[perm[i : i + bs]]
                    index += 1
        else:
            cap = max(self.cfg.shuffle_buffer_tokens, 2 * bs)
            pending: list[torch.Tensor] = []
            n_pending = 0
            for epoch in epochs:
                if epoch > 0 and self._factory is None and self._cache is None:
                    break  # one-shot iterable: a single pass
                got = False
                for chunk in self._epoch_chunks(epoch):
                    got = True
                    pending.append(chunk)
                    n_pending += chunk.shape[0]
                    if n_pending >= cap:
                        buf = torch.cat(pending)
                        buf = buf[torch.randperm(buf.shape[0], generator=gen)]
                        n_out = (buf.shape[0] // 2) // bs * bs
                        for i in range(0, n_out, bs):
                            if index >= skip:
                                yield buf[i : i + bs]
                            index += 1
                        pending, n_pending = [buf[n_out:]], buf.shape[0] - n_out
                if not got:
                    break
            if n_pending:
                buf = torch.cat(pending)
                buf = buf[torch.randperm(buf.shape[0], generator=gen)]
                for i in range(0, buf.shape[0], bs):
                    if index >= skip:
                        yield buf[i : i + bs]
                    index += 1
        if index < skip:
            raise SAEError(
                f"the activations hold only {index} batches but the checkpoint is at step {skip}: "
                "resume with the same activations and config"
            )


def _count() -> Iterator[int]:
    i = 0
    while True:
        yield i
        i += 1


def _checked(it: Iterator[torch.Tensor], d_in: int) -> Iterator[torch.Tensor]:
    for chunk in it:
        if chunk.shape[1] != d_in:
            raise SAEError(
                f"an activation chunk has width {chunk.shape[1]} but earlier chunks have {d_in}: all chunks must "
                "come from the same hook of the same model"
            )
        yield chunk


def _fingerprint(rows: torch.Tensor, kind: str) -> str:
    h = hashlib.sha256(kind.encode())
    h.update(rows.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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


def _group_by_latent(latents: torch.Tensor, n_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, offsets)`` grouping sparse-code entries by latent for ``embedding_bag``: ``order`` sorts the
    entries by latent (stable, so the summation order is deterministic) and ``offsets[i]`` is where latent i's
    run starts. ``embedding_bag(rows[order], source, offsets, per_sample_weights=coef[order])`` is then
    ``Gᵀ @ source`` for the sparse G with entries ``G[rows[e], latents[e]] = coef[e]``: the weight gradient
    of a sparse layer in one pass over the entries, with no dense ``[batch, d_sae]`` matrix."""
    order = latents.argsort(stable=True)
    counts = torch.bincount(latents, minlength=n_latents)
    return order, counts.cumsum(0) - counts


def _topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _adam(params: list[nn.Parameter], cfg: SAETrainingConfig, fast: bool) -> torch.optim.Adam:
    """Adam with the config's lr and betas; ``fast``: the fused kernel (one pass per tensor, CPU and CUDA),
    else foreach, else torch's default (single-tensor on CPU), which is what the reference path uses."""
    kw: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.adam_beta1, cfg.adam_beta2)}
    if fast:
        for impl in ("fused", "foreach"):
            try:
                return torch.optim.Adam(params, **kw, **{impl: True})
            except (RuntimeError, ValueError):
                continue
    return torch.optim.Adam(params, **kw)


# ---------------------------------------------------------------------------------------------- trainer
class _Trainer:
    def __init__(self, cfg: SAETrainingConfig, d_in: int, device: torch.device, total_steps: int | None,
                 implementation: str = "fast"):
        if implementation not in IMPLEMENTATIONS:
            raise SAEError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}")
        self.cfg = cfg
        self.fast = implementation == "fast"
        self.d_in = d_in
        self.device = device
        self.total_steps = total_steps
        d_sae = cfg.d_sae or cfg.expansion_factor * d_in
        if cfg.architecture == "topk" and cfg.k > d_sae:
            raise SAEError(f"k={cfg.k} is larger than d_sae={d_sae}: lower k or raise d_sae")
        self.d_sae = d_sae
        arch = cfg.architecture
        self.sae = SAE(
            SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=cfg.k if arch == "topk" else None,
                      apply_b_dec_to_input=cfg.apply_b_dec_to_input),
            device=device,
        )
        self.log_threshold: nn.Parameter | None = None
        if arch == "jumprelu":
            self.log_threshold = nn.Parameter(
                torch.full((d_sae,), math.log(cfg.jumprelu_init_threshold), device=device)
            )
        self.params: dict[str, nn.Parameter] = {
            "W_enc": self.sae.W_enc, "b_enc": self.sae.b_enc, "W_dec": self.sae.W_dec, "b_dec": self.sae.b_dec,
        }
        if self.log_threshold is not None:
            self.params["log_threshold"] = self.log_threshold
        self.opt = _adam(list(self.params.values()), cfg, self.fast)
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.gen = torch.Generator().manual_seed(cfg.seed + 2_000_003)
        self.scale = 1.0
        self.l1_log_scale = 0.0  # target_l0: log of the factor the controller applies to l1_coefficient
        self.refit: dict[str, float] = {}  # refit_decoder's in-sample MSE before and after
        self.step = 0
        self.tokens = 0
        self.last: dict[str, float] = {}
        self._last_x: torch.Tensor | None = None

        est_tokens = total_steps * cfg.batch_size if total_steps else None
        self.dead_window = cfg.dead_feature_window or (
            min(_DEFAULT_DEAD_WINDOW, max(cfg.batch_size, est_tokens // 10)) if est_tokens else _DEFAULT_DEAD_WINDOW
        )
        self.auxk_k = cfg.auxk_k or max(1, d_in // 2)
        if cfg.lr_warmup_steps is not None:
            self.warmup = cfg.lr_warmup_steps
        else:
            self.warmup = min(1000, max(1, total_steps // 20)) if total_steps else 1000
        if cfg.sparsity_warmup_steps is not None:
            self.sparsity_warmup = cfg.sparsity_warmup_steps
        else:
            self.sparsity_warmup = total_steps // 20 if total_steps else 0
        self.decay_steps = int(total_steps * cfg.lr_decay_fraction) if total_steps else 0
        if cfg.resample_every is not None:
            self.resample_every = cfg.resample_every
        else:
            self.resample_every = max(1, total_steps // 5) if total_steps else 25_000

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def initialise(self, sample: torch.Tensor, init_from: SAE | None = None) -> None:
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed)
        if cfg.normalize_activations == "expected_average_only_in":
            mean_norm = sample.double().norm(dim=1).mean().item()
            self.scale = math.sqrt(self.d_in) / mean_norm if mean_norm > 0 else 1.0
        if init_from is not None:
            self._warm_start(init_from)
            return
        x = sample * self.scale
        w_dec = torch.randn(self.d_sae, self.d_in, generator=g)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.sae.W_dec.copy_(w_dec)
        self.sae.W_enc.copy_(w_dec.T)
        self.sae.b_enc.zero_()
        if cfg.b_dec_init == "geometric_median":
            self.sae.b_dec.copy_(geometric_median(x))
        elif cfg.b_dec_init == "mean":
            self.sae.b_dec.copy_(x.mean(dim=0))
        else:
            self.sae.b_dec.zero_()

    @torch.no_grad()
    def _warm_start(self, init: SAE) -> None:
        """Start from ``init`` (raw units), re-expressed in the scaled units training works in."""
        cfg = self.cfg
        c = init.cfg
        want = (cfg.architecture, self.d_in, self.d_sae, cfg.k if cfg.architecture == "topk" else None)
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
        s = self.scale
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
            getattr(self.sae, name).copy_(t)
        if thr is not None and self.log_threshold is not None:
            self.log_threshold.copy_(torch.log(thr.clamp_min(1e-6)))

    # ------------------------------------------------------------------ schedules
    def lr_at(self, step: int) -> float:
        lr = self.cfg.lr
        if step < self.warmup:
            return lr * (step + 1) / self.warmup
        if self.total_steps and self.decay_steps and step >= self.total_steps - self.decay_steps:
            return lr * max(0.0, (self.total_steps - step) / self.decay_steps)
        return lr

    def sparsity_coef(self, step: int, value: float) -> float:
        if self.sparsity_warmup and step < self.sparsity_warmup:
            return value * (step + 1) / self.sparsity_warmup
        return value

    def l1_coef(self) -> float:
        """This step's L1 coefficient: the warmed-up ``l1_coefficient`` times the controller's factor."""
        return self.sparsity_coef(self.step, self.cfg.l1_coefficient) * math.exp(self.l1_log_scale)

    @property
    def final_l1_coefficient(self) -> float:
        """The L1 coefficient after the warm-up, with the controller's factor (``l1_coefficient`` without one)."""
        return self.cfg.l1_coefficient * math.exp(self.l1_log_scale)

    def adapt_l1(self, l0_mean: float) -> None:
        """``target_l0``: one dual-ascent step on the L1 coefficient, read as the Lagrange multiplier of the
        constraint ``mean L0 = target`` (``log c += rate * log(L0 / target)``; in log space so it stays positive
        and moves by the same factor for L0 twice or half the target). L0 follows the coefficient only after
        tens of steps (the encoder biases must move), and after the L1 warm-up it keeps falling for a while at
        a fixed coefficient, so the update runs only inside ``l1_adapt_window``: by default from 45% of
        training (on SmolLM2's residual stream L0 has settled by then; started at 20-25% the controller
        mistook the transient for excess and ended 10-15% under the target) to 85% (the learning rate decays
        after 80%, when the weights could no longer follow). With no known length (a one-shot stream) it runs
        from step ``max(warm-up, 1000)``. The factor is clamped to ``e^±10``."""
        cfg = self.cfg
        if cfg.target_l0 is None or not l0_mean > 0:
            return
        if self.total_steps:
            lo, hi = cfg.l1_adapt_window
            if not lo * self.total_steps <= self.step < hi * self.total_steps:
                return
        elif self.step < max(self.sparsity_warmup, 1000):
            return
        self.l1_log_scale += cfg.l1_adapt_rate * math.log(l0_mean / cfg.target_l0)
        self.l1_log_scale = min(max(self.l1_log_scale, -10.0), 10.0)

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimiser step; returns the (detached) losses. The fast path leaves ``explained_variance`` to
        :meth:`read` (an extra pass over the batch, skipped on the steps whose losses nobody reads)."""
        cfg = self.cfg
        sae = self.sae
        x = batch.to(self.device, non_blocking=True) * self.scale
        if self.fast and cfg.architecture == "topk":
            losses, fired = self._topk_sparse_grads(x)
        elif self.fast and cfg.architecture == "relu":
            losses, fired = self._relu_sparse_grads(x)
        else:
            losses, fired = self._dense_grads(x)
        if cfg.normalize_decoder and sae.W_dec.grad is not None:
            with torch.no_grad():
                w = sae.W_dec
                if self.fast:  # one fused pass for the row dot products, one in-place update
                    parallel = torch.linalg.vecdot(w.grad, w).unsqueeze(1)
                    w.grad.sub_(parallel * w)
                else:
                    parallel = (w.grad * w).sum(dim=1, keepdim=True)
                    w.grad -= parallel * w
        if cfg.grad_clip_norm:
            nn.utils.clip_grad_norm_(list(self.params.values()), cfg.grad_clip_norm)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.opt.step()
        with torch.no_grad():
            if cfg.normalize_decoder:
                sae.normalize_decoder()
            n = x.shape[0]
            self.tokens_since_fired += n
            self.tokens_since_fired.masked_fill_(fired, 0)
        if cfg.target_l0 is not None:
            self.adapt_l1(float(losses["l0_mean"].item()))
        self.step += 1
        self.tokens += x.shape[0]
        if cfg.architecture == "relu" and cfg.resample_dead and self.step % self.resample_every == 0:
            if not self.total_steps or self.step <= 0.8 * self.total_steps:
                self.resample(x)
        self._last_x = x
        if not self.fast:
            losses["explained_variance"] = self._explained_variance(x, losses["mse"])
        return losses

    @staticmethod
    @torch.no_grad()
    def _explained_variance(x: torch.Tensor, mse: torch.Tensor) -> torch.Tensor:
        var = (x - x.mean(dim=0)).pow(2).sum(dim=-1).mean()
        return 1 - mse / var.clamp_min(1e-12)

    def read(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """The losses of the latest :meth:`train_step` as floats, with ``explained_variance`` of its batch."""
        if "explained_variance" not in losses and self._last_x is not None:
            losses = {**losses, "explained_variance": self._explained_variance(self._last_x, losses["mse"])}
        return {k: float(v.item()) for k, v in losses.items()}

    def _dense_grads(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Losses by plain autograd on dense codes ``[batch, d_sae]``; leaves the gradients in ``.grad``.

        Every architecture can take this path; it is the reference the sparse TopK path is tested against.
        Returns the (detached) losses and which latents fired in the batch.
        """
        cfg = self.cfg
        sae = self.sae
        sae_in = x - sae.b_dec if cfg.apply_b_dec_to_input else x
        pre = sae_in @ sae.W_enc + sae.b_enc
        arch = cfg.architecture
        losses: dict[str, torch.Tensor] = {}
        if arch == "jumprelu":
            assert self.log_threshold is not None
            threshold = torch.exp(self.log_threshold)
            z = _JumpReLU.apply(pre, threshold, cfg.jumprelu_bandwidth)
        else:
            z = sae.activation(pre)
        x_hat = z @ sae.W_dec + sae.b_dec
        err = x - x_hat
        mse = err.pow(2).sum(dim=-1).mean()
        losses["mse"] = mse
        loss = mse
        fired = (z > 0).any(dim=0)
        dead = self.tokens_since_fired >= self.dead_window
        if arch == "topk":
            n_dead = int(dead.sum().item())
            if cfg.auxk_coefficient > 0 and n_dead > 0:
                k_aux = min(self.auxk_k, n_dead)
                aux_scale = min(n_dead / self.auxk_k, 1.0)
                aux_pre = torch.where(dead[None, :], pre, torch.full_like(pre, -math.inf))
                top = aux_pre.topk(k_aux, dim=-1, sorted=False)
                aux_z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
                e_hat = aux_z @ sae.W_dec
                auxk = aux_scale * (e_hat - err.detach()).pow(2).sum(dim=-1).mean()
                losses["auxk"] = auxk
                loss = loss + cfg.auxk_coefficient * auxk
            else:
                losses["auxk"] = mse.new_zeros(())
        elif arch == "relu":
            l1 = (z * sae.W_dec.norm(dim=1)).sum(dim=-1).mean()
            losses["l1"] = l1
            loss = loss + self.l1_coef() * l1
        else:
            l0 = _Step.apply(pre, threshold, cfg.jumprelu_bandwidth).sum(dim=-1).mean()
            losses["l0"] = l0
            loss = loss + self.sparsity_coef(self.step, cfg.l0_coefficient) * l0
        losses["loss"] = loss

        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            losses["l0_mean"] = (z != 0).sum(dim=-1).float().mean()
        return {k: v.detach() for k, v in losses.items()}, fired

    @torch.no_grad()
    def _encoder_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sae_in, pre)`` of a batch without autograd: the encoder's input and its dense pre-activations."""
        sae = self.sae
        sae_in = x - sae.b_dec.detach() if self.cfg.apply_b_dec_to_input else x
        pre = sae_in @ sae.W_enc.detach()
        pre += sae.b_enc.detach()
        return sae_in, pre

    @torch.no_grad()
    def _set_encoder_grads(self, tokens: torch.Tensor, grad_pre: torch.Tensor, offsets: torch.Tensor,
                           sae_in: torch.Tensor, grad_x_hat: torch.Tensor) -> None:
        """``W_enc``'s, ``b_enc``'s and ``b_dec``'s gradients from sparse entries grouped by latent: entry e
        (token ``tokens[e]``, pre-activation gradient ``grad_pre[e]``) adds ``grad_pre[e] * sae_in[tokens[e]]``
        to its latent's encoder column and ``grad_pre[e]`` to its bias; ``b_dec``'s is ``sum(dL/dx_hat)``, less
        ``W_enc @ dL/db_enc`` when ``b_dec`` is subtracted from the input."""
        sae = self.sae
        sae.W_enc.grad = F.embedding_bag(tokens, sae_in, offsets, per_sample_weights=grad_pre,
                                         mode="sum").t().contiguous()
        entries = torch.arange(grad_pre.numel(), device=grad_pre.device)
        grad_b_enc = F.embedding_bag(entries, grad_pre.unsqueeze(1), offsets, mode="sum").squeeze(1)
        sae.b_enc.grad = grad_b_enc
        grad_b_dec = grad_x_hat.sum(dim=0)
        if self.cfg.apply_b_dec_to_input:
            grad_b_dec -= sae.W_enc.detach() @ grad_b_enc
        sae.b_dec.grad = grad_b_dec

    @torch.no_grad()
    def _topk_sparse_grads(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`_dense_grads` for TopK without dense ``[batch, d_sae]`` maths after the encoder matmul.

        Same losses and gradients up to float rounding (Gao et al. 2024 §5.3 and sparsify decode sparsely too):

        * forward: ``pre = sae_in @ W_enc + b_enc`` stays dense (every latent must be ranked); the k largest
          per row are selected (:func:`_topk`) and decoded as ``x_hat = sum_j relu(v_j) W_dec[i_j] + b_dec``
          with ``embedding_bag`` (B*k row reads instead of a B x d_sae x d_in matmul). AuxK ranks only the
          dead columns and decodes them the same way.
        * backward, by hand: each selected value's gradient is a row dot product (``embedding_bag``'s
          per-sample-weight gradient, ReLU's mask included); ``W_dec``'s and ``W_encᵀ``'s gradients are sums
          of B*k scaled rows grouped by latent (:func:`_group_by_latent`); ``b_enc``'s is the per-latent sum of
          the selected gradients and ``b_dec``'s follows as ``sum(dL/dx_hat) - W_enc @ dL/db_enc``.

        Entries are always summed in the same order, so results are deterministic.
        """
        cfg = self.cfg
        sae = self.sae
        n = x.shape[0]
        sae_in, pre = self._encoder_pre(x)
        w_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
        top_v, top_i = _topk(pre, int(cfg.k))
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

        dead = self.tokens_since_fired >= self.dead_window
        n_dead = int(dead.sum().item())
        if cfg.auxk_coefficient > 0 and n_dead > 0:
            k_aux = min(self.auxk_k, n_dead)
            aux_scale = min(n_dead / self.auxk_k, 1.0)
            dead_idx = dead.nonzero().squeeze(1)
            dead_pre = pre.index_select(1, dead_idx)
            if k_aux < n_dead:
                aux_v, local = _topk(dead_pre, k_aux)
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
        order, offsets = _group_by_latent(latents, self.d_sae)
        tokens = torch.cat([torch.arange(n, device=x.device).repeat_interleave(i.shape[1]) for i in latent_ids])
        dec_rows = tokens.clone()  # W_dec: main entries scale rows of dL/dx_hat, aux entries rows of dL/de_hat
        dec_rows[top_i.numel():] += n
        coef = torch.cat([c.detach().reshape(-1) for c in coefs])
        sae.W_dec.grad = F.embedding_bag(dec_rows[order], torch.cat(grad_outputs), offsets,
                                         per_sample_weights=coef[order], mode="sum")
        self._set_encoder_grads(tokens[order], grad_pre[order], offsets, sae_in, grad_outputs[0])

        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
        positive = top_v.detach() > 0
        fired[top_i[positive]] = True
        losses["l0_mean"] = positive.sum(dim=-1).float().mean()
        return losses, fired

    @torch.no_grad()
    def _relu_sparse_grads(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`_dense_grads` for ReLU with the L1 penalty, decoding and differentiating only the latents
        that fired (``pre > 0``); same losses and gradients up to float rounding.

        The entries are the ``(row, latent)`` pairs with a positive pre-activation, ``E = B * L0`` of them
        (variable per row, so ``embedding_bag`` takes row offsets). Forward: the encoder matmul is dense,
        ``x_hat = sum_e z_e W_dec[l_e] + b_dec``. Backward: ``dL/dz_e = dL/dx_hat[row_e] . W_dec[l_e] +
        c ||W_dec[l_e]|| / B`` (MSE plus ``c * L1``, ``c`` the warmed-up coefficient), which is also
        ``dL/dpre_e`` since ReLU passes it; ``W_dec``'s gradient is the entries' ``z_e dL/dx_hat[row_e]``
        grouped by latent plus the L1 term ``c / B * sum_e z_e * W_dec[l] / ||W_dec[l]||``, ``W_encᵀ``'s the
        entries' ``dL/dpre_e * sae_in[row_e]``; the biases as in :meth:`_topk_sparse_grads`. Once L0 is
        small (after the L1 warm-up) this is about a third of the dense step's arithmetic; while more than
        an eighth of the latents fire (the first steps), the dense step is faster and is taken instead
        (measured on SmolLM2's residual, d_sae 2304: 65 vs 175 ms at L0 65, 218 vs 236 ms at L0 493).
        """
        sae = self.sae
        n = x.shape[0]
        sae_in, pre = self._encoder_pre(x)
        w_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
        rows, lat = (pre > 0).nonzero(as_tuple=True)  # row-major: entries sorted by row
        if rows.numel() > n * self.d_sae // 8:  # early in training: dense maths is faster
            with torch.enable_grad():
                return self._dense_grads(x)
        per_row = torch.bincount(rows, minlength=n)
        row_offsets = per_row.cumsum(0) - per_row
        with torch.enable_grad():
            vals = pre[rows, lat].requires_grad_()
            recon = F.embedding_bag(lat, w_dec, row_offsets, per_sample_weights=vals, mode="sum")
        err = x - (recon.detach() + b_dec)
        mse = err.pow(2).sum(dim=-1).mean()
        dec_norm = w_dec.norm(dim=1)
        l1 = (vals.detach() * dec_norm[lat]).sum() / n
        c = self.l1_coef()
        grad_out = err * (-2.0 / n)
        (grad_vals,) = torch.autograd.grad(recon, vals, grad_out)
        grad_pre = grad_vals + dec_norm[lat] * (c / n)

        order, offsets = _group_by_latent(lat, self.d_sae)
        v = vals.detach()
        grad_w_dec = F.embedding_bag(rows[order], grad_out, offsets, per_sample_weights=v[order], mode="sum")
        entries = torch.arange(lat.numel(), device=x.device)
        sum_z = F.embedding_bag(entries, v[order].unsqueeze(1), offsets, mode="sum").squeeze(1)
        grad_w_dec += (sum_z * (c / n) / dec_norm.clamp_min(1e-12)).unsqueeze(1) * w_dec
        sae.W_dec.grad = grad_w_dec
        self._set_encoder_grads(rows[order], grad_pre[order], offsets, sae_in, grad_out)

        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
        fired[lat] = True
        losses = {"mse": mse, "l1": l1, "loss": mse + c * l1, "l0_mean": per_row.float().mean()}
        return losses, fired

    @torch.no_grad()
    def resample(self, x: torch.Tensor) -> int:
        """Towards Monosemanticity resampling of dead latents from inputs of the current batch."""
        sae = self.sae
        dead = self.tokens_since_fired >= self.dead_window
        idx = dead.nonzero().squeeze(1)
        if idx.numel() == 0:
            return 0
        x_hat = sae.activation((x - sae.b_dec if self.cfg.apply_b_dec_to_input else x) @ sae.W_enc + sae.b_enc)
        x_hat = x_hat @ sae.W_dec + sae.b_dec
        per_input = (x - x_hat).pow(2).sum(dim=-1).double().cpu()
        probs = per_input.pow(2)
        if not bool(probs.sum() > 0):
            return 0
        chosen = torch.multinomial(probs, idx.numel(), replacement=True, generator=self.gen).to(x.device)
        v = x[chosen] - sae.b_dec
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive = ~dead
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean().item() if bool(alive.any()) else 1.0
        sae.W_dec[idx] = v
        sae.W_enc[:, idx] = v.T * (0.2 * enc_norm)
        sae.b_enc[idx] = 0.0
        for name, p in self.params.items():
            state = self.opt.state.get(p)
            if not state:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                if name == "W_enc":
                    state[key][:, idx] = 0.0
                elif name in ("W_dec", "b_enc"):
                    state[key][idx] = 0.0
        self.tokens_since_fired[idx] = 0
        return idx.numel()

    # ------------------------------------------------------------------ decoder refit
    @torch.no_grad()
    def refit_decoder(self, batches: Iterable[torch.Tensor], ridge: float = 1e-3) -> dict[str, float]:
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
        """
        sae = self.sae
        m, d, dev = self.d_sae, self.d_in, self.device
        ftf = torch.zeros(m, m, dtype=torch.float64, device=dev)
        ftx = torch.zeros(m, d, dtype=torch.float64, device=dev)
        sum_f = torch.zeros(m, dtype=torch.float64, device=dev)
        sum_x = torch.zeros(d, dtype=torch.float64, device=dev)
        sq_x = 0.0
        mse_before = 0.0
        n = 0
        for batch in batches:
            x = batch.to(dev) * self.scale
            z = sae.encode(x)
            rows, lat = z.nonzero(as_tuple=True)
            vals = z[rows, lat]
            per_row = torch.bincount(rows, minlength=x.shape[0])
            recon = F.embedding_bag(lat, sae.W_dec, per_row.cumsum(0) - per_row, per_sample_weights=vals,
                                    mode="sum") + sae.b_dec
            mse_before += (x - recon).double().pow(2).sum().item()
            # FᵀF and FᵀX of the batch: each latent's entries scale rows of z and of x (float32 per batch)
            order, offsets = _group_by_latent(lat, m)
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
        if self.cfg.apply_b_dec_to_input:  # keep pre = (x - b_dec) W_enc + b_enc exactly
            b_enc = b_enc + (b_new - b_old) @ w_enc
        sae.b_enc.copy_(b_enc.to(sae.b_enc.dtype))
        sae.b_dec.copy_(b_new.to(sae.b_dec.dtype))
        sae.W_dec[idx] = (d_new / c.unsqueeze(1)).to(sae.W_dec.dtype)
        sae.W_enc[:, idx] = (w_enc[:, idx] * c).to(sae.W_enc.dtype)
        sae.b_enc[idx] = (b_enc[idx] * c).to(sae.b_enc.dtype)
        return {"refit_mse_before": mse_before / n, "refit_mse_after": max(sse, 0.0) / n}

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def export(self, hook_name: str, model_name: str | None, extra: dict[str, Any]) -> SAE:
        cfg = self.cfg
        c = self.sae.cfg
        out_cfg = SAEConfig(
            d_in=c.d_in, d_sae=c.d_sae, architecture=c.architecture, k=c.k, hook_name=hook_name,
            normalize_activations="expected_average_only_in" if self.scale != 1.0 else "none",
            norm_scaling_factor=self.scale if self.scale != 1.0 else None,
            apply_b_dec_to_input=c.apply_b_dec_to_input, model_name=model_name,
            metadata={"trained_by": "trace", "training": cfg.to_dict(), "norm_scaling_factor": self.scale, **extra},
        )
        if cfg.architecture == "relu":
            out_cfg.metadata["final_l1_coefficient"] = self.final_l1_coefficient
        if self.refit:
            out_cfg.metadata["decoder_refit"] = dict(self.refit)
        sae = SAE(out_cfg)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(getattr(self.sae, name).detach().cpu())
        if self.log_threshold is not None:
            sae.threshold.copy_(torch.exp(self.log_threshold.detach()).cpu())  # type: ignore[union-attr]
        if cfg.fold_scaling:
            sae.fold_scaling_factor()
        return sae

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Path, meta: dict[str, str]) -> None:
        tensors: dict[str, torch.Tensor] = {f"param.{k}": v.detach().cpu().contiguous() for k, v in self.params.items()}
        sd = self.opt.state_dict()
        for idx, st in sd["state"].items():
            for key, t in st.items():
                tensors[f"opt.{idx}.{key}"] = (t if isinstance(t, torch.Tensor) else torch.tensor(t)).cpu().contiguous()
        tensors["tokens_since_fired"] = self.tokens_since_fired.cpu().contiguous()
        tensors["rng"] = self.gen.get_state().contiguous()
        metadata = {
            **meta,
            "format": _CKPT_FORMAT,
            "step": str(self.step),
            "tokens": str(self.tokens),
            "scale": json.dumps(self.scale),
            "l1_log_scale": json.dumps(self.l1_log_scale),
            "refit": json.dumps(self.refit),
            "param_groups": json.dumps(sd["param_groups"]),
            "last": json.dumps(self.last),
        }
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))

    def load(self, path: Path) -> dict[str, str]:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as e:
            raise SAEError(f"cannot read checkpoint {path} ({e}): delete it to start over") from e
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(tensors[f"param.{k}"].to(p.device))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            if key.startswith("opt."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = t
        groups = json.loads(metadata["param_groups"])
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
            for key in ("fused", "foreach"):  # keep this run's Adam kernel (a checkpoint may come from the other)
                if key in self.opt.defaults:
                    g[key] = self.opt.defaults[key]
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"].to(self.device))
        self.gen.set_state(tensors["rng"])
        self.step = int(metadata["step"])
        self.tokens = int(metadata["tokens"])
        self.scale = float(json.loads(metadata["scale"]))
        self.l1_log_scale = float(json.loads(metadata.get("l1_log_scale", "0.0")))
        self.refit = json.loads(metadata.get("refit", "{}"))
        self.last = json.loads(metadata.get("last", "{}"))
        return metadata


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise SAEError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N") from e


def train_sae(
    activations: Activations,
    cfg: SAETrainingConfig | None = None,
    hook_name: str = "",
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    *,
    model_name: str | None = None,
    max_steps: int | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    init_from: SAE | None = None,
    implementation: str = "fast",
) -> tuple[SAE, dict[str, Any]]:
    """Train an SAE on ``activations`` read at ``hook_name``; return ``(sae, log)``.

    ``activations``: one float tensor [N, d_in] (or [..., d_in]), a list/tuple of such tensors, a one-shot
    iterable of them (a generator; several epochs then keep it in memory), or a zero-argument callable
    returning a fresh iterable each time (replayed per epoch without holding everything in memory).

    ``checkpoint_dir``: where to checkpoint and resume from (see the module docstring). ``max_steps``: stop
    after that many steps in total (a checkpoint is written), e.g. to split training across calls; the
    learning-rate schedule still follows the full run. ``callback(step, losses)`` runs after every step.
    ``init_from``: start from this SAE instead of a fresh initialisation (fine-tuning, e.g. a reference
    model's SAE on a quantized variant's activations); its architecture, d_in, d_sae, k and
    apply_b_dec_to_input must match ``cfg``. JumpReLU thresholds are clamped to >= 1e-6 (log-parameterised).
    ``implementation``: ``"fast"`` (default: TopK losses and gradients computed sparsely, fused Adam) or
    ``"reference"`` (plain dense autograd and torch's default Adam, the pre-optimisation code kept as a test
    oracle and benchmark baseline). Both train the same objective; weights agree to float rounding, not bit
    for bit. It is not part of the config hash, so either can resume the other's checkpoint.

    The log holds ``steps``, ``tokens``, ``new_steps``, ``time_s``, ``tokens_per_s`` (this call),
    ``final_loss``, ``final_mse``, the architecture's auxiliary loss (``final_auxk``, ``final_l1`` or
    ``final_l0``), ``final_l0_mean`` and ``final_explained_variance`` (last batch, scaled units),
    ``dead_fraction`` (latents silent for ``dead_feature_window`` tokens), ``norm_scaling_factor``,
    ``resumed_from_step``, ``total_steps``, ``stopped_at_max_steps`` and ``data_exhausted``.

    Raises SAEError for an empty stream, NaN/Inf (naming the chunk), inconsistent widths, or a checkpoint
    made with another config, hook or data.
    """
    cfg = cfg or SAETrainingConfig()
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise SAEError(f"max_steps must be a positive integer, got {max_steps!r}")
    if implementation not in IMPLEMENTATIONS:
        raise SAEError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}")
    t0 = time.perf_counter()
    data = _Data(activations, cfg)
    device = _resolve_device(cfg.device)
    bs = cfg.batch_size
    if cfg.total_tokens is not None:
        total_steps: int | None = math.ceil(cfg.total_tokens / bs)
        n_epochs: int | None = None if data.replayable() else 1
    else:
        n_epochs = cfg.epochs
        if data.tensor is not None:
            total_steps = cfg.epochs * math.ceil(data.tensor.shape[0] / bs)
        elif data.n_rows is not None:
            total_steps = math.ceil(cfg.epochs * data.n_rows / bs)
        else:
            total_steps = None
    trainer = _Trainer(cfg, data.d_in, device, total_steps, implementation)

    cfg_key = {k: v for k, v in cfg.to_dict().items() if k not in ("checkpoint_every", "device")}
    meta = {
        "cfg_hash": stable_hash({"cfg": cfg_key, "d_in": data.d_in, "init_from": _sae_fingerprint(init_from)}),
        "hook_name": hook_name,
        "data_fingerprint": data.fingerprint,
        "total_steps": str(total_steps or ""),
    }
    ckpt: Path | None = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    resumed_from = 0
    done = False
    if ckpt is not None and ckpt.exists():
        prev = _peek_metadata(ckpt)
        for key, what in (("cfg_hash", "training config"), ("hook_name", "hook"), ("data_fingerprint", "activations")):
            if prev.get(key) != meta[key]:
                raise SAEError(
                    f"checkpoint {ckpt} was made with a different {what}: delete {ckpt.parent} to start over, "
                    "or pass another checkpoint_dir"
                )
        trainer.load(ckpt)
        resumed_from = trainer.step
        done = prev.get("done") == "1"
    else:
        trainer.initialise(data.sample_source, init_from)
    tokens_before = trainer.tokens

    extra_meta = {"hook_name": hook_name}
    if done:
        sae = trainer.export(hook_name, model_name, {**extra_meta, "tokens": trainer.tokens, "steps": trainer.step})
        return sae, _log(trainer, t0, resumed_from, total_steps, False, False, 0)

    batches = data.batches(n_epochs, skip=trainer.step)  # replays the pipeline up to a checkpoint
    remaining = (total_steps - trainer.step) if total_steps is not None else None
    if max_steps is not None:
        limit = max_steps - trainer.step
        remaining = limit if remaining is None else min(remaining, limit)
    exhausted = False
    ran_out = False
    new_steps = 0
    iterator: Iterable[torch.Tensor] = batches
    if progress:
        iterator = track(batches, f"Training SAE {hook_name}".strip(), total=remaining)
    losses: dict[str, torch.Tensor] = {}
    if remaining is None or remaining > 0:
        for batch in iterator:
            losses = trainer.train_step(batch)
            new_steps += 1
            final = (total_steps is not None and trainer.step >= total_steps) or (
                max_steps is not None and trainer.step >= max_steps
            )
            if callback is not None or final or (ckpt is not None and trainer.step % cfg.checkpoint_every == 0):
                trainer.last = trainer.read(losses)
            if ckpt is not None and trainer.step % cfg.checkpoint_every == 0 and not final:
                trainer.save(ckpt, {**meta, "done": "0"})
            if callback is not None:
                callback(trainer.step, dict(trainer.last))
            if final:
                break
        else:
            ran_out = True
            exhausted = total_steps is not None and trainer.step < total_steps
    if losses:
        trainer.last = trainer.read(losses)
    stopped = (
        max_steps is not None
        and trainer.step >= max_steps
        and not ran_out
        and (total_steps is None or trainer.step < total_steps)
    )
    if cfg.refit_decoder and not stopped:
        trainer.refit = trainer.refit_decoder(data.batches(1))
    if ckpt is not None:
        trainer.save(ckpt, {**meta, "done": "0" if stopped else "1"})
    sae = trainer.export(hook_name, model_name, {**extra_meta, "tokens": trainer.tokens, "steps": trainer.step})
    return sae, _log(trainer, t0, resumed_from, total_steps, stopped, exhausted, new_steps,
                     trainer.tokens - tokens_before)


def _sae_fingerprint(sae: SAE | None) -> str | None:
    if sae is None:
        return None
    h = hashlib.sha256(json.dumps(sae.cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _peek_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise SAEError(f"cannot read checkpoint {path} ({e}): delete it to start over") from e
    if meta.get("format") != _CKPT_FORMAT:
        raise SAEError(f"{path} is not a trace SAE checkpoint: delete it or pass another checkpoint_dir")
    return meta


def _log(trainer: _Trainer, t0: float, resumed_from: int, total_steps: int | None, stopped: bool,
         exhausted: bool, new_steps: int, new_tokens: int = 0) -> dict[str, Any]:
    elapsed = time.perf_counter() - t0
    dead = (trainer.tokens_since_fired >= trainer.dead_window).double().mean().item()
    log: dict[str, Any] = {
        "steps": trainer.step,
        "tokens": trainer.tokens,
        "new_steps": new_steps,
        "time_s": elapsed,
        "tokens_per_s": new_tokens / elapsed if elapsed > 0 else float("nan"),
        "resumed_from_step": resumed_from,
        "total_steps": total_steps,
        "stopped_at_max_steps": stopped,
        "data_exhausted": exhausted,
        "dead_fraction": dead,
        "dead_feature_window": trainer.dead_window,
        "norm_scaling_factor": trainer.scale,
        "device": str(trainer.device),
        **trainer.refit,
    }
    if trainer.cfg.architecture == "relu":
        log["final_l1_coefficient"] = trainer.final_l1_coefficient
    for k, v in trainer.last.items():
        log[f"final_{k}"] = v
    return log
