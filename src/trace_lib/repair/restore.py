"""Restoring a damaged variant's refusal direction instead of its precision: steering and weight edits.

Both use the reference's refusal direction ``r`` (Arditi et al. 2024, arXiv:2406.11717): the difference in means
of the last-token residual after block ``L``, harmful minus harmless *train* prompts, at the block (among the first
80%) where it separates them best, or at the block the user names
(:func:`trace_lib.attribution.inputs.fit_direction`).

* ``steer``: add ``s * v`` (``v`` the unnormalised difference in means) to the variant's residual after block
  ``L`` on every token (:class:`~trace_lib.repair.steer.SteeringVector`). The strengths tried are multiples of
  the variant's own loss along ``r`` there, ``s0 = mean_i r.(x_ref,i - x_var,i) / ||v||`` over the harmful train
  prompts (``s0 * v`` puts the harmful prompts' mean projection back where the reference has it):
  ``s0 x (0.5, 1, 2, 4, 8)``. Each is scored on the train split's teacher-forced refusal metric (restored
  fraction of the gap, one forward pass each); the smallest reaching the train bar and the next two are checked
  by greedy replies to the train prompts (:func:`~trace_lib.repair.strength.choose_strength`: the smallest that
  restores refusal without a significant over-refusal rise), and the chosen one is confirmed on the test split.
* ``edit-compensate``: ``restore_direction(Q(ref), r, ref)``: every residual writer of the variant gets the
  reference's component along ``r`` back, ``W' = (I - r r^T) W_q + r r^T W_ref`` (:mod:`trace_lib.repair.edit`).
* ``edit-before-quantize``: ``restore_direction(Q(remove_direction(ref, r)), r, ref)``: the writers' component
  along ``r`` is taken out before quantizing and put back exactly afterwards, so quantization never sees it.

Their cost in bits: a steering vector is ``d_model`` numbers; an edit is a rank-one float term per quantized
residual writer (``r`` and the row ``r^T W_ref``, stored at 16 bits), counted over the target's quantized Linears
like the precision search's extra bits. Neither is a plain quantized file: steering needs a runtime hook
(llama.cpp's control vectors add exactly such a vector per layer), an edit a rank-one adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from trace_lib.attribution.inputs import Direction, fit_direction, last_token_residuals
from trace_lib.attribution.metric import Metric, MetricBatch
from trace_lib.models.load import Loaded
from trace_lib.repair.accept import accept
from trace_lib.repair.edit import remove_direction, residual_writers, restore_direction
from trace_lib.repair.precision import mean_kld, mean_metric
from trace_lib.repair.steer import SteeringVector, steer_variant
from trace_lib.repair.strength import Outcomes, choose_strength, measure_outcomes

__all__ = ["KINDS", "MULTIPLIERS", "RestoreContext", "edit_repairs", "refusal_direction", "steer_repair"]

#: What ``trace repair --method`` can run (``all`` is every one).
KINDS = ("precision", "steer", "edit")
#: Steering strengths tried, as multiples of the variant's loss along the direction (module docstring).
MULTIPLIERS = (0.5, 1.0, 2.0, 4.0, 8.0)
#: Bits a stored float of a steering vector or rank-one term takes (float16).
FLOAT_BITS = 16


@dataclass
class RestoreContext:
    """What the precision search already measured and the restorations reuse (train split; held-out text)."""

    reference: Loaded
    variant: Loaded
    batches: Sequence[MetricBatch]
    metric: Metric
    m_ref: float
    m_var: float
    kl_ids: torch.Tensor
    ref_logprobs: torch.Tensor
    target_bpw: float
    total_params: int  # weights of the target's quantized Linears

    def restored(self, m: float) -> float:
        """Fraction of the train gap restored: ``(M - M_var) / (M_ref - M_var)``."""
        return (m - self.m_var) / (self.m_ref - self.m_var)


def refusal_direction(reference: Loaded, harmful: Sequence[str], harmless: Sequence[str], layer: int | None = None,
                      batch_size: int = 8) -> tuple[Direction, SteeringVector]:
    """The reference's refusal direction (unit, with its block and Cohen's d) and its unnormalised steering
    vector at ``blocks.{layer}.hook_resid_post``, both from the same train prompts."""
    direction = fit_direction(reference, list(harmful), list(harmless), layer, batch_size=batch_size)
    vector = SteeringVector.from_prompts(reference, harmful, harmless, direction.layer, position="last",
                                         batch_size=batch_size)
    return direction, vector


def projection_loss(ctx: RestoreContext, direction: Direction, harmful: Sequence[str], batch_size: int = 8) -> float:
    """``mean_i r.(x_ref,i - x_var,i)``: how far the variant's harmful prompts fell along ``r`` after the block."""
    layer = direction.layer
    ref = last_token_residuals(ctx.reference, harmful, [layer], batch_size)[layer].double()
    var = last_token_residuals(ctx.variant, harmful, [layer], batch_size)[layer].double()
    return float(((ref - var) @ direction.r_hat.double()).mean())


def _extra_bpw(ctx: RestoreContext, floats: int) -> float:
    return floats * FLOAT_BITS / ctx.total_params


def _candidate(ctx: RestoreContext, method: str, model: Loaded, floats: int, ref_out: Outcomes,
               test: Outcomes, tolerance: float, alpha: float, restored: float, details: dict,
               ships_as: str) -> dict:
    extra = _extra_bpw(ctx, floats)
    acc = accept(ref_out, test, tolerance, alpha)
    return {"method": method, "config": model.name, "extra_bpw": extra, "bpw": ctx.target_bpw + extra,
            "modules": [], "stored_floats": floats, "restored_train": restored,
            "kld": mean_kld(model, ctx.kl_ids, ctx.ref_logprobs), "acceptance": acc.to_dict(), "details": details,
            "ships_as": ships_as}


def steer_repair(ctx: RestoreContext, direction: Direction, vector: SteeringVector, harmful_train: Sequence[str],
                 harmless_train: Sequence[str], harmful_test: Sequence[str], harmless_test: Sequence[str],
                 ref_out: Outcomes, train_bar: float = 0.9, tolerance: float = 0.05, alpha: float = 0.05,
                 max_new_tokens: int = 64, train_tokens: int = 24, batch_size: int = 8,
                 counts: dict | None = None, log: Callable[[str], None] = lambda s: None) -> dict:
    """The steering repair (module docstring): strengths scored on the train split, the chosen one confirmed on
    the test split. Returns the candidate dict (``acceptance`` on the test split; ``details`` every strength's
    train numbers and the strength choice)."""
    counts = counts if counts is not None else {}
    loss = projection_loss(ctx, direction, harmful_train, batch_size)
    norm = float(vector.direction.norm())
    s0 = loss / norm if loss > 0 else 0.1
    grid = [round(s0 * k, 6) for k in MULTIPLIERS]
    scored = []
    for s in grid:
        with vector.apply(ctx.variant, s):
            m = mean_metric(ctx.variant, ctx.batches, ctx.metric)
        counts["metric_evaluations"] = counts.get("metric_evaluations", 0) + 1
        scored.append({"strength": s, "restored_train": ctx.restored(m)})
    reaching = [i for i, p in enumerate(scored) if p["restored_train"] >= train_bar]
    if reaching:
        tried = [p["strength"] for p in scored[reaching[0]: reaching[0] + 3]]
    else:
        tried = [p["strength"] for p in sorted(scored, key=lambda p: -p["restored_train"])[:2]]
    log(f"steer at blocks.{direction.layer}: loss along r {loss:.4g} (s0 = {s0:.4g}); train metric "
        + ", ".join(f"s={p['strength']:g}: {p['restored_train']:.2f}" for p in scored) + f"; replies at {tried}")
    choice = choose_strength(ctx.variant, vector, tried, harmful_train, harmless_train, ctx.reference,
                             tolerance, alpha, max_new_tokens=train_tokens, batch_size=batch_size)
    counts["generation_runs"] = counts.get("generation_runs", 0) + len(tried) + 1
    strength = choice.strength if choice.strength is not None else max(
        choice.candidates, key=lambda c: (c.refusal["rate"], -abs(c.strength))).strength
    steered = steer_variant(ctx.variant, [vector], strength)
    test = measure_outcomes(steered, harmful_test, harmless_test, max_new_tokens=max_new_tokens,
                            batch_size=batch_size)
    counts["generation_runs"] += 1
    restored = next(p["restored_train"] for p in scored if p["strength"] == strength)
    details = {"direction": direction.to_dict(), "vector_norm": norm, "projection_loss": loss, "s0": s0,
               "strength": strength, "chosen_on_train": choice.strength is not None, "train_metric": scored,
               "strength_choice": choice.to_dict()}
    return _candidate(ctx, "steer", steered, ctx.reference.d_model, ref_out, test, tolerance, alpha, restored,
                      details, f"a steering vector added after block {direction.layer} at runtime (llama.cpp: a "
                               "control vector)")


def _rank_one_floats(ctx: RestoreContext) -> int:
    """Floats of the rank-one terms over the target's quantized residual writers: ``r`` once plus ``r^T W_ref``
    (one number per input column) for each."""
    floats = ctx.reference.d_model
    for w in residual_writers(ctx.variant):
        if w.role in ("attn_out", "mlp_out") and w.name.endswith("weight"):
            floats += w.param.numel() // w.param.shape[w.out_dim]
    return floats


def edit_repairs(ctx: RestoreContext, direction: Direction, target_config, harmful_test: Sequence[str],
                 harmless_test: Sequence[str], ref_out: Outcomes, tolerance: float = 0.05, alpha: float = 0.05,
                 max_new_tokens: int = 64, batch_size: int = 8, counts: dict | None = None,
                 log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """The two weight-edit repairs (module docstring), each scored on the train metric and confirmed on the test
    split."""
    from trace_lib.quant import quantize

    counts = counts if counts is not None else {}
    r = direction.r_hat
    floats = _rank_one_floats(ctx)
    out = []
    arms = (("edit-compensate", lambda: restore_direction(ctx.variant, r, ctx.reference)),
            ("edit-before-quantize",
             lambda: restore_direction(quantize(remove_direction(ctx.reference, r), target_config), r, ctx.reference)))
    for method, build in arms:
        model = build()
        counts["quantizations"] = counts.get("quantizations", 0) + (method == "edit-before-quantize")
        m = mean_metric(model, ctx.batches, ctx.metric)
        counts["metric_evaluations"] = counts.get("metric_evaluations", 0) + 1
        test = measure_outcomes(model, harmful_test, harmless_test, max_new_tokens=max_new_tokens,
                                batch_size=batch_size)
        counts["generation_runs"] = counts.get("generation_runs", 0) + 1
        cand = _candidate(ctx, method, model, floats, ref_out, test, tolerance, alpha, ctx.restored(m),
                          {"direction": direction.to_dict()},
                          "the quantized weights plus a rank-one float term per residual writer (an adapter)")
        log(f"{method}: train restored {cand['restored_train']:.2f}, test "
            f"{'accepted' if cand['acceptance']['accepted'] else 'rejected'}: {cand['acceptance']['why']}")
        out.append(cand)
        del model
    return out
