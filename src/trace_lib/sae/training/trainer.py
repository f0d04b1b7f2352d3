"""The training loop: :class:`SAETrainer` holds the state of one run, :func:`train_sae` drives it.

One step (:meth:`SAETrainer.train_step`): scale the batch, let the engine (:data:`~.steps.ENGINES`) compute
losses and gradients, remove from each decoder row's gradient its component along the row (with
``normalize_decoder``; sparsify / Gao et al.), clip the global gradient norm to ``grad_clip_norm``, take an
Adam step at the scheduled learning rate, renormalise the decoder rows, update the dead-latent counters
(tokens since each latent last fired), the L1 controller and, when due, resample dead latents.

:func:`train_sae` checks a checkpoint against the run's key (config, width, starting SAE), the hook and the
data fingerprint, resumes or initialises, steps through the batches, checkpoints every ``checkpoint_every``
steps, refits the decoder if asked, and exports the SAE.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trace_lib.cache import stable_hash
from trace_lib.errors import SAEError
from trace_lib.progress import track
from trace_lib.sae.model import SAE, SAEConfig
from trace_lib.sae.quality import Activations
from trace_lib.sae.training.checkpoint import CHECKPOINT_FILE, load_checkpoint, peek_metadata, save_checkpoint
from trace_lib.sae.training.config import (
    DEFAULT_DEAD_WINDOW,
    SAETrainingConfig,
    check_implementation,
    resolve_device,
)
from trace_lib.sae.training.data import ActivationData
from trace_lib.sae.training.export import export_sae
from trace_lib.sae.training.init import init_fresh, input_scale, warm_start
from trace_lib.sae.training.refit import refit_decoder
from trace_lib.sae.training.resample import resample_dead_latents
from trace_lib.sae.training.schedule import L1Controller, Schedule
from trace_lib.sae.training.steps import ENGINES, StepResult, dense_step, relu_sparse_step, topk_sparse_step


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


@torch.no_grad()
def _explained_variance(x: torch.Tensor, mse: torch.Tensor) -> torch.Tensor:
    """``1 - mse / mean ||x - mean(x)||²`` of one batch."""
    var = (x - x.mean(dim=0)).pow(2).sum(dim=-1).mean()
    return 1 - mse / var.clamp_min(1e-12)


class SAETrainer:
    """The state of one training run: the SAE being trained (in scaled units), the JumpReLU log-thresholds,
    Adam, the dead-latent counters, the resampling RNG, the schedules and the step/token counts."""

    def __init__(self, cfg: SAETrainingConfig, d_in: int, device: torch.device, total_steps: int | None,
                 implementation: str = "fast") -> None:
        check_implementation(implementation)
        self.cfg = cfg
        self.fast = implementation == "fast"
        self.engine = ENGINES[(implementation, cfg.architecture)]
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
        self.schedule = Schedule(cfg, total_steps)
        self.l1 = L1Controller(cfg, self.schedule)
        self.refit: dict[str, float] = {}  # refit_decoder's in-sample MSE before and after
        self.step = 0
        self.tokens = 0
        self.last: dict[str, float] = {}
        self._last_x: torch.Tensor | None = None

        est_tokens = total_steps * cfg.batch_size if total_steps else None
        self.dead_window = cfg.dead_feature_window or (
            min(DEFAULT_DEAD_WINDOW, max(cfg.batch_size, est_tokens // 10)) if est_tokens else DEFAULT_DEAD_WINDOW
        )
        self.auxk_k = cfg.auxk_k or max(1, d_in // 2)

    @torch.no_grad()
    def initialise(self, sample: torch.Tensor, init_from: SAE | None = None) -> None:
        """Estimate the input scale on ``sample`` (raw rows), then fresh weights or ``init_from``'s."""
        self.scale = input_scale(sample, self.cfg)
        if init_from is not None:
            warm_start(self.sae, self.log_threshold, init_from, self.cfg, self.scale)
        else:
            init_fresh(self.sae, sample * self.scale, self.cfg)

    def train_step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimiser step; returns the (detached) losses. The fast path leaves ``explained_variance`` to
        :meth:`read` (an extra pass over the batch, skipped on the steps whose losses nobody reads)."""
        cfg = self.cfg
        sae = self.sae
        x = batch.to(self.device, non_blocking=True) * self.scale
        losses, fired = self.engine(self, x)
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
            group["lr"] = self.schedule.lr_at(self.step)
        self.opt.step()
        with torch.no_grad():
            if cfg.normalize_decoder:
                sae.normalize_decoder()
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired.masked_fill_(fired, 0)
        if cfg.target_l0 is not None:
            self.l1.update(self.step, float(losses["l0_mean"].item()))
        self.step += 1
        self.tokens += x.shape[0]
        if self.schedule.resample_due(self.step):
            dead = self.tokens_since_fired >= self.dead_window
            idx = resample_dead_latents(sae, x, dead, self.opt, self.params, self.gen, cfg.apply_b_dec_to_input)
            self.tokens_since_fired[idx] = 0
        self._last_x = x
        if not self.fast:
            losses["explained_variance"] = _explained_variance(x, losses["mse"])
        return losses

    def read(self, losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """The losses of the latest :meth:`train_step` as floats, with ``explained_variance`` of its batch."""
        if "explained_variance" not in losses and self._last_x is not None:
            losses = {**losses, "explained_variance": _explained_variance(self._last_x, losses["mse"])}
        return {k: float(v.item()) for k, v in losses.items()}

    # the engines by name, on this trainer's state (the tests compare them)
    def _dense_grads(self, x: torch.Tensor) -> StepResult:
        return dense_step(self, x)

    def _topk_sparse_grads(self, x: torch.Tensor) -> StepResult:
        return topk_sparse_step(self, x)

    def _relu_sparse_grads(self, x: torch.Tensor) -> StepResult:
        return relu_sparse_step(self, x)

    def refit_decoder(self, batches: Iterable[torch.Tensor], ridge: float = 1e-3) -> dict[str, float]:
        """:func:`~.refit.refit_decoder` on this run's SAE and input scale."""
        return refit_decoder(self.sae, batches, self.scale, ridge)


def training_key(cfg: SAETrainingConfig, d_in: int, init_from: SAE | None) -> str:
    """What a checkpoint must have been made with: the config (less ``checkpoint_every`` and ``device``), the
    input width and the starting SAE's :meth:`~trace_lib.sae.SAE.content_hash` (None for a fresh start)."""
    cfg_key = {k: v for k, v in cfg.to_dict().items() if k not in ("checkpoint_every", "device")}
    init = init_from.content_hash() if init_from is not None else None
    return stable_hash({"cfg": cfg_key, "d_in": d_in, "init_from": init})


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

    ``checkpoint_dir``: where to checkpoint and resume from (see :mod:`trace_lib.sae.training`). ``max_steps``: stop
    after that many steps in total (a checkpoint is written), e.g. to split training across calls; the
    learning-rate schedule still follows the full run. ``callback(step, losses)`` runs after every step.
    ``init_from``: start from this SAE instead of a fresh initialisation (fine-tuning, e.g. a reference
    model's SAE on a quantized variant's activations); its architecture, d_in, d_sae, k and
    apply_b_dec_to_input must match ``cfg``. JumpReLU thresholds are clamped to >= 1e-6 (log-parameterised).
    ``implementation``: ``"fast"`` (default: TopK and ReLU gradients computed sparsely, fused Adam) or
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
    check_implementation(implementation)
    t0 = time.perf_counter()
    data = ActivationData(activations, cfg)
    device = resolve_device(cfg.device)
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
    trainer = SAETrainer(cfg, data.d_in, device, total_steps, implementation)

    meta = {
        "cfg_hash": training_key(cfg, data.d_in, init_from),
        "hook_name": hook_name,
        "data_fingerprint": data.fingerprint,
        "total_steps": str(total_steps or ""),
    }
    ckpt: Path | None = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    resumed_from = 0
    done = False
    if ckpt is not None and ckpt.exists():
        prev = peek_metadata(ckpt)
        for key, what in (("cfg_hash", "training config"), ("hook_name", "hook"), ("data_fingerprint", "activations")):
            if prev.get(key) != meta[key]:
                raise SAEError(
                    f"checkpoint {ckpt} was made with a different {what}: delete {ckpt.parent} to start over, "
                    "or pass another checkpoint_dir"
                )
        load_checkpoint(trainer, ckpt)
        resumed_from = trainer.step
        done = prev.get("done") == "1"
    else:
        trainer.initialise(data.sample_source, init_from)
    tokens_before = trainer.tokens

    extra_meta = {"hook_name": hook_name}
    if done:
        sae = export_sae(trainer, hook_name, model_name, {**extra_meta, "tokens": trainer.tokens, "steps": trainer.step})
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
                save_checkpoint(trainer, ckpt, {**meta, "done": "0"})
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
        save_checkpoint(trainer, ckpt, {**meta, "done": "0" if stopped else "1"})
    sae = export_sae(trainer, hook_name, model_name, {**extra_meta, "tokens": trainer.tokens, "steps": trainer.step})
    return sae, _log(trainer, t0, resumed_from, total_steps, stopped, exhausted, new_steps,
                     trainer.tokens - tokens_before)


def _log(trainer: SAETrainer, t0: float, resumed_from: int, total_steps: int | None, stopped: bool,
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
        log["final_l1_coefficient"] = trainer.l1.final_coefficient
    for k, v in trainer.last.items():
        log[f"final_{k}"] = v
    return log
