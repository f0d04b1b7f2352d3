"""Attribution patching (AtP): a first-order estimate of every component's patching effect at once.

Nanda 2023, "Attribution Patching: Activation Patching At Industrial Scale"; Kramar et al. 2024, "AtP*: An
efficient and scalable method for localizing LLM behaviour to components" (arXiv:2403.00745). For component n
with activations a(n) at the chosen positions, and M-bar the mean of M over prompts::

    c(n) = (a_var(n) - a_ref(n)) . dM-bar/da(n) |_reference            (summed over positions and width)

c(n) is the first-order Taylor estimate of ``mean M_ref[n <- a_var(n)] - mean M_ref``, so the estimated
fraction of the gap the component introduces is ``-c(n) / gap`` (compare with inject-patching; in the
linear regime it also estimates restore-patching). Cost per prompt batch: one forward of the variant, one
forward and one backward of the reference, whatever the number of components.

**GradDrop** (AtP*, optional): for each block l, the backward pass is repeated with the gradient through
block l's residual contributions (its attn_out and mlp_out) set to zero, giving c_l(n); the score is
``1/(L-1) sum_l |c_l(n)|``. It counters cancellation between direct and indirect paths that makes plain AtP
miss components (false negatives); it is a magnitude for ranking, with no sign, and costs L more forward
and backward passes of the reference.

:func:`spearman` and :func:`false_negative_rate` compare AtP's ranking with patching's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from trace_lib.attribution.components import Component
from trace_lib.attribution.metric import Metric, MetricBatch, metric_values
from trace_lib.attribution.patching import cache, check_pair, recording, sites_of
from trace_lib.capture.splice import register_replacement
from trace_lib.progress import track


@dataclass
class AtPResult:
    """Per component: ``estimate`` = c(n) (change of mean M), ``fraction`` = -c(n)/gap, and with GradDrop the
    ``graddrop`` magnitude score."""

    components: list[str]
    estimate: list[float]
    fraction: list[float]
    gap: float
    graddrop: list[float] | None = None
    seconds: float = 0.0
    n_forward: int = 0
    n_backward: int = 0

    def to_dict(self) -> dict:
        return {"components": self.components, "estimate": self.estimate, "fraction": self.fraction,
                "gap": self.gap, "graddrop": self.graddrop, "seconds": round(self.seconds, 3),
                "n_forward": self.n_forward, "n_backward": self.n_backward}


@contextmanager
def _frozen(model: torch.nn.Module, arch) -> Iterator[None]:
    """No parameter gradients (they are not needed); gradients flow from a leaf at the embedding output."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)

    def leaf(module, args, output):
        return output.detach().requires_grad_(True)

    handle = arch.embed.register_forward_hook(leaf)
    try:
        yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _drop_block(loaded, layer: int) -> Iterator[None]:
    """Zero the gradient flowing back through block ``layer``'s attn_out and mlp_out (the skip path is kept)."""
    handles = []
    for point in ("attn_out", "mlp_out"):
        s = loaded.arch.site(f"blocks.{layer}.hook_{point}")
        handles.append(register_replacement(s, lambda t: t.detach()))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _grad_pass(reference, batch: MetricBatch, metric: Metric, sites: dict, n_total: int
               ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Forward + backward of the reference: ``{site: (a_ref, dM-bar/da)}`` (sites the metric never reaches
    are absent) and M per prompt."""
    with torch.enable_grad(), recording(sites, grad=True) as store:
        m = metric_values(reference, batch, metric)
        (m.sum() / n_total).backward()
    out = {}
    for name, t in store.items():
        g = t.grad if t.grad is not None else torch.zeros_like(t)
        out[name] = (t.detach(), g.detach())
    return out, m.detach()


def _contract(where: dict, comps: Sequence[Component], a_var: dict, grads: dict, mask: torch.Tensor,
              acc: dict[Component, float]) -> None:
    for c in comps:
        name, head = where[c]
        if name not in grads or name not in a_var:
            continue
        a_ref, g = grads[name]
        diff = (a_var[name].to(a_ref.dtype) - a_ref) * g
        if head is not None:
            diff = diff[..., head]
        acc[c] += float((diff.sum(-1) * mask.to(diff.device)).double().sum())


def attribution_patch(reference, variant, batches: Sequence[MetricBatch], metric: Metric,
                      components: Sequence[Component], positions: str | Sequence[int] = "all",
                      graddrop: bool = False, gap: float | None = None) -> AtPResult:
    """AtP estimate of every component's effect (module docstring); ``gap`` defaults to the measured one."""
    check_pair(reference, variant)
    comps = list(components)
    sites, where = sites_of(reference, comps)
    var_sites, _ = sites_of(variant, comps)
    n_total = sum(b.n_prompts for b in batches)
    acc = {c: 0.0 for c in comps}
    drop_acc = {c: 0.0 for c in comps}
    m_ref_sum = m_var_sum = 0.0
    n_fwd = n_bwd = 0
    t0 = time.perf_counter()
    with _frozen(reference.model, reference.arch):
        for batch in track(list(batches), "attribution patching"):
            mask = batch.positions(positions)
            a_var, m_var = cache(variant, batch, metric, var_sites)
            grads, m_ref = _grad_pass(reference, batch, metric, sites, n_total)
            n_fwd += 2
            n_bwd += 1
            m_var_sum += float(m_var.double().sum())
            m_ref_sum += float(m_ref.double().sum())
            _contract(where, comps, a_var, grads, mask, acc)
            if graddrop:
                for layer in range(reference.n_layers):
                    part = {c: 0.0 for c in comps}
                    with _drop_block(reference, layer):
                        g_l, _ = _grad_pass(reference, batch, metric, sites, n_total)
                    n_fwd += 1
                    n_bwd += 1
                    _contract(where, comps, a_var, g_l, mask, part)
                    for c in comps:
                        drop_acc[c] += abs(part[c])
    if gap is None:
        gap = (m_ref_sum - m_var_sum) / n_total
    est = [acc[c] for c in comps]
    frac = [-e / gap if gap else float("nan") for e in est]
    gd = None
    if graddrop:
        denom = max(reference.n_layers - 1, 1)
        gd = [drop_acc[c] / denom for c in comps]
    return AtPResult([c.name for c in comps], est, frac, float(gap), gd, time.perf_counter() - t0, n_fwd, n_bwd)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), as Spearman's rho needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the average ranks; NaN with fewer than 3 pairs or no spread."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def false_negative_rate(true: Sequence[float], estimate: Sequence[float], k: int = 10) -> float:
    """Of the k components with the largest |true| effect, the fraction not among the estimate's top k by
    |estimate| (0 = AtP finds every one of them)."""
    t, e = np.abs(np.asarray(true, dtype=np.float64)), np.abs(np.asarray(estimate, dtype=np.float64))
    k = min(k, len(t))
    if k == 0:
        return float("nan")
    top_true = set(np.argsort(-t, kind="mergesort")[:k].tolist())
    top_est = set(np.argsort(-e, kind="mergesort")[:k].tolist())
    return len(top_true - top_est) / k
