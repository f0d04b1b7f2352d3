"""What changes with the step: the learning rate, the sparsity-coefficient warm-up, when to resample dead
latents, and the L1 coefficient's controller (``target_l0``).

* Learning rate (SAELens): linear warm-up ``lr * (t + 1) / W`` over ``W = lr_warmup_steps`` (default
  ``min(1000, 5%)`` of the steps), constant, then linear decay ``lr * (T - t) / D`` to 0 over the last
  ``D = lr_decay_fraction * T`` steps.
* Sparsity coefficients (L1, L0): ``c * (t + 1) / W_s`` over ``W_s = sparsity_warmup_steps`` (default 5%).
* Resampling (ReLU): every ``resample_every`` steps (default every 20% of training), never after 80%.
"""

from __future__ import annotations

import math

from trace_lib.sae.training.config import SAETrainingConfig


class Schedule:
    """The step-indexed schedules of one run of ``total_steps`` steps (None: length unknown, a stream)."""

    def __init__(self, cfg: SAETrainingConfig, total_steps: int | None) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
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

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based)."""
        lr = self.cfg.lr
        if step < self.warmup:
            return lr * (step + 1) / self.warmup
        if self.total_steps and self.decay_steps and step >= self.total_steps - self.decay_steps:
            return lr * max(0.0, (self.total_steps - step) / self.decay_steps)
        return lr

    def sparsity_coef(self, step: int, value: float) -> float:
        """``value`` (an L1 or L0 coefficient) after the warm-up of step ``step``."""
        if self.sparsity_warmup and step < self.sparsity_warmup:
            return value * (step + 1) / self.sparsity_warmup
        return value

    def resample_due(self, steps_done: int) -> bool:
        """Whether dead latents are resampled after ``steps_done`` steps (ReLU with ``resample_dead``)."""
        cfg = self.cfg
        if cfg.architecture != "relu" or not cfg.resample_dead or steps_done % self.resample_every != 0:
            return False
        return not self.total_steps or steps_done <= 0.8 * self.total_steps


class L1Controller:
    """The L1 coefficient of a ReLU SAE: ``l1_coefficient`` warmed up, times ``exp(log_scale)``.

    With ``target_l0``, :meth:`update` is one dual-ascent step on the coefficient, read as the Lagrange
    multiplier of the constraint ``mean L0 = target``: ``log c += rate * log(L0 / target)`` (in log space so it
    stays positive and moves by the same factor for L0 twice or half the target), clamped to ``e^±10``. L0
    follows the coefficient only after tens of steps (the encoder biases must move), and after the L1 warm-up
    it keeps falling for a while at a fixed coefficient, so the update runs only inside ``l1_adapt_window``:
    by default from 45% of training (on SmolLM2's residual stream L0 has settled by then; started at 20-25%
    the controller mistook the transient for excess and ended 10-15% under the target) to 85% (the learning
    rate decays after 80%, when the weights could no longer follow). With no known length (a one-shot
    stream) it runs from step ``max(warm-up, 1000)``.
    """

    def __init__(self, cfg: SAETrainingConfig, schedule: Schedule) -> None:
        self.cfg = cfg
        self.schedule = schedule
        self.log_scale = 0.0  # log of the factor the controller applies to l1_coefficient (checkpointed)

    def coefficient(self, step: int) -> float:
        """This step's L1 coefficient: the warmed-up ``l1_coefficient`` times the controller's factor."""
        return self.schedule.sparsity_coef(step, self.cfg.l1_coefficient) * math.exp(self.log_scale)

    @property
    def final_coefficient(self) -> float:
        """The L1 coefficient after the warm-up, with the controller's factor (``l1_coefficient`` without one)."""
        return self.cfg.l1_coefficient * math.exp(self.log_scale)

    def update(self, step: int, l0_mean: float) -> None:
        """One controller step after step ``step`` measured mean L0 ``l0_mean`` (no-op without ``target_l0``)."""
        cfg = self.cfg
        if cfg.target_l0 is None or not l0_mean > 0:
            return
        total = self.schedule.total_steps
        if total:
            lo, hi = cfg.l1_adapt_window
            if not lo * total <= step < hi * total:
                return
        elif step < max(self.schedule.sparsity_warmup, 1000):
            return
        self.log_scale += cfg.l1_adapt_rate * math.log(l0_mean / cfg.target_l0)
        self.log_scale = min(max(self.log_scale, -10.0), 10.0)
