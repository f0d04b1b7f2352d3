"""Activation statistics per layer and hook point, and the anomalies they reveal (the seed's MLT-01).

:func:`tensor_stats` summarises a tensor without keeping it: count, mean, standard deviation (n - 1), min,
max, absolute max and L2 norm of its finite values, its NaN and Inf counts, the share of values pinned at
the dtype's finite limits, and the median per-token L2 norm. An :class:`ActivationTrace` holds the records
of one forward pass in forward order and names the first anomaly.

Anomaly rules, checked in this order for each record:

1. **NaN** / **Inf**: any non-finite value.
2. **Explosion** (the seed's absolute rule): a finite |value| above ``explosion_abs`` (1e6).
3. **High variance** (the seed's): standard deviation above ``explosion_std`` (1e4).
4. **Saturation**: share of values equal to ``±torch.finfo(dtype).max`` above ``saturation_threshold``
   (0: any). For float32 activations this means an overflow was clamped; in fp16 it is the usual failure.
5. **Norm explosion**: at ``resid_post``, the median per-token L2 norm above ``norm_explosion_factor`` (10)
   times the previous layer's. The median, not the mean: healthy models grow a few *massive activations*
   (Sun et al. 2024, "Massive Activations in Large Language Models") on the first token; SmolLM2-135M's RMS
   token norm jumps 46x at block 11 for that reason while its median token norm never grows more than 1.6x
   between layers. Only the residual stream is compared: sub-layer outputs (``attn_out``, ``mlp_out``)
   legitimately jump by 10x between early layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

RESID_EXPLOSION_POINT = "resid_post"


@dataclass
class TensorStats:
    """Statistics of one tensor; ``min`` / ``max`` / ``mean`` / ``std`` / norms ignore NaN and Inf."""

    count: int = 0
    mean: float = 0.0
    std: float = 0.0
    min: float = 0.0
    max: float = 0.0
    abs_max: float = 0.0
    l2_norm: float = 0.0
    nan_count: int = 0
    inf_count: int = 0
    saturated_share: float = 0.0
    token_norm_median: float = 0.0
    dtype: str = "float32"

    @classmethod
    def from_values(cls, values) -> TensorStats:
        """Statistics of a 1-D list or tensor (each value a token of width 1): for tests and the seed's API."""
        t = torch.as_tensor(values, dtype=torch.float32).reshape(-1, 1)
        return tensor_stats(t)

    def to_dict(self) -> dict:
        return asdict(self)


def tensor_stats(t: torch.Tensor, dtype: torch.dtype | None = None) -> TensorStats:
    """Statistics of ``t`` ([..., d]: the last dimension is the model width, the others are tokens).

    ``dtype`` is the dtype whose limits count as saturation (default ``t.dtype``). Runs on ``t``'s device
    in float32.
    """
    dtype = dtype or t.dtype
    x = t.detach()
    if not x.is_floating_point():
        x = x.float()
    n = x.numel()
    if n == 0:
        return TensorStats(dtype=_dtype_name(dtype))
    x = x.float() if x.dtype != torch.float32 else x
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(-1, 1)
    nan = inf = 0
    total = x2.sum()
    # A finite sum proves every value finite (a NaN or an infinity makes the sum non-finite), so the
    # elementwise check runs only when something is wrong or the sum overflowed.
    if not bool(torch.isfinite(total)) and not bool(torch.isfinite(x2).all()):
        nan = int(torch.isnan(x2).sum())
        inf = int(torch.isinf(x2).sum())
        finite = torch.isfinite(x2)
        flat = x2[finite]
        x2 = torch.where(finite, x2, torch.zeros((), dtype=x2.dtype, device=x2.device))
        total = flat.sum()
    else:
        flat = x2.reshape(-1)
    m = flat.numel()
    if m == 0:
        return TensorStats(count=n, nan_count=nan, inf_count=inf, mean=math.nan, std=math.nan, min=math.nan,
                           max=math.nan, abs_max=math.nan, l2_norm=math.nan, token_norm_median=math.nan,
                           dtype=_dtype_name(dtype))
    token_norms = torch.linalg.vector_norm(x2, dim=-1)
    l2 = torch.linalg.vector_norm(token_norms)
    lo, hi = torch.aminmax(flat)
    total_f, l2_f, lo_f, hi_f, med_f = torch.stack([total, l2, lo, hi, token_norms.median()]).tolist()
    # Mean and variance from the sums: three passes in all and no temporaries the size of the tensor. Where
    # that formula would cancel (n mean^2 close to the sum of squares) or a sum overflowed, Welford's
    # algorithm (torch.std_mean) runs instead, as the seed computes it.
    sumsq = l2_f * l2_f
    mean_f = total_f / m
    mean_sq = mean_f * mean_f * m
    if m < 2:
        std_f = 0.0
    elif math.isfinite(total_f) and math.isfinite(sumsq) and sumsq > 0 and mean_sq / sumsq < 0.99:
        std_f = math.sqrt(max(sumsq - mean_sq, 0.0) / (m - 1))
    else:
        std, mean = torch.std_mean(flat)
        std_f, mean_f = float(std), float(mean)
    abs_max = max(abs(lo_f), abs(hi_f))
    saturated = 0.0
    if dtype.is_floating_point:
        limit = torch.finfo(dtype).max
        if abs_max >= limit:
            saturated = int((flat.abs() >= limit).sum()) / n
    return TensorStats(count=n, mean=mean_f, std=std_f, min=lo_f, max=hi_f, abs_max=abs_max, l2_norm=l2_f,
                       nan_count=nan, inf_count=inf, saturated_share=saturated, token_norm_median=med_f,
                       dtype=_dtype_name(dtype))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class Anomaly:
    """One finding: ``kind`` is ``nan``, ``inf``, ``explosion``, ``high_variance``, ``saturation`` or
    ``norm_explosion``; ``hook`` the full hook name; ``description`` one line for people."""

    kind: str
    hook: str
    layer: int | None
    description: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ActivationRecord:
    """Statistics of one hook point in one forward pass, and what is wrong with them."""

    hook: str
    layer: int | None
    point: str
    stats: TensorStats
    anomalies: list[Anomaly] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"hook": self.hook, "layer": self.layer, "point": self.point, "stats": self.stats.to_dict(),
                "anomalies": [a.to_dict() for a in self.anomalies]}


@dataclass
class ActivationTrace:
    """The activation records of one forward pass, in forward order (the seed's ``ModelActivationTrace``)."""

    position: int = 0
    records: list[ActivationRecord] = field(default_factory=list)
    logits_stats: TensorStats | None = None
    has_anomaly: bool = False
    anomaly_desc: str | None = None

    def add(self, record: ActivationRecord) -> None:
        """Add one record (the seed's ``add_layer``); the first anomaly seen becomes the trace's."""
        self.records.append(record)
        if record.anomalies and not self.has_anomaly:
            self.has_anomaly = True
            self.anomaly_desc = record.anomalies[0].description

    @property
    def anomalies(self) -> list[Anomaly]:
        return [a for r in self.records for a in r.anomalies]

    @property
    def layers(self) -> list[int]:
        """Distinct layers recorded, in order."""
        seen: dict[int, None] = {}
        for r in self.records:
            if r.layer is not None:
                seen.setdefault(r.layer, None)
        return list(seen)

    def record(self, layer: int, point: str = RESID_EXPLOSION_POINT) -> ActivationRecord | None:
        for r in self.records:
            if r.layer == layer and r.point == point:
                return r
        return None

    def to_dict(self) -> dict:
        return {"position": self.position, "has_anomaly": self.has_anomaly, "anomaly": self.anomaly_desc,
                "n_layers": len(self.layers), "records": [r.to_dict() for r in self.records],
                "logits_stats": self.logits_stats.to_dict() if self.logits_stats else None}


def detect_anomalies(hook: str, layer: int | None, point: str, stats: TensorStats, previous: TensorStats | None,
                     config) -> list[Anomaly]:
    """The anomalies of one record (rules in the module docstring); ``previous`` is the same point one layer
    earlier, used for the norm-explosion rule at ``resid_post``."""
    out: list[Anomaly] = []
    where = f"{hook}"
    if stats.nan_count:
        out.append(Anomaly("nan", hook, layer, f"NaN detected at {where}: {stats.nan_count} of {stats.count} values"))
    if stats.inf_count:
        out.append(Anomaly("inf", hook, layer, f"Inf detected at {where}: {stats.inf_count} of {stats.count} values"))
    if stats.abs_max > config.explosion_abs:
        out.append(Anomaly("explosion", hook, layer, f"Explosion at {where}: min={stats.min:.2e}, "
                                                     f"max={stats.max:.2e} (|value| > {config.explosion_abs:.0e})"))
    if stats.std > config.explosion_std:
        out.append(Anomaly("high_variance", hook, layer,
                           f"High variance at {where}: std={stats.std:.2e} (> {config.explosion_std:.0e})"))
    if stats.saturated_share > config.saturation_threshold:
        out.append(Anomaly("saturation", hook, layer,
                           f"Saturation at {where}: {100 * stats.saturated_share:.4g}% of values at the "
                           f"{stats.dtype} limit ±{torch.finfo(getattr(torch, stats.dtype)).max:.4g}"))
    if (point == RESID_EXPLOSION_POINT and previous is not None and previous.token_norm_median > 0
            and math.isfinite(stats.token_norm_median)
            and stats.token_norm_median > config.norm_explosion_factor * previous.token_norm_median):
        ratio = stats.token_norm_median / previous.token_norm_median
        out.append(Anomaly("norm_explosion", hook, layer,
                           f"Norm explosion at {where}: median token norm {stats.token_norm_median:.4g} is "
                           f"{ratio:.1f}x the previous layer's {previous.token_norm_median:.4g} "
                           f"(> {config.norm_explosion_factor:g}x)"))
    return out
