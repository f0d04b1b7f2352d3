"""Tests for trace_lib.metrics.outputs against hand-computed llama.cpp ``--kl-divergence`` statistics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from trace_lib.errors import ResultFormatError, TraceError
from trace_lib.metrics.outputs import (
    DP_PERCENTILES,
    KLD_PERCENTILES,
    OutputComparison,
    OutputStats,
    compare_logits,
    llama_median,
    llama_percentile,
)

LN2 = math.log(2.0)


def logits_from_probs(rows: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly the given probability rows: ln p."""
    return torch.tensor([[math.log(p) for p in row] for row in rows], dtype=torch.float64).unsqueeze(0)


# Two counted tokens, vocab 3. input_ids = [0, 1, 2]: position 0 predicts id 1, position 1 predicts id 2;
# position 2 has no next token, so its logits (here NaN) are never read.
REF_PROBS = [[0.50, 0.25, 0.25], [0.2, 0.3, 0.5]]
VAR_PROBS = [[0.25, 0.50, 0.25], [0.1, 0.3, 0.6]]


@pytest.fixture
def two_token_stats() -> OutputStats:
    nan_row = torch.full((1, 1, 3), math.nan, dtype=torch.float64)
    ref = torch.cat([logits_from_probs(REF_PROBS), nan_row], dim=1)
    var = torch.cat([logits_from_probs(VAR_PROBS), nan_row], dim=1)
    return compare_logits(ref, var, torch.tensor([[0, 1, 2]]))


def test_two_token_hand_example(two_token_stats: OutputStats) -> None:
    s = two_token_stats
    assert s.n_tokens == 2

    # KL_0 = .5 ln(.5/.25) + .25 ln(.25/.5) + .25 ln(1) = .5 ln2 - .25 ln2 = .25 ln2
    # KL_1 = .2 ln(.2/.1) + .3 ln(1) + .5 ln(.5/.6)     = .2 ln2 + .5 ln(5/6)
    kl0 = 0.25 * LN2
    kl1 = 0.2 * LN2 + 0.5 * math.log(5 / 6)
    assert s.kld_mean == pytest.approx((kl0 + kl1) / 2, abs=1e-12)
    # n = 2: var_pop = ((kl0 - kl1) / 2)^2, unc = sqrt(var_pop / (2 - 1)) = |kl0 - kl1| / 2
    assert s.kld_mean_unc == pytest.approx(abs(kl0 - kl1) / 2, abs=1e-12)
    assert s.kld_percentiles["max"] == pytest.approx(kl0, abs=1e-12)
    assert s.kld_percentiles["min"] == pytest.approx(kl1, abs=1e-12)
    assert s.kld_percentiles["median"] == pytest.approx((kl0 + kl1) / 2, abs=1e-12)
    # 90 %: p = 0.9f * (2 - 1) = 0.9 (float32: 0.899999976), i = 0, w = 0.9 -> 0.1 kl1 + 0.9 kl0
    assert s.kld_percentiles["90"] == pytest.approx(0.1 * kl1 + 0.9 * kl0, abs=1e-7)

    # Top-1: position 0 ref argmax 0, variant argmax 1 (differ); position 1 both argmax 2. p = 1/2,
    # unc = sqrt(.5 * .5 / (2 - 1)) = .5
    assert s.same_top_rate == 0.5
    assert s.same_top_unc == pytest.approx(0.5)

    # Δp_0 = p_Q(1) - p_base(1) = .5 - .25 = .25;  Δp_1 = p_Q(2) - p_base(2) = .6 - .5 = .1
    assert s.dp_mean == pytest.approx(0.175, abs=1e-12)
    assert s.dp_mean_unc == pytest.approx(0.075, abs=1e-12)  # |.25 - .1| / 2
    # mse = (.0625 + .01) / 2 = .03625; unc(mse) = |.0625 - .01| / 2 = .02625; rms_unc = .5 / rms * .02625
    assert s.dp_rms == pytest.approx(math.sqrt(0.03625), abs=1e-12)
    assert s.dp_rms_unc == pytest.approx(0.5 / math.sqrt(0.03625) * 0.02625, abs=1e-12)
    assert s.dp_percentiles["max"] == pytest.approx(0.25, abs=1e-12)
    assert s.dp_percentiles["min"] == pytest.approx(0.1, abs=1e-12)
    # 75 %: p = 0.75 exactly, w = .75 -> .25 * .1 + .75 * .25 = .2125
    assert s.dp_percentiles["75"] == pytest.approx(0.2125, abs=1e-12)

    # NLLs: base [ln4, ln2], Q [ln2, ln(5/3)]
    # PPL(base) = exp((ln4 + ln2) / 2) = sqrt(8); PPL(Q) = exp((ln2 + ln(5/3)) / 2) = sqrt(10/3)
    u_b = abs(math.log(4) - LN2) / 2  # = ln2 / 2
    u_q = abs(LN2 - math.log(5 / 3)) / 2  # = ln(1.2) / 2
    assert s.ppl_base == pytest.approx(math.sqrt(8), abs=1e-12)
    assert s.ppl_q == pytest.approx(math.sqrt(10 / 3), abs=1e-12)
    assert s.ppl_base_unc == pytest.approx(math.sqrt(8) * u_b, abs=1e-12)
    assert s.ppl_q_unc == pytest.approx(math.sqrt(10 / 3) * u_q, abs=1e-12)
    # Both NLL sequences decrease from token 0 to token 1: two points on a rising line, Cor = +1
    assert s.ln_prob_correlation == pytest.approx(1.0, abs=1e-12)
    # ln ratio = ln(sqrt(10/3) / sqrt(8)) = .5 ln(5/12); with Cor = 1, cov = u_q u_b and
    # unc = sqrt(u_q^2 + u_b^2 - 2 u_q u_b) = |u_q - u_b| = (ln2 - ln1.2) / 2 = ln(5/3) / 2
    assert s.ln_ppl_ratio_mean == pytest.approx(0.5 * math.log(5 / 12), abs=1e-12)
    assert s.ln_ppl_ratio_unc == pytest.approx(math.log(5 / 3) / 2, abs=1e-12)
    assert s.ppl_ratio == pytest.approx(math.sqrt(5 / 12), abs=1e-12)
    assert s.ppl_ratio_unc == pytest.approx(math.sqrt(5 / 12) * math.log(5 / 3) / 2, abs=1e-12)
    # diff unc = sqrt(P_q^2 u_q^2 + P_b^2 u_b^2 - 2 P_q P_b u_q u_b) = |P_q u_q - P_b u_b|
    assert s.ppl_diff == pytest.approx(math.sqrt(10 / 3) - math.sqrt(8), abs=1e-12)
    assert s.ppl_diff_unc == pytest.approx(abs(math.sqrt(10 / 3) * u_q - math.sqrt(8) * u_b), abs=1e-12)


def test_correlation_three_tokens() -> None:
    # Target probabilities: base [1/2, 1/4, 1/8], Q [1/4, 1/2, 1/8] -> NLLs ln2 * [1, 2, 3] and ln2 * [2, 1, 3].
    # Pearson([1,2,3], [2,1,3]): deviations [-1,0,1], [0,-1,1]; sum of products 1, sums of squares 2 and 2
    # -> r = 1 / sqrt(2 * 2) = 0.5
    def row(p_target: float, target: int) -> list[float]:
        rest = (1 - p_target) / 2
        return [p_target if v == target else rest for v in range(3)]

    ids = [0, 1, 2, 0]
    targets = ids[1:]
    ref = logits_from_probs([row(p, t) for p, t in zip([1 / 2, 1 / 4, 1 / 8], targets, strict=True)])
    var = logits_from_probs([row(p, t) for p, t in zip([1 / 4, 1 / 2, 1 / 8], targets, strict=True)])
    pad = torch.zeros(1, 1, 3, dtype=torch.float64)
    s = compare_logits(torch.cat([ref, pad], 1), torch.cat([var, pad], 1), torch.tensor([ids]))
    assert s.ln_prob_correlation == pytest.approx(0.5, abs=1e-12)
    # u = sqrt(var_pop / (n - 1)): var_pop of ln2 * [1,2,3] is ln2^2 * 2/3 -> u = ln2 / sqrt(3) for both
    assert s.ppl_base_unc == pytest.approx(s.ppl_base * LN2 / math.sqrt(3), abs=1e-12)
    # ln ratio: differences Q - base = ln2 * [1, -1, 0], mean 0, var_pop ln2^2 * 2/3 -> unc ln2 / sqrt(3)
    assert s.ln_ppl_ratio_mean == pytest.approx(0.0, abs=1e-12)
    assert s.ln_ppl_ratio_unc == pytest.approx(LN2 / math.sqrt(3), abs=1e-12)


def test_percentile_rule_hand_example() -> None:
    v = [1.0, 2.0, 4.0, 8.0, 16.0]
    # p = fraction * (5 - 1); i = floor(p); w = p - i; (1 - w) v[i] + w v[i + 1]
    assert llama_percentile(v, 0.9) == pytest.approx(0.4 * 8 + 0.6 * 16, abs=1e-5)  # p = 3.6 -> 12.8
    assert llama_percentile(v, 0.1) == pytest.approx(0.6 * 1 + 0.4 * 2, abs=1e-5)  # p = 0.4 -> 1.4
    assert llama_percentile(v, 0.999) == pytest.approx(0.004 * 8 + 0.996 * 16, abs=1e-5)  # p = 3.996
    assert llama_percentile(v, 0.5) == 4.0  # p = 2 exactly
    assert llama_percentile(v, 0.0) == 1.0
    assert llama_percentile(v, 1.0) == 16.0
    assert llama_median(v) == 4.0
    assert llama_median([1.0, 2.0, 4.0, 8.0]) == 3.0  # even n: mean of the two middle values
    # The rule is linear interpolation at fraction * (n - 1), numpy's default "linear" method
    rng = np.random.default_rng(0)
    data = np.sort(rng.standard_normal(1001))
    for _, fraction in KLD_PERCENTILES:
        if fraction is not None:
            assert llama_percentile(data.tolist(), fraction) == pytest.approx(
                np.percentile(data, 100 * fraction), abs=1e-4
            )


def test_masking_excludes_padded_positions() -> None:
    torch.manual_seed(0)
    ref = torch.randn(1, 5, 7)
    var = ref + 0.5 * torch.randn(1, 5, 7)
    ids = torch.randint(0, 7, (1, 5))
    alone = compare_logits(ref, var, ids)

    # Row 0: the same 5 tokens right-padded to 8; row 1: left-padded. Padding logits are NaN and never read.
    def padded(x: torch.Tensor, fill: float, left: bool) -> torch.Tensor:
        pad = torch.full((1, 3, *x.shape[2:]), fill, dtype=x.dtype)
        return torch.cat([pad, x] if left else [x, pad], dim=1)

    ref2 = torch.cat([padded(ref, math.nan, False), padded(ref, math.nan, True)])
    var2 = torch.cat([padded(var, math.nan, False), padded(var, math.nan, True)])
    ids2 = torch.cat([padded(ids, 0, False), padded(ids, 0, True)]).long()
    mask_row = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    mask2 = torch.cat([mask_row, mask_row.flip(1)])
    both = compare_logits(ref2, var2, ids2, mask2)

    assert alone.n_tokens == 4  # 5 tokens -> 4 predictions
    assert both.n_tokens == 8  # 4 per row, none from padding
    assert both.kld_mean == pytest.approx(alone.kld_mean, abs=1e-12)
    assert both.same_top_rate == pytest.approx(alone.same_top_rate)
    assert both.ppl_q == pytest.approx(alone.ppl_q, abs=1e-12)
    assert both.kld_percentiles["max"] == pytest.approx(alone.kld_percentiles["max"], abs=1e-12)


def test_identical_logits_give_perfect_score() -> None:
    torch.manual_seed(1)
    ref = torch.randn(3, 20, 11, dtype=torch.bfloat16)
    ids = torch.randint(0, 11, (3, 20))
    s = compare_logits(ref, ref.clone(), ids)
    assert s.n_tokens == 57
    assert s.kld_mean == 0.0
    assert s.kld_mean_unc == 0.0
    assert all(v == 0.0 for v in s.kld_percentiles.values())
    assert s.same_top_rate == 1.0
    assert s.same_top_unc == 0.0
    assert s.dp_mean == 0.0 and s.dp_rms == 0.0 and s.dp_rms_unc == 0.0
    assert all(v == 0.0 for v in s.dp_percentiles.values())
    assert s.ppl_ratio == 1.0 and s.ln_ppl_ratio_mean == 0.0 and s.ppl_diff == 0.0
    assert s.ln_ppl_ratio_unc == 0.0 and s.ppl_diff_unc == 0.0
    assert s.ppl_q == s.ppl_base
    assert s.ln_prob_correlation == pytest.approx(1.0, abs=1e-12)


def test_perturbed_variant_is_worse() -> None:
    torch.manual_seed(2)
    ref = 3 * torch.randn(2, 30, 13)
    ids = torch.randint(0, 13, (2, 30))
    s = compare_logits(ref, ref + 2.0 * torch.randn_like(ref), ids)
    assert s.kld_mean > 0.01
    assert s.kld_percentiles["min"] >= 0.0
    assert s.kld_percentiles["max"] >= s.kld_percentiles["99"] >= s.kld_percentiles["median"]
    assert s.same_top_rate < 1.0
    assert s.dp_rms > 0.0
    assert s.kld_mean_unc > 0.0 and math.isfinite(s.ppl_diff_unc)


def test_streaming_equals_one_call() -> None:
    torch.manual_seed(3)
    ref = torch.randn(4, 9, 6)
    var = ref + torch.randn_like(ref)
    ids = torch.randint(0, 6, (4, 9))
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, :2] = 0

    acc = OutputComparison()
    acc.update(ref[:2], var[:2], ids[:2], mask[:2])
    acc.update(ref[2:], var[2:], ids[2:], mask[2:])
    streamed = acc.result().to_dict()
    whole = compare_logits(ref, var, ids, mask).to_dict()

    assert streamed["n_tokens"] == whole["n_tokens"] == 8 * 4 - 3 - 2
    for key, value in whole.items():
        if isinstance(value, dict):
            assert streamed[key] == pytest.approx(value, abs=1e-12), key
        else:
            assert streamed[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize(("which", "name"), [("ref", "reference"), ("var", "variant")])
def test_nan_logits_name_the_model_and_batch(which: str, name: str) -> None:
    torch.manual_seed(4)
    ref = torch.randn(2, 4, 5)
    var = ref + 0.1
    ids = torch.randint(0, 5, (2, 4))
    acc = OutputComparison()
    acc.update(ref, var, ids)  # batch index 0, clean
    bad_ref, bad_var = ref.clone(), var.clone()
    (bad_ref if which == "ref" else bad_var)[1, 2, 3] = math.inf if which == "ref" else math.nan
    with pytest.raises(TraceError, match=rf"{name} logits at batch index 1 .*row 1, position 2"):
        acc.update(bad_ref, bad_var, ids)
    assert acc.n_tokens == 6  # the failed call added nothing


def test_empty_input_errors() -> None:
    ref = torch.randn(2, 4, 5)
    ids = torch.zeros(2, 4, dtype=torch.long)
    # No two consecutive unmasked positions anywhere
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]])
    with pytest.raises(TraceError, match="no tokens to compare"):
        compare_logits(ref, ref, ids, mask)
    with pytest.raises(TraceError, match="no tokens to compare"):
        compare_logits(ref[:, :1], ref[:, :1], ids[:, :1])
    with pytest.raises(TraceError, match="no tokens to compare"):
        OutputComparison().result()


def test_single_token_uncertainties_are_nan() -> None:
    ref = logits_from_probs([REF_PROBS[0], REF_PROBS[0]])
    var = logits_from_probs([VAR_PROBS[0], VAR_PROBS[0]])
    s = compare_logits(ref, var, torch.tensor([[0, 1]]))
    assert s.n_tokens == 1
    assert s.kld_mean == pytest.approx(0.25 * LN2, abs=1e-12)
    assert s.dp_mean == pytest.approx(0.25, abs=1e-12)
    for field in (
        "kld_mean_unc",
        "same_top_unc",
        "dp_mean_unc",
        "dp_rms_unc",
        "ppl_q_unc",
        "ppl_base_unc",
        "ln_ppl_ratio_unc",
        "ppl_ratio_unc",
        "ppl_diff_unc",
        "ln_prob_correlation",
    ):
        assert math.isnan(getattr(s, field)), field
    assert all(v == pytest.approx(0.25 * LN2, abs=1e-12) for v in s.kld_percentiles.values())
    assert "Mean    KLD" in s.summary()


def test_bad_shapes_and_token_ids() -> None:
    ref = torch.randn(1, 4, 5)
    with pytest.raises(TraceError, match="differ in shape"):
        compare_logits(ref, torch.randn(1, 4, 6), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(TraceError, match="out of range"):
        compare_logits(ref, ref, torch.tensor([[0, 1, 9, 2]]))


def test_to_dict_from_dict_round_trip(two_token_stats: OutputStats) -> None:
    d = two_token_stats.to_dict()
    assert list(d["kld_percentiles"]) == [k for k, _ in KLD_PERCENTILES]
    assert list(d["dp_percentiles"]) == [k for k, _ in DP_PERCENTILES]
    assert all(isinstance(v, int | float | dict) for v in d.values())
    assert OutputStats.from_dict(d) == two_token_stats
    assert OutputStats.from_dict(json.loads(json.dumps(d))) == two_token_stats
    with pytest.raises(ResultFormatError):
        OutputStats.from_dict({"n_tokens": 2})


def test_summary_has_llama_cpp_labels(two_token_stats: OutputStats) -> None:
    text = two_token_stats.summary()
    for label in (
        "Mean PPL(Q)",
        "Cor(ln(PPL(Q)), ln(PPL(base)))",
        "Mean PPL(Q)-PPL(base)",
        "Maximum KLD",
        "99.9%   KLD",
        " 0.1%   KLD",
        "Median  Δp",
        "RMS Δp",
        "Same top p: 50.000 ± 50.000 %",
    ):
        assert label in text, label
