"""Weight-error attribution: which quantized weight matrix carries the gap.

For a weight-only variant (its Linears hold de-quantized float weights W_var, see :mod:`trace_lib.quant`) and
each Linear whose weights differ from the reference's W_ref:

* **un-quantize** (exact): the variant with that one Linear's reference weights restored::

      restored(W) = (mean M_var[W <- W_ref] - mean M_var) / gap

  (each such run starts at W's block, the blocks before it replaying the variant's cached residual)

* **first-order estimate**, for every Linear from one backward pass of the reference::

      e(W) = (W_var - W_ref) . dM-bar/dW |_reference          estimated fraction = -e(W) / gap

  e(W) is the first-order Taylor term of ``mean M_ref[W <- W_var] - mean M_ref``; for M quadratic in W the
  exact change is e(W) + 1/2 dW^T H dW.

Un-quantizing every differing Linear gives the reference's weights, hence its M, exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from trace_lib.attribution.components import Component
from trace_lib.attribution.metric import Metric, MetricBatch, metric_values
from trace_lib.attribution.patching import cache, check_pair, replay_from, sites_of
from trace_lib.errors import AttributionError
from trace_lib.progress import track


@dataclass
class WeightResult:
    """Per differing Linear: the estimated fraction, and the exact restored fraction where it was measured."""

    modules: list[str]
    estimate: list[float]
    fraction_estimate: list[float]
    restored: dict[str, float]
    gap: float
    seconds_estimate: float = 0.0
    seconds_exact: float = 0.0

    def to_dict(self) -> dict:
        return {"modules": self.modules, "estimate": self.estimate, "fraction_estimate": self.fraction_estimate,
                "restored": self.restored, "gap": self.gap, "seconds_estimate": round(self.seconds_estimate, 3),
                "seconds_exact": round(self.seconds_exact, 3)}

    def ranking(self) -> list[tuple[str, float, float | None]]:
        """(module, estimated fraction, measured fraction or None), largest estimate first."""
        order = np.argsort(-np.asarray(self.fraction_estimate), kind="mergesort")
        return [(self.modules[i], self.fraction_estimate[i], self.restored.get(self.modules[i])) for i in order]


def differing_linears(reference, variant) -> list[str]:
    """Names of the Linears whose float weights differ between the two models (same module tree)."""
    ref_mods = dict(reference.model.named_modules())
    names, opaque = [], []
    for name, mod in variant.model.named_modules():
        if not isinstance(mod, nn.Linear) or name not in ref_mods:
            if name in ref_mods and isinstance(ref_mods[name], nn.Linear) and not isinstance(mod, nn.Linear):
                opaque.append(name)
            continue
        w_var, w_ref = mod.weight, getattr(ref_mods[name], "weight", None)
        if type(w_var.data) is not torch.Tensor or w_ref is None:
            opaque.append(name)
            continue
        if w_var.shape != w_ref.shape:
            raise AttributionError(f"{name} has weight shape {tuple(w_var.shape)} in {variant.name} but "
                                   f"{tuple(w_ref.shape)} in the reference")
        if not torch.equal(w_var.detach().to(w_ref.dtype), w_ref.detach()):
            names.append(name)
    if opaque and not names:
        raise AttributionError(f"{variant.name} keeps its weights in quantized modules ({opaque[0]}, ...); weight "
                               "attribution needs a weight-only variant with de-quantized float weights "
                               "(int*-rtn, gguf-*, int8-weight, gptq, awq without -kernel)")
    if not names:
        raise AttributionError(f"no Linear weights differ between {variant.name} and the reference")
    return names


@contextmanager
def unquantized(reference, variant, names: Sequence[str]) -> Iterator[None]:
    """Inside the block, the variant's Linears ``names`` hold the reference's weights.

    Each Linear's weight parameter is swapped for one holding the reference's values (over the reference's own
    storage when the dtypes agree) and swapped back after: nothing is written in place, since a variant's tensors
    may share storage with its reference (:func:`trace_lib.quant.apply.shared_copy`)."""
    ref_mods, var_mods = dict(reference.model.named_modules()), dict(variant.model.named_modules())
    saved: list[tuple[nn.Module, nn.Parameter]] = []
    try:
        for n in names:
            mod = var_mods[n]
            w = mod.weight
            saved.append((mod, w))
            mod.weight = nn.Parameter(ref_mods[n].weight.detach().to(device=w.device, dtype=w.dtype),
                                      requires_grad=False)
        yield
    finally:
        for mod, w in reversed(saved):
            mod.weight = w


def _block_of(loaded, name: str) -> int:
    """The decoder block a module lives in (0 for modules outside the blocks)."""
    prefix = loaded.arch.layers_path + "."
    if name.startswith(prefix):
        head = name[len(prefix):].split(".", 1)[0]
        if head.isdigit():
            return int(head)
    return 0


def _restore_each(reference, variant, batches: Sequence[MetricBatch], metric: Metric, names: Sequence[str],
                  replay: bool) -> dict[str, float]:
    """Mean M of the variant with each Linear of ``names`` un-quantized in turn. With ``replay`` the variant's
    run is cached once per batch and each restored run starts at the Linear's block (the blocks before it are
    unchanged, :func:`~trace_lib.attribution.patching.replay_from`)."""
    starts = {}
    for n in names:
        s = _block_of(variant, n) if replay else 0
        starts[n] = min(s, metric.layer) if metric.kind == "direction" else s
    sites, _ = sites_of(variant, [Component(i, "resid_pre") for i in sorted(set(starts.values())) if i > 0])
    totals = dict.fromkeys(names, 0.0)
    count = 0
    for b in track(list(batches), "un-quantizing Linears"):
        acts, _ = cache(variant, b, metric, sites) if sites else ({}, None)
        for n in names:
            with unquantized(reference, variant, [n]), torch.no_grad(), replay_from(variant, starts[n], acts):
                totals[n] += float(metric_values(variant, b, metric).double().sum())
        count += b.n_prompts
    return {n: t / count for n, t in totals.items()}


def first_order(reference, variant, batches: Sequence[MetricBatch], metric: Metric, names: Sequence[str]
                ) -> list[float]:
    """e(W) for each Linear in ``names`` (module docstring): one forward and backward per batch."""
    ref_mods, var_mods = dict(reference.model.named_modules()), dict(variant.model.named_modules())
    flags = [(p, p.requires_grad) for p in reference.model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    weights = [ref_mods[n].weight for n in names]
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    n_total = sum(b.n_prompts for b in batches)
    try:
        with torch.enable_grad():
            for b in batches:
                (metric_values(reference, b, metric).sum() / n_total).backward()
        out = []
        for n, w in zip(names, weights):
            g = w.grad if w.grad is not None else torch.zeros_like(w)
            dw = var_mods[n].weight.detach().to(torch.float64) - w.detach().to(torch.float64)
            out.append(float((dw * g.to(torch.float64)).sum()))
        return out
    finally:
        for w in weights:
            w.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)


def weight_attribution(reference, variant, batches: Sequence[MetricBatch], metric: Metric, gap: float,
                       m_var: float, exact: Sequence[str] | str = "top+random", n_top: int = 20, n_random: int = 20,
                       seed: int = 0, replay: bool = True) -> WeightResult:
    """First-order estimate for every differing Linear, and the exact un-quantize restore for ``exact``: a list
    of names, ``"all"``, or ``"top+random"`` (the ``n_top`` largest estimates and ``n_random`` others, seeded)."""
    check_pair(reference, variant)
    names = differing_linears(reference, variant)
    t0 = time.perf_counter()
    est = first_order(reference, variant, batches, metric, names)
    t1 = time.perf_counter()
    frac = [-e / gap for e in est]
    if exact == "all":
        chosen = list(names)
    elif exact == "top+random":
        order = np.argsort(-np.asarray(frac), kind="mergesort")
        top = [names[i] for i in order[:n_top]]
        rest = [n for n in names if n not in top]
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(rest), size=min(n_random, len(rest)), replace=False) if rest else []
        chosen = top + [rest[i] for i in sorted(pick)]
    else:
        chosen = list(exact)
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise AttributionError(f"{unknown[0]} is not a Linear whose weights differ in {variant.name}")
    restored = _restore_each(reference, variant, batches, metric, chosen, replay)
    restored = {n: (v - m_var) / gap for n, v in restored.items()}
    return WeightResult(names, est, frac, restored, gap, t1 - t0, time.perf_counter() - t1)
