"""Activation patching across precisions: the causal ground truth of where a variant's gap enters.

For a component n (a site, at the chosen positions) and the per-prompt metric M (:mod:`.metric`):

* **restore**: run the variant with n's activation replaced by the reference's on the same tokens::

      restored(n) = (mean M_var[n <- a_ref(n)] - mean M_var) / gap

  1 means putting the reference's computation back at n alone closes the whole gap;
* **inject**: run the reference with the variant's activation at n::

      introduced(n) = (mean M_ref - mean M_ref[n <- a_var(n)]) / gap

with ``gap = mean M_ref - mean M_var`` over the same prompts. Means are over prompts, ratios of means.

Each prompt batch runs once through each model with every site recorded (the cached activations also give
M_ref and M_var), then once per component and mode with one site patched: 2 + 2 x components forwards per
batch. A patched forward starts at the patched block: the blocks before it, whose outputs are the cached run's,
are stood in for by stubs that return the cached residual (:func:`replay_from`), so a component at layer i
costs (n - i) / n of a forward pass. Sites are :class:`~trace_lib.models.arch.HookSite` objects patched through
:func:`trace_lib.capture.splice.register_replacement`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from trace_lib.attribution.components import Component, site
from trace_lib.attribution.metric import Metric, MetricBatch, metric_values
from trace_lib.capture.splice import _rebuild, register_replacement
from trace_lib.errors import AttributionError
from trace_lib.progress import track

MODES = ("restore", "inject")


@dataclass
class PatchResult:
    """Fractions of the gap one component carries: restored by restore-patching, introduced by injecting."""

    component: str
    gap_restored: float | None = None
    gap_introduced: float | None = None

    def to_dict(self) -> dict:
        return {"component": self.component, "gap_restored": self.gap_restored,
                "gap_introduced": self.gap_introduced}


@dataclass
class PatchRun:
    """All components' results, with the per-prompt metrics they are fractions of."""

    results: list[PatchResult]
    m_ref: torch.Tensor
    m_var: torch.Tensor
    positions: str
    n_forward: int = 0
    seconds: float = 0.0
    modes: tuple[str, ...] = MODES
    extra: dict = field(default_factory=dict)

    @property
    def gap(self) -> float:
        return float(self.m_ref.double().mean() - self.m_var.double().mean())

    def by_name(self) -> dict[str, PatchResult]:
        return {r.component: r for r in self.results}


def sites_of(loaded, comps: Sequence[Component]) -> tuple[dict, dict]:
    """``({site name: HookSite}, {component: (site name, head slice or None)})`` with shared sites merged."""
    sites, where = {}, {}
    for c in comps:
        s, sl = site(loaded, c)
        sites.setdefault(s.name, s)
        where[c] = (s.name, sl)
    return sites, where


@contextmanager
def recording(sites: dict, grad: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record the activation at every site during the forward passes inside the block. Without ``grad`` a
    detached copy is kept; with it the live tensor, its gradient retained for a backward pass."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, s in sites.items():
        def fn(t: torch.Tensor, name: str = name) -> torch.Tensor:
            if grad:
                if t.requires_grad:
                    t.retain_grad()
                store[name] = t
            else:
                store[name] = t.detach().clone()
            return t
        handles.append(register_replacement(s, fn))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def patched(hook_site, head: slice | None, source: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
    """Inside the block, the activation at ``hook_site`` is ``source`` where ``mask`` [rows, seq] is set (only
    the ``head`` slice of the last dimension when given) and the model's own elsewhere."""
    def fn(t: torch.Tensor) -> torch.Tensor:
        m = mask.to(t.device)[..., None]
        src = source.to(t.device, t.dtype)
        if head is None:
            return torch.where(m, src, t)
        out = t.clone()
        out[..., head] = torch.where(m, src[..., head], t[..., head])
        return out

    handle = register_replacement(hook_site, fn)
    try:
        yield
    finally:
        handle.remove()


def cache(loaded, batch: MetricBatch, metric: Metric, sites: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward pass: the activation at every site (sites the metric never reaches are absent) and M.
    ``store["<block output>"]`` keeps block 0's raw output, the template :func:`replay_from` imitates."""
    block0 = {}
    handle = loaded.arch.layers[0].register_forward_hook(lambda m, a, out: block0.setdefault("out", out))
    try:
        with torch.no_grad(), recording(sites) as store:
            m = metric_values(loaded, batch, metric)
    finally:
        handle.remove()
    out = dict(store)
    if "out" in block0:
        out[_TEMPLATE] = block0["out"]
    return out, m


_TEMPLATE = "<block output>"


class _Replay(nn.Module):
    """Stands in for a block before the patched one: returns the cached residual, shaped like a block's output."""

    def __init__(self, template, value: torch.Tensor) -> None:
        super().__init__()
        self.template, self.value = template, value

    def forward(self, *args, **kwargs):  # noqa: ARG002 - a block's call signature, ignored
        return _rebuild(self.template, self.value)


def start_layer(comp: Component, metric: Metric, n_layers: int) -> int:
    """The first block a patched forward must really run: the block whose input or output is patched, and
    never past the block the direction metric is read after."""
    first = comp.layer - 1 if comp.kind == "resid_pre" else comp.layer  # resid_pre is block i-1's output
    if metric.kind == "direction":
        first = min(first, metric.layer)
    return max(0, min(first, n_layers - 1))


@contextmanager
def replay_from(loaded, layer: int, acts: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, blocks ``0..layer-1`` return the cached input of block ``layer`` (taken from ``acts``,
    recorded by :func:`cache`) instead of computing it; nothing is replaced when it was not recorded."""
    key = f"blocks.{layer - 1}.hook_resid_post"
    if layer <= 0 or key not in acts or _TEMPLATE not in acts:
        yield
        return
    blocks = loaded.arch.layers
    saved = [blocks[j] for j in range(layer)]
    stub = _Replay(acts[_TEMPLATE], acts[key])
    try:
        for j in range(layer):
            blocks[j] = stub
        yield
    finally:
        for j, block in enumerate(saved):
            blocks[j] = block


def check_pair(reference, variant) -> None:
    """Patching needs the same blocks, widths and tokens in both models."""
    if reference.n_layers != variant.n_layers or reference.d_model != variant.d_model:
        raise AttributionError(f"{variant.name} has {variant.n_layers} blocks of width {variant.d_model} but the "
                               f"reference has {reference.n_layers} of {reference.d_model}; activations can only be "
                               "patched between variants of one model")
    tr, tv = reference.tokenizer, variant.tokenizer
    if tr is not None and tv is not None and tr is not tv and tr.get_vocab() != tv.get_vocab():
        raise AttributionError(f"{variant.name} has another tokenizer than the reference ({len(tv)} vs {len(tr)} "
                               "tokens); both models must read the same tokens")


def activation_patch(reference, variant, batches: Sequence[MetricBatch], metric: Metric,
                     components: Sequence[Component] | Component, positions: str | Sequence[int] = "all",
                     modes: Sequence[str] = MODES, replay: bool = True) -> PatchRun:
    """Restore- and/or inject-patch every component (see the module docstring) over all ``batches``; with
    ``replay`` each patched forward starts at the patched block (same numbers, fewer blocks run)."""
    check_pair(reference, variant)
    comps = [components] if isinstance(components, Component) else list(components)
    for m in modes:
        if m not in MODES:
            raise AttributionError(f"patching mode must be restore or inject, not {m!r}")
    starts = {c: start_layer(c, metric, reference.n_layers) if replay else 0 for c in comps}
    inputs = [Component(i, "resid_pre") for i in sorted(set(starts.values())) if i > 0]  # cached for replay
    sites, where = sites_of(reference, comps + inputs)
    var_sites, _ = sites_of(variant, comps + inputs)
    sums = {(c, m): 0.0 for c in comps for m in modes}
    m_ref_all, m_var_all = [], []
    n_fwd = 0
    t0 = time.perf_counter()
    for batch in track(list(batches), "patching"):
        a_ref, m_ref = cache(reference, batch, metric, sites)
        a_var, m_var = cache(variant, batch, metric, var_sites)
        n_fwd += 2
        m_ref_all.append(m_ref)
        m_var_all.append(m_var)
        mask = batch.positions(positions)
        for c in comps:
            name, head = where[c]
            for mode in modes:
                model, src, base = (variant, a_ref, m_var) if mode == "restore" else (reference, a_var, m_ref)
                if name not in src:  # the metric is read before this site: patching it changes nothing
                    sums[(c, mode)] += float(base.double().sum())
                    continue
                target = var_sites[name] if mode == "restore" else sites[name]
                own = a_var if mode == "restore" else a_ref  # the patched model's own run up to the patch
                with torch.no_grad(), replay_from(model, starts[c], own), patched(target, head, src[name], mask):
                    sums[(c, mode)] += float(metric_values(model, batch, metric).double().sum())
                n_fwd += 1
    m_ref_t, m_var_t = torch.cat(m_ref_all), torch.cat(m_var_all)
    n = len(m_ref_t)
    mean_ref, mean_var = float(m_ref_t.double().mean()), float(m_var_t.double().mean())
    gap = mean_ref - mean_var
    results = []
    for c in comps:
        r = PatchResult(c.name)
        if "restore" in modes:
            r.gap_restored = (sums[(c, "restore")] / n - mean_var) / gap if gap else float("nan")
        if "inject" in modes:
            r.gap_introduced = (mean_ref - sums[(c, "inject")] / n) / gap if gap else float("nan")
        results.append(r)
    pos = positions if isinstance(positions, str) else ",".join(str(p) for p in positions)
    return PatchRun(results, m_ref_t, m_var_t, pos, n_fwd, time.perf_counter() - t0, tuple(modes))
