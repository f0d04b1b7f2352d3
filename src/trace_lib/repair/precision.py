"""Mixed-precision repair: which quantized Linears to keep at a higher precision so the variant refuses again.

Every ranking orders the Linears whose weights the target config changes (``attribution.weights.differing_linears``):

* ``attribution`` (trace's search): the weight-error attribution of :mod:`trace_lib.attribution.weights`, the
  first-order estimate ``e(W) = (W_var - W_ref) . dM/dW`` of each Linear's share ``-e(W) / gap`` of the
  teacher-forced refusal gap on the **train** split, largest first;
* ``knapsack``: the same estimate per extra bit it costs (the greedy solution of the 0/1 knapsack on
  value / weight), so cheap matrices with a large share come first;
* ``saliency``: an importance matrix on harmful prompts, llama.cpp's ``imatrix``: ``I_j = mean_t x_tj^2`` over
  the reference's inputs to the Linear, scored ``sum_ij I_j (W_var - W_ref)_ij^2``, the importance-weighted
  quantization error ``llama-quantize --imatrix`` minimises; no refusal metric involved;
* ``first-last``: whole blocks from the outside in (first, last, second, second to last, ...), the usual
  hand rule for sensitive layers;
* ``random``: a seeded shuffle.

A set for a budget of ``b`` extra bits per weight (over the quantized Linears' weights) is the ranking's greedy
fill: walk the ranking and keep every Linear whose extra bits still fit. Keeping a Linear means storing it in the
``keep`` config (``gguf-q8_0`` for GGUF targets, ``int8-rtn-g32`` for int RTN, else ``fp16``); its weights are
exactly what :func:`~trace_lib.quant.quantize` gives that config's override (tested), so a set is scored by
swapping those weights into the target variant, with no re-quantization: the restored fraction of the train
gap ``(mean M_set - mean M_var) / (mean M_ref - mean M_var)`` and the mean KL divergence from the reference on
held-out text.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from trace_lib.attribution.metric import Metric, MetricBatch, metric_values
from trace_lib.attribution.weights import _block_of, differing_linears, first_order, unquantized
from trace_lib.errors import InvalidValueError, QuantizationError
from trace_lib.metrics.divergence import kl_from_log_probs
from trace_lib.models.device import to_device
from trace_lib.models.load import Loaded
from trace_lib.quant.apply import _weight_bits
from trace_lib.quant.config import GGUF_TYPES, QuantizationConfig, QuantizationType, parse_config

METHODS = ("attribution", "knapsack", "saliency", "first-last", "random")


def default_keep(target: QuantizationConfig) -> QuantizationConfig:
    """The precision a kept Linear is stored at: Q8_0 for a GGUF target, 8-bit RTN for int RTN, else fp16."""
    if target.type in GGUF_TYPES:
        return parse_config("gguf-q8_0")
    if target.type is QuantizationType.INT_RTN:
        return parse_config(f"int8-rtn-g{target.group_size}" if target.group_size else "int8-rtn-pc")
    return parse_config("fp16")


@dataclass(frozen=True)
class Costs:
    """Per Linear: its weight count and the extra bits keeping it costs; the quantized Linears' total weights."""

    params: dict[str, int]
    extra_bits: dict[str, float]
    target_bpw: float  # the target's bits per weight over its quantized Linears
    total_params: int

    def extra_bpw(self, names: Sequence[str]) -> float:
        return sum(self.extra_bits[n] for n in names) / self.total_params


def costs(reference: Loaded, target: QuantizationConfig, keep: QuantizationConfig, names: Sequence[str]) -> Costs:
    """Extra bits of keeping each of ``names`` at ``keep`` instead of ``target`` (storage as
    :func:`~trace_lib.quant.apply.storage_report` counts it)."""
    mods = dict(reference.model.named_modules())
    params, extra, total_bits = {}, {}, 0.0
    for n in names:
        m = mods[n]
        k = m.weight.numel()
        t_bits = _weight_bits(target, m.in_features)
        params[n], extra[n] = k, k * (_weight_bits(keep, m.in_features) - t_bits)
        total_bits += k * t_bits
    total = sum(params.values())
    return Costs(params, extra, total_bits / total, total)


# ---- rankings ------------------------------------------------------------------------------------------------


def imatrix_saliency(reference: Loaded, variant: Loaded, batches: Sequence[MetricBatch], names: Sequence[str]
                     ) -> list[float]:
    """``sum_ij I_j (W_var - W_ref)_ij^2`` per Linear, ``I_j`` the mean squared input of column j over the tokens
    of ``batches`` on the reference (llama.cpp's importance matrix, ``tools/imatrix``)."""
    mods = dict(reference.model.named_modules())
    sums = {n: torch.zeros(mods[n].in_features, dtype=torch.float64, device=mods[n].weight.device) for n in names}
    counts = dict.fromkeys(names, 0)

    def hook(name):
        def pre(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[name] += (x * x).sum(0)
            counts[name] += x.shape[0]
        return pre

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                reference.model(**to_device(b.forward_kwargs(), reference.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    var_mods = dict(variant.model.named_modules())
    out = []
    for n in names:
        dw = var_mods[n].weight.detach().to(torch.float64) - mods[n].weight.detach().to(torch.float64)
        out.append(float(((dw * dw) * (sums[n] / max(counts[n], 1))).sum()))
    return out


def first_last_order(loaded: Loaded, names: Sequence[str]) -> list[str]:
    """Linears grouped by block, blocks from the outside in (0, L-1, 1, L-2, ...), module order within a block."""
    n_layers = loaded.n_layers
    order = [i for pair in zip(range(n_layers), range(n_layers - 1, -1, -1)) for i in pair]
    rank = {b: r for r, b in enumerate(dict.fromkeys(order))}
    pos = {n: i for i, n in enumerate(names)}
    return sorted(names, key=lambda n: (rank.get(_block_of(loaded, n), n_layers), pos[n]))


@dataclass(frozen=True)
class Rankings:
    """Each method's order of the differing Linears, and the scores it came from (None for orders)."""

    order: dict[str, list[str]]
    scores: dict[str, dict[str, float] | None]
    seconds: dict[str, float]


def rank_linears(reference: Loaded, variant: Loaded, batches: Sequence[MetricBatch], metric: Metric, gap: float,
                 names: Sequence[str], cost: Costs, methods: Sequence[str] = METHODS, seed: int = 0) -> Rankings:
    """Every method's ranking of ``names`` (module docstring)."""
    order: dict[str, list[str]] = {}
    scores: dict[str, dict[str, float] | None] = {}
    seconds: dict[str, float] = {}
    frac = None
    for m in methods:
        t0 = time.perf_counter()
        if m in ("attribution", "knapsack"):
            if frac is None:
                est = first_order(reference, variant, batches, metric, names)
                frac = {n: -e / gap for n, e in zip(names, est)}
            if m == "attribution":
                order[m], scores[m] = sorted(names, key=lambda n: -frac[n]), dict(frac)
            else:
                per_bit = {n: frac[n] / max(cost.extra_bits[n], 1e-12) for n in names}
                order[m], scores[m] = sorted(names, key=lambda n: -per_bit[n]), per_bit
        elif m == "saliency":
            sal = dict(zip(names, imatrix_saliency(reference, variant, batches, names)))
            order[m], scores[m] = sorted(names, key=lambda n: -sal[n]), sal
        elif m == "first-last":
            order[m], scores[m] = first_last_order(reference, names), None
        elif m == "random":
            shuffled = list(names)
            random.Random(seed).shuffle(shuffled)
            order[m], scores[m] = shuffled, None
        else:
            raise InvalidValueError(f"unknown search method {m!r}: use one of {', '.join(METHODS)}")
        seconds[m] = time.perf_counter() - t0
    return Rankings(order, scores, seconds)


def greedy_fill(order: Sequence[str], cost: Costs, budget_bpw: float) -> list[str]:
    """Walk ``order`` and keep each Linear whose extra bits still fit in ``budget_bpw`` extra bits per weight."""
    room = budget_bpw * cost.total_params
    kept, used = [], 0.0
    for n in order:
        if used + cost.extra_bits[n] <= room + 1e-9:
            kept.append(n)
            used += cost.extra_bits[n]
    return kept


# ---- scoring a set -------------------------------------------------------------------------------------------


def kept_at(variant: Loaded, keep_variant: Loaded, names: Sequence[str]):
    """Inside the block, the variant's Linears ``names`` hold ``keep_variant``'s weights (the kept precision):
    :func:`~trace_lib.attribution.weights.unquantized` with the keep variant as the source."""
    return unquantized(keep_variant, variant, names)


def mean_metric(loaded: Loaded, batches: Sequence[MetricBatch], metric: Metric) -> float:
    """Mean M over every prompt of ``batches``."""
    with torch.no_grad():
        vals = torch.cat([metric_values(loaded, b, metric).double() for b in batches])
    return float(vals.mean())


def mean_kld(loaded: Loaded, ids: torch.Tensor, ref_logprobs: torch.Tensor) -> float:
    """Mean per-token KL(P_ref || P_model) over the packed text ``ids`` (the reference's float64 log-probs given;
    :func:`trace_lib.metrics.divergence.kl_from_log_probs`)."""
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(input_ids=to_device(ids, loaded.device), use_cache=False).logits.double(),
                                 -1)
        logp = logp.to(ref_logprobs.device)
    return float(kl_from_log_probs(ref_logprobs, logp).mean())


@dataclass
class CurvePoint:
    """One method's set at one budget, scored on the train split (and its KL divergence on held-out text)."""

    method: str
    budget_bpw: float  # the extra bits per weight allowed
    modules: list[str]
    extra_bpw: float  # the extra bits per weight the set uses
    bpw: float  # bits per weight over the quantized Linears
    restored: float  # fraction of the train refusal gap restored
    kld: float

    def to_dict(self) -> dict:
        return asdict(self)


def score_sets(variant: Loaded, keep_variant: Loaded, batches: Sequence[MetricBatch], metric: Metric,
               m_ref: float, m_var: float, rankings: Rankings, cost: Costs, budgets: Sequence[float],
               kl_ids: torch.Tensor, ref_logprobs: torch.Tensor) -> list[CurvePoint]:
    """Every method's greedy set at every budget, scored (identical sets are scored once)."""
    done: dict[tuple[str, ...], tuple[float, float]] = {}
    points = []
    for method, order in rankings.order.items():
        for b in budgets:
            kept = greedy_fill(order, cost, b)
            key = tuple(sorted(kept))
            if key not in done:
                with kept_at(variant, keep_variant, kept):
                    m = mean_metric(variant, batches, metric)
                    done[key] = ((m - m_var) / (m_ref - m_var), mean_kld(variant, kl_ids, ref_logprobs))
            restored, kld = done[key]
            extra = cost.extra_bpw(kept)
            points.append(CurvePoint(method, float(b), kept, extra, cost.target_bpw + extra, restored, kld))
    return points


def mixed_config(target: QuantizationConfig, keep: QuantizationConfig, modules: Sequence[str]
                 ) -> QuantizationConfig:
    """The shippable config: ``target`` with each of ``modules`` overridden to ``keep``."""
    if not target.weight_only:
        raise QuantizationError(f"{target.name} quantizes no weights; there are no modules to keep at higher "
                                "precision")
    return target.with_(overrides=tuple((m, keep.name) for m in modules))


def quantized_names(reference: Loaded, variant: Loaded) -> list[str]:
    """The Linears the target changes (the search's candidates)."""
    return differing_linears(reference, variant)


def budgets_up_to(max_extra: float, step: float = 0.125) -> list[float]:
    """0, step, 2 step, ... up to ``max_extra`` extra bits per weight (inclusive)."""
    if not np.isfinite(max_extra) or max_extra <= 0:
        raise InvalidValueError(f"the extra-bit budget must be > 0, not {max_extra}")
    n = int(np.floor(max_extra / step + 1e-9))
    out = [round(step * i, 6) for i in range(n + 1)]
    return out if out[-1] >= max_extra - 1e-9 else [*out, float(max_extra)]
