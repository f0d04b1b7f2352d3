"""Output-level comparison of a reference model and a quantized variant, as ``llama-perplexity --kl-divergence``.

Every statistic mirrors llama.cpp ``tools/perplexity/perplexity.cpp`` (ggml-org/llama.cpp, read at commit
050fc7f32de16858ac667d775b43a51ed8976e6f): the per-token quantities come from the
``log_softmax(n_vocab, logits, base_log_prob, tok, kl_divergence_result &)`` overload, the summaries from
``kl_divergence()`` and its lambdas ``mean_and_uncertainty``, ``covariance`` and ``percentile``.

Per counted position ``t`` (it predicts ``input_ids[t+1]``; ``base`` is the reference model, ``Q`` the variant)::

    KL_t        = sum_v p_base(v) * (ln p_base(v) - ln p_Q(v))
    nll_base_t  = -ln p_base(x_{t+1}),    nll_Q_t = -ln p_Q(x_{t+1})
    dp_t        = p_Q(x_{t+1}) - p_base(x_{t+1})
    same_top_t  = [argmax_v p_Q(v) == argmax_v p_base(v)]     (first index wins ties, as in the C++ loops)

Summaries over the ``n`` counted tokens (``mean_and_uncertainty(sum, sum2, n)`` in the source)::

    mean(x) = sum x / n,      unc(x) = sqrt((sum x^2 / n - mean(x)^2) / (n - 1))

Differences from llama.cpp, all deliberate:

* llama.cpp stores the base log-probabilities as 16-bit codes over ``[max - 16, max]`` nats and drops KL terms
  with ``ln p_base <= -16``; here both distributions are exact float64 ``log_softmax`` over the full vocabulary.
* llama.cpp zeroes every uncertainty when ``n <= 10`` (and the covariance when ``n < 10``) and prints the final
  statistics only for ``n >= 100``; here the formulas are applied for any ``n``. An uncertainty that divides by
  ``n - 1`` is ``nan`` when ``n == 1``; a non-positive variance gives 0, as in ``mean_and_uncertainty``.
* ``unc(a - b) = sqrt(unc(a)^2 + unc(b)^2 - 2 cov(a, b))`` is evaluated as the uncertainty of the per-token
  differences, which is the same quantity algebraically but cannot go negative from rounding.
* Which tokens count (llama.cpp scores only the second half of each ``n_ctx`` chunk) is the caller's choice here,
  through ``input_ids`` and ``attention_mask``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trace_lib.errors import ResultFormatError, TraceError
from trace_lib.metrics.divergence import kl_from_log_probs

__all__ = [
    "DP_PERCENTILES",
    "KLD_PERCENTILES",
    "OutputComparison",
    "OutputStats",
    "compare_logits",
    "llama_median",
    "llama_percentile",
]

# (key, fraction) in llama.cpp's print order; fraction None marks its separate median formula.
KLD_PERCENTILES: tuple[tuple[str, float | None], ...] = (
    ("max", 1.0),
    ("99.9", 0.999),
    ("99", 0.990),
    ("95", 0.950),
    ("90", 0.900),
    ("median", None),
    ("10", 0.100),
    ("5", 0.050),
    ("1", 0.010),
    ("0.1", 0.001),
    ("min", 0.0),
)
# llama.cpp prints Δp with two more rows, 75 % and 25 %.
DP_PERCENTILES: tuple[tuple[str, float | None], ...] = (
    *KLD_PERCENTILES[:5],
    ("75", 0.750),
    ("median", None),
    ("25", 0.250),
    *KLD_PERCENTILES[6:],
)

# Positions per float64 log_softmax chunk: keeps the float64 working copy near 2**24 elements (128 MiB).
_CHUNK_ELEMENTS = 1 << 24


def llama_percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linear interpolation between order statistics, llama.cpp's ``percentile`` lambda in ``kl_divergence()``.

    ``fraction <= 0`` gives the minimum, ``fraction >= 1`` the maximum; otherwise ``p = fraction * (n - 1)``
    (float32, as the C++ ``float`` arithmetic), ``i = floor(p)``, ``w = p - i`` and the result is
    ``(1 - w) * v[i] + w * v[min(i + 1, n - 1)]``. ``sorted_values`` must be ascending and non-empty.
    """
    n = len(sorted_values)
    if n == 0:
        raise TraceError("no values to take a percentile of: pass at least one value")
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = np.float32(fraction) * np.float32(n - 1)
    ip = int(p)
    w = float(p - np.float32(ip))
    return (1.0 - w) * float(sorted_values[ip]) + w * float(sorted_values[min(ip + 1, n - 1)])


def llama_median(sorted_values: Sequence[float]) -> float:
    """llama.cpp's median (``kld_median`` / ``p_diff_median``): the middle value, or the mean of the two middle ones."""
    n = len(sorted_values)
    if n == 0:
        raise TraceError("no values to take a median of: pass at least one value")
    if n % 2 == 0:
        return 0.5 * (float(sorted_values[n // 2]) + float(sorted_values[n // 2 - 1]))
    return float(sorted_values[n // 2])


def _percentiles(values: torch.Tensor, spec: tuple[tuple[str, float | None], ...]) -> dict[str, float]:
    ordered = values.sort().values.tolist()
    return {
        key: llama_median(ordered) if fraction is None else llama_percentile(ordered, fraction)
        for key, fraction in spec
    }


def _mean_and_uncertainty(x: torch.Tensor) -> tuple[float, float]:
    """``mean_and_uncertainty``: ``f = mean(x)``, ``df = sqrt(var_pop(x) / (n - 1))``; 0 if ``var_pop <= 0``.

    ``var_pop(x) = sum x^2 / n - f^2`` in the source; it is computed here as ``mean((x - f)^2)`` (same value,
    no cancellation). ``n == 1`` gives ``df = nan``; the source's ``n <= 10 -> df = 0`` cutoff is not applied.
    """
    n = x.numel()
    f = float(x.mean())
    var = float(((x - f) ** 2).mean())
    if n < 2:
        return f, math.nan
    return f, math.sqrt(var / (n - 1)) if var > 0 else 0.0


@dataclass
class OutputStats:
    """The ``llama-perplexity --kl-divergence`` statistics of a variant ``Q`` against a reference ``base``.

    Probabilities and Δp are fractions (llama.cpp prints them ×100 as percentages). The correlation is a
    fraction in [-1, 1]. See the module docstring for the per-token definitions and the deviations from the C++.
    """

    n_tokens: int
    # KL(base || Q): mean ± sqrt(var_pop(KL) / (n - 1)) and llama.cpp's percentiles of the per-token values.
    kld_mean: float
    kld_mean_unc: float
    kld_percentiles: dict[str, float]
    # Same top p = n_same_top / n, unc = sqrt(p (1 - p) / (n - 1)).
    same_top_rate: float
    same_top_unc: float
    # Δp = p_Q(x) - p_base(x): mean ± unc, RMS = sqrt(mean(Δp^2)) with unc = 0.5 / RMS * unc(Δp^2).
    dp_mean: float
    dp_mean_unc: float
    dp_rms: float
    dp_rms_unc: float
    dp_percentiles: dict[str, float]
    # PPL = exp(mean nll), unc = PPL * unc(nll).
    ppl_q: float
    ppl_q_unc: float
    ppl_base: float
    ppl_base_unc: float
    # ln(PPL(Q)/PPL(base)) = mean(nll_Q) - mean(nll_base), unc = sqrt(u_Q^2 + u_base^2 - 2 cov).
    ln_ppl_ratio_mean: float
    ln_ppl_ratio_unc: float
    # PPL(Q)/PPL(base) = exp(ln ratio), unc = ratio * unc(ln ratio).
    ppl_ratio: float
    ppl_ratio_unc: float
    # PPL(Q) - PPL(base), unc = sqrt(ppl_q_unc^2 + ppl_base_unc^2 - 2 PPL(Q) PPL(base) cov).
    ppl_diff: float
    ppl_diff_unc: float
    # Cor(ln PPL(Q), ln PPL(base)) = cov / (u_Q u_base): the Pearson correlation of per-token NLLs.
    ln_prob_correlation: float

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of every field (the percentile dicts copied)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutputStats:
        """Rebuild from :meth:`to_dict` output; ``None`` reads as ``nan`` (for JSON writers without NaN)."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(d))
        unknown = sorted(set(d) - names)
        if missing or unknown:
            raise ResultFormatError(
                f"not an OutputStats record (missing {missing}, unknown {unknown}): "
                "pass a dict written by OutputStats.to_dict"
            )

        def num(v: Any) -> float:
            return math.nan if v is None else float(v)

        kwargs: dict[str, Any] = {}
        for name in names:
            value = d[name]
            if name == "n_tokens":
                kwargs[name] = int(value)
            elif name.endswith("_percentiles"):
                kwargs[name] = {str(k): num(v) for k, v in value.items()}
            else:
                kwargs[name] = num(value)
        return cls(**kwargs)

    def summary(self) -> str:
        """Multi-line text with llama.cpp's labels and number formats (values ×100 where it prints percent)."""
        k, dp = self.kld_percentiles, self.dp_percentiles
        lines = [
            f"tokens: {self.n_tokens}",
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {self.ppl_q:10.6f} ± {self.ppl_q_unc:10.6f}",
            f"Mean PPL(base)                : {self.ppl_base:10.6f} ± {self.ppl_base_unc:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100.0 * self.ln_prob_correlation:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {self.ln_ppl_ratio_mean:10.6f} ± {self.ln_ppl_ratio_unc:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {self.ppl_ratio:10.6f} ± {self.ppl_ratio_unc:10.6f}",
            f"Mean PPL(Q)-PPL(base)         : {self.ppl_diff:10.6f} ± {self.ppl_diff_unc:10.6f}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {self.kld_mean:10.6f} ± {self.kld_mean_unc:10.6f}",
        ]
        labels = {"max": "Maximum", "median": "Median ", "min": "Minimum"}
        for key in k:
            label = labels[key] if key in labels else f"{float(key):4.1f}%  "
            lines.append(f"{label} KLD: {k[key]:10.6f}")
        lines += ["", "====== Token probability statistics ======"]
        lines.append(f"Mean    Δp: {100.0 * self.dp_mean:6.3f} ± {100.0 * self.dp_mean_unc:5.3f} %")
        for key in dp:
            label = labels[key] if key in labels else f"{float(key):4.1f}%  "
            lines.append(f"{label} Δp: {100.0 * dp[key]:6.3f}%")
        lines.append(f"RMS Δp    : {100.0 * self.dp_rms:6.3f} ± {100.0 * self.dp_rms_unc:5.3f} %")
        lines.append(f"Same top p: {100.0 * self.same_top_rate:6.3f} ± {100.0 * self.same_top_unc:5.3f} %")
        return "\n".join(lines)


class OutputComparison:
    """Streaming accumulator of per-token KL, NLLs, next-token probabilities and top-1 agreement.

    Memory is O(counted tokens): each :meth:`update` reduces the logits to six scalars per counted position.
    """

    def __init__(self) -> None:
        self._n_updates = 0
        self._kld: list[torch.Tensor] = []
        self._nll_ref: list[torch.Tensor] = []
        self._nll_q: list[torch.Tensor] = []
        self._p_ref: list[torch.Tensor] = []
        self._p_q: list[torch.Tensor] = []
        self._same_top: list[torch.Tensor] = []

    @property
    def n_tokens(self) -> int:
        """Counted positions so far."""
        return sum(t.numel() for t in self._kld)

    @torch.no_grad()
    def update(
        self,
        ref_logits: torch.Tensor,
        var_logits: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        """Add one batch: logits ``[B, T, V]``, ``input_ids`` and ``attention_mask`` ``[B, T]``.

        Position ``t`` predicts ``input_ids[:, t + 1]`` and counts only if positions ``t`` and ``t + 1`` are both
        unmasked. Logits are taken to float64 and normalised with ``log_softmax``; only counted positions are
        read (padding may hold anything) and NaN/Inf there raises :class:`TraceError`. A failed call adds nothing.
        """
        batch_index = self._n_updates
        self._n_updates += 1
        _check_shapes(ref_logits, var_logits, input_ids, attention_mask)
        b, t, v = ref_logits.shape
        if t < 2:
            return
        mask = (
            torch.ones(b, t, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.detach().cpu() != 0
        )
        valid = mask[:, :-1] & mask[:, 1:]
        ids = input_ids.detach().cpu().long()
        chunk = max(1, _CHUNK_ELEMENTS // v)
        device = ref_logits.device
        parts: list[tuple[torch.Tensor, ...]] = []
        for row in range(b):
            positions = valid[row].nonzero().flatten()
            for pos in positions.split(chunk):
                if pos.numel() == 0:
                    continue
                targets = ids[row, pos + 1]
                if int(targets.min()) < 0 or int(targets.max()) >= v:
                    raise TraceError(
                        f"token id out of range [0, {v}) in batch index {batch_index}, row {row}: "
                        "input_ids must be the tokens both models were run on"
                    )
                ref = ref_logits[row, pos.to(device)].to(torch.float64)
                var = var_logits[row, pos.to(var_logits.device)].to(device=device, dtype=torch.float64)
                _check_finite(ref, var, pos, batch_index, row)
                parts.append(_per_token(ref, var, targets.to(device)))
        if not parts:
            return
        kld, nll_ref, nll_q, p_ref, p_q, same_top = (torch.cat(col) for col in zip(*parts, strict=True))
        self._kld.append(kld)
        self._nll_ref.append(nll_ref)
        self._nll_q.append(nll_q)
        self._p_ref.append(p_ref)
        self._p_q.append(p_q)
        self._same_top.append(same_top)

    def result(self) -> OutputStats:
        """The llama.cpp ``kl_divergence()`` summary over every token added so far."""
        if not self._kld:
            raise TraceError(
                "no tokens to compare: every position was masked or sequences had fewer than 2 tokens; "
                "pass sequences with at least two consecutive unmasked tokens"
            )
        kld = torch.cat(self._kld)
        nll_ref = torch.cat(self._nll_ref)
        nll_q = torch.cat(self._nll_q)
        dp = torch.cat(self._p_q) - torch.cat(self._p_ref)
        same_top = torch.cat(self._same_top)
        n = kld.numel()

        kld_mean, kld_unc = _mean_and_uncertainty(kld)

        # Same top p = n_same/n ± sqrt(p (1 - p) / (n - 1))
        same = int(same_top.sum()) / n
        same_unc = math.sqrt(same * (1.0 - same) / (n - 1)) if n > 1 else math.nan

        # Mean Δp ± unc; RMS Δp = sqrt(mse), mse = mean_and_uncertainty(sum Δp^2, sum Δp^4),
        # rms_unc = 0.5 / rms * mse_unc (0 when every Δp is 0, where the source's 0.5/0 * 0 is nan).
        dp_mean, dp_unc = _mean_and_uncertainty(dp)
        mse, mse_unc = _mean_and_uncertainty(dp * dp)
        rms = math.sqrt(mse)
        if rms > 0:
            rms_unc = 0.5 / rms * mse_unc
        else:
            rms_unc = 0.0 if mse_unc == 0.0 else math.nan

        # ln PPL = mean nll ± unc; PPL = exp(ln PPL), ppl_unc = PPL * unc(ln PPL).
        log_ppl_q, log_ppl_q_unc = _mean_and_uncertainty(nll_q)
        log_ppl_b, log_ppl_b_unc = _mean_and_uncertainty(nll_ref)
        ppl_q, ppl_b = math.exp(log_ppl_q), math.exp(log_ppl_b)
        ppl_q_unc, ppl_b_unc = ppl_q * log_ppl_q_unc, ppl_b * log_ppl_b_unc

        # covariance(): cov = (sum ab / n - mean a * mean b) / (n - 1); Cor = cov / (u_Q u_base).
        if n > 1 and log_ppl_q_unc > 0 and log_ppl_b_unc > 0:
            cov = float(((nll_q - log_ppl_q) * (nll_ref - log_ppl_b)).mean()) / (n - 1)
            cor = cov / (log_ppl_q_unc * log_ppl_b_unc)
        else:
            cor = math.nan

        # ln ratio = ln PPL(Q) - ln PPL(base), unc = sqrt(u_Q^2 + u_b^2 - 2 cov) = unc(nll_Q - nll_base).
        ln_ratio = log_ppl_q - log_ppl_b
        _, ln_ratio_unc = _mean_and_uncertainty(nll_q - nll_ref)
        ratio = math.exp(ln_ratio)
        ratio_unc = ratio * ln_ratio_unc

        # PPL diff unc = sqrt(ppl_q_unc^2 + ppl_b_unc^2 - 2 PPL(Q) PPL(base) cov)
        #              = unc(PPL(Q) nll_Q - PPL(base) nll_base)   (delta method, same algebra).
        _, diff_unc = _mean_and_uncertainty(ppl_q * nll_q - ppl_b * nll_ref)

        return OutputStats(
            n_tokens=n,
            kld_mean=kld_mean,
            kld_mean_unc=kld_unc,
            kld_percentiles=_percentiles(kld, KLD_PERCENTILES),
            same_top_rate=same,
            same_top_unc=same_unc,
            dp_mean=dp_mean,
            dp_mean_unc=dp_unc,
            dp_rms=rms,
            dp_rms_unc=rms_unc,
            dp_percentiles=_percentiles(dp, DP_PERCENTILES),
            ppl_q=ppl_q,
            ppl_q_unc=ppl_q_unc,
            ppl_base=ppl_b,
            ppl_base_unc=ppl_b_unc,
            ln_ppl_ratio_mean=ln_ratio,
            ln_ppl_ratio_unc=ln_ratio_unc,
            ppl_ratio=ratio,
            ppl_ratio_unc=ratio_unc,
            ppl_diff=ppl_q - ppl_b,
            ppl_diff_unc=diff_unc,
            ln_prob_correlation=cor,
        )


def compare_logits(
    ref_logits: torch.Tensor,
    var_logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> OutputStats:
    """One-shot :class:`OutputComparison`: ``update`` once, then ``result``."""
    acc = OutputComparison()
    acc.update(ref_logits, var_logits, input_ids, attention_mask)
    return acc.result()


def _per_token(ref: torch.Tensor, var: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-position scalars from float64 logits ``[N, V]``, as the ``log_softmax(..., kl_divergence_result &)``
    overload: KL = sum_v p_base (ln p_base - ln p_Q), nll = -ln p(x), p = exp(-nll), top-1 agreement.

    Bitwise-equal inputs go through the same ``log_softmax`` and give exactly 0 KL (no clamping, as in the C++).
    """
    lp_ref = torch.log_softmax(ref, dim=-1)
    lp_q = torch.log_softmax(var, dim=-1)
    kld = kl_from_log_probs(lp_ref, lp_q)
    idx = targets.unsqueeze(-1)
    lp_ref_t = lp_ref.gather(-1, idx).squeeze(-1)
    lp_q_t = lp_q.gather(-1, idx).squeeze(-1)
    same_top = ref.argmax(dim=-1) == var.argmax(dim=-1)
    return tuple(x.cpu() for x in (kld, -lp_ref_t, -lp_q_t, lp_ref_t.exp(), lp_q_t.exp(), same_top))


def _check_shapes(
    ref_logits: torch.Tensor,
    var_logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> None:
    if ref_logits.dim() != 3:
        raise TraceError(f"reference logits must be [batch, seq, vocab], got shape {tuple(ref_logits.shape)}")
    if var_logits.shape != ref_logits.shape:
        raise TraceError(
            f"variant logits {tuple(var_logits.shape)} differ in shape from reference logits "
            f"{tuple(ref_logits.shape)}: run both models on the same tokens with the same vocabulary"
        )
    if tuple(input_ids.shape) != tuple(ref_logits.shape[:2]):
        raise TraceError(
            f"input_ids {tuple(input_ids.shape)} must be [batch, seq] = {tuple(ref_logits.shape[:2])}"
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise TraceError(
            f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
        )
    if not (ref_logits.is_floating_point() and var_logits.is_floating_point()):
        raise TraceError("logits must be a floating-point tensor")


def _check_finite(
    ref: torch.Tensor, var: torch.Tensor, pos: torch.Tensor, batch_index: int, row: int
) -> None:
    bad = [
        (name, x) for name, x in (("reference", ref), ("variant", var)) if not bool(torch.isfinite(x).all())
    ]
    if not bad:
        return
    names = " and ".join(name for name, _ in bad)
    first = int(pos[(~torch.isfinite(bad[0][1])).any(dim=-1).nonzero()[0, 0].cpu()])
    raise TraceError(
        f"NaN/Inf in {names} logits at batch index {batch_index} (update call {batch_index + 1}), row {row}, "
        f"position {first}: check that model's dtype and quantization (e.g. float16 overflow)"
    )
