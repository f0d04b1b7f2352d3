"""Quantization error per layer: the reference and its variant on the same input ids (the seed's MLT-04).

Both models run the same tokens; ``resid_post`` is captured at every layer in both. With ``a`` the
reference's activations and ``b`` the variant's, over the real (unpadded) tokens, flattened:

- cosine = <a, b> / (||a|| ||b||) (exactly 1 when b == a);
- relative L2 error = ||a - b|| / ||a||;
- SNR (dB) = 10 log10(||a||^2 / ||a - b||^2) = -20 log10(relative L2 error); infinite when b == a (``None`` in
  JSON, with ``identical: true``);
- MSE = mean (a - b)^2 and max |a - b| (the seed's other two numbers).

The same numbers are computed per token (over the model width), which locates *where* the variant starts to
diverge: :attr:`QuantErrorTrace.first_divergence` is the earliest layer with a token over the warning
thresholds, and the earliest such token in it.

Levels (per layer, and per token for the first divergence):

- **critical**: cosine < 0.9 or SNR < 10 dB (relative error above 0.32: the error is a third of the signal);
- **warning**: cosine < 0.99 or SNR < 20 dB (relative error above 0.1);
- **ok** otherwise.

Why these and not the seed's (warning 0.99 < cos <= 0.995, critical cos < 0.99): the seed compares single
operations (one matmul, one norm), where 0.99 is already poor. trace compares the residual stream, which
accumulates every earlier layer's error. Measured on SmolLM2-135M-Instruct (13-token prompt, ``resid_post``
at its 30 layers): int8-rtn-g32 stays under 0.03 relative error (cosine above 0.9996) everywhere: no finding;
int4-rtn-g32 sits at 0.10-0.23 relative error (SNR 13-20 dB) in layers 0-27 and at 0.42-0.50 in the last two:
28 warnings, 2 criticals; gguf-q4_0: 23 warnings, 1 critical; int2-rtn-g32 is above 0.5 relative error at
every layer: 30 criticals. The seed's cosine cut-offs would call int4 and int2 alike critical. 20 and 10 dB
are the usual "error a tenth" and "error a third of the signal" ratios. All four values are fields of
:class:`~trace_lib.tracer.ModelTracerConfig`.

The flattened numbers weigh tokens by their norm, so a model's massive-activation token (SmolLM2's first
token carries most of the residual norm from block 11 on) dominates them; ``median_token_rel_l2`` and the
per-token lists give every token the same weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from trace_lib.capture.hooks import HookConfig, HookManager
from trace_lib.jsonutil import json_float
from trace_lib.metrics.divergence import kl_divergence
from trace_lib.models.device import model_device, to_device


@dataclass
class LayerQuantError:
    """Reference-vs-variant error at one hook point (the seed's ``QuantizationErrorTrace``)."""

    layer: int
    hook: str
    cosine: float
    rel_l2: float
    snr_db: float
    mse: float
    max_abs_error: float
    n_tokens: int
    level: str = "ok"
    token_cosine: list[list[float]] = field(default_factory=list)
    token_rel_l2: list[list[float]] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.rel_l2 == 0.0

    @property
    def median_token_rel_l2(self) -> float | None:
        """Median over real tokens of the per-token relative error: every token weighs the same."""
        vals = sorted(x for row in self.token_rel_l2 for x in row)
        if not vals:
            return None
        mid = len(vals) // 2
        return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2

    @property
    def worst_token(self) -> dict | None:
        """The real token with the largest relative error: batch row, index among the row's real tokens."""
        best = None
        for b, row in enumerate(self.token_rel_l2):
            for i, x in enumerate(row):
                key = math.inf if x != x else x
                if best is None or key > best[0]:
                    best = (key, b, i, x)
        return None if best is None else {"batch_index": best[1], "token_index": best[2], "rel_l2": json_float(best[3])}

    def is_warning(self) -> bool:
        return self.level == "warning"

    def is_critical(self) -> bool:
        return self.level == "critical"

    def to_dict(self) -> dict:
        return {"layer": self.layer, "hook": self.hook, "cosine": json_float(self.cosine),
                "rel_l2": json_float(self.rel_l2), "snr_db": json_float(self.snr_db), "identical": self.identical,
                "mse": json_float(self.mse), "max_abs_error": json_float(self.max_abs_error),
                "n_tokens": self.n_tokens, "level": self.level,
                "median_token_rel_l2": json_float(self.median_token_rel_l2), "worst_token": self.worst_token,
                "token_cosine": [[json_float(x) for x in row] for row in self.token_cosine],
                "token_rel_l2": [[json_float(x) for x in row] for row in self.token_rel_l2]}


@dataclass
class QuantErrorTrace:
    """Per-layer error of a variant against its reference on one input (the seed's ``ModelQuantizationError``)."""

    reference: str = ""
    variant: str = ""
    layers: list[LayerQuantError] = field(default_factory=list)
    logits_cosine: float | None = None
    output_kl_divergence: float | None = None
    top1_agreement: float | None = None
    thresholds: dict = field(default_factory=dict)
    tokens: list[list[str]] = field(default_factory=list)

    def add_error(self, err: LayerQuantError) -> None:
        self.layers.append(err)

    def warning_count(self) -> int:
        return sum(e.is_warning() for e in self.layers)

    def critical_count(self) -> int:
        return sum(e.is_critical() for e in self.layers)

    def worst_layer(self) -> LayerQuantError | None:
        return min(self.layers, key=lambda e: e.cosine if e.cosine == e.cosine else -math.inf, default=None)

    def first_divergent_layer(self) -> int | None:
        """The first layer whose level is not ok."""
        return next((e.layer for e in self.layers if e.level != "ok"), None)

    @property
    def first_divergence(self) -> dict | None:
        """The earliest (layer, token) whose per-token error is over a warning threshold, or None."""
        th = self.thresholds
        for e in self.layers:
            for b, (cos_row, rel_row) in enumerate(zip(e.token_cosine, e.token_rel_l2)):
                for i, (c, r) in enumerate(zip(cos_row, rel_row)):
                    if level_of(c, _snr(r), th) != "ok":
                        tok = self.tokens[b][i] if b < len(self.tokens) and i < len(self.tokens[b]) else None
                        return {"layer": e.layer, "hook": e.hook, "batch_index": b, "token_index": i, "token": tok,
                                "cosine": json_float(c), "rel_l2": json_float(r), "snr_db": json_float(_snr(r))}
        return None

    def to_dict(self) -> dict:
        return {"reference": self.reference, "variant": self.variant, "thresholds": self.thresholds,
                "warnings": self.warning_count(), "criticals": self.critical_count(),
                "first_divergent_layer": self.first_divergent_layer(), "first_divergence": self.first_divergence,
                "logits_cosine": json_float(self.logits_cosine),
                "output_kl_divergence": json_float(self.output_kl_divergence),
                "top1_agreement": json_float(self.top1_agreement), "tokens": self.tokens,
                "layers": [e.to_dict() for e in self.layers]}


def thresholds_of(config) -> dict:
    return {"warning_cosine": config.quant_warning_cosine, "warning_snr_db": config.quant_warning_snr_db,
            "critical_cosine": config.quant_critical_cosine, "critical_snr_db": config.quant_critical_snr_db}


def _snr(rel: float) -> float:
    if rel != rel:
        return math.nan
    return math.inf if rel == 0.0 else -20.0 * math.log10(rel)


def level_of(cos: float, snr: float, th: dict) -> str:
    """``critical``, ``warning`` or ``ok`` for a cosine and an SNR (dB) under thresholds ``th``; NaN is critical."""
    if cos != cos or snr != snr:  # NaN: the variant's numbers broke
        return "critical"
    if cos < th["critical_cosine"] or snr < th["critical_snr_db"]:
        return "critical"
    if cos < th["warning_cosine"] or snr < th["warning_snr_db"]:
        return "warning"
    return "ok"


def layer_error(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None, layer: int, hook: str,
                thresholds: dict) -> LayerQuantError:
    """Error of ``b`` (variant) against ``a`` (reference), both [batch, seq, d]; ``mask`` [batch, seq] or None."""
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    if mask is None:
        mask = torch.ones(a.shape[:2], dtype=torch.bool)
    mask = mask.bool().cpu()
    d = b - a
    # Per token (over the width), real tokens only, one list per batch row.
    ta, tb, td = (torch.linalg.vector_norm(x, dim=-1) for x in (a, b, d))
    tdot = (a * b).sum(-1)
    denom = ta * tb
    tcos = torch.where(td == 0, torch.ones_like(tdot),
                       torch.where(denom > 0, tdot / denom.clamp_min(1e-300), torch.zeros_like(tdot)))
    trel = torch.where(td == 0, torch.zeros_like(td), td / ta)
    token_cosine = [tcos[i][mask[i]].tolist() for i in range(a.shape[0])]
    token_rel = [trel[i][mask[i]].tolist() for i in range(a.shape[0])]
    av, bv, dv = a[mask], b[mask], d[mask]
    n = int(mask.sum())
    na, nb, nd = (float(torch.linalg.vector_norm(x)) for x in (av, bv, dv))
    if nd == 0.0:
        cos, rel, snr = 1.0, 0.0, math.inf
    else:
        cos = float((av * bv).sum()) / (na * nb) if na > 0 and nb > 0 else 0.0
        rel = nd / na if na > 0 else math.inf
        snr = _snr(rel)
    mse = float(dv.pow(2).mean()) if dv.numel() else 0.0
    max_abs = float(dv.abs().max()) if dv.numel() else 0.0
    return LayerQuantError(layer=layer, hook=hook, cosine=cos, rel_l2=rel, snr_db=snr, mse=mse, max_abs_error=max_abs,
                           n_tokens=n, level=level_of(cos, snr, thresholds), token_cosine=token_cosine,
                           token_rel_l2=token_rel)


def capture_resid(loaded, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                  ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """resid_post at every layer (float32 CPU) and the logits of one forward pass of ``loaded``; NaN is kept,
    not raised, so a broken variant is measured rather than refused."""
    hm = HookManager(loaded, HookConfig(hook_points=["resid_post"], check_finite=False))
    inputs = to_device({"input_ids": input_ids, "attention_mask": attention_mask}, model_device(loaded.model))
    with torch.no_grad(), hm.capture():
        out = loaded.model(**inputs, use_cache=False)
    acts = {i: hm.get_activations("resid_post", layer=i) for i in range(loaded.n_layers)}
    return acts, out.logits.detach().float().cpu()


def logits_cosine_kl_top1(ref_logits: torch.Tensor, var_logits: torch.Tensor, mask: torch.Tensor | None
                    ) -> tuple[float, float, float]:
    """Cosine of the logits, mean KL(p_ref || p_var) in nats and top-1 agreement, over real tokens."""
    r, v = ref_logits.double(), var_logits.double()
    if mask is not None:
        r, v = r[mask.bool().cpu()], v[mask.bool().cpu()]
    else:
        r, v = r.reshape(-1, r.shape[-1]), v.reshape(-1, v.shape[-1])
    cos = float((r * v).sum() / (r.norm() * v.norm())) if torch.equal(r, v) is False else 1.0
    kl = float(kl_divergence(r, v, dtype=torch.float64).clamp_min(0).mean())
    agree = float((r.argmax(-1) == v.argmax(-1)).double().mean())
    return cos, kl, agree


def quant_error_trace(reference, variant_acts: dict[int, torch.Tensor], variant_logits: torch.Tensor,
                      input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config, variant_name: str = "",
                      decode=None) -> QuantErrorTrace:
    """Run ``reference`` on ``input_ids`` and compare with the variant's captured ``resid_post`` and logits."""
    th = thresholds_of(config)
    ref_acts, ref_logits = capture_resid(reference, input_ids, attention_mask)
    mask = attention_mask.bool().cpu() if attention_mask is not None else None
    trace = QuantErrorTrace(reference=reference.name, variant=variant_name, thresholds=th)
    for layer in sorted(variant_acts):
        trace.add_error(layer_error(ref_acts[layer], variant_acts[layer], mask, layer,
                                    f"blocks.{layer}.hook_resid_post", th))
    trace.logits_cosine, trace.output_kl_divergence, trace.top1_agreement = logits_cosine_kl_top1(
        ref_logits, variant_logits, mask)
    if decode is not None:
        ids = input_ids.cpu()
        m = mask if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        trace.tokens = [[decode(int(t)) for t in ids[i][m[i]]] for i in range(ids.shape[0])]
    return trace
