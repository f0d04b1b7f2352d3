"""Tests for trace_lib.metrics.features (CPFR, drift, smearing, muting) and trace_lib.metrics.directions.

Hand-worked examples carry their arithmetic in comments. All tests are fast (no model is loaded).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

import trace_lib.metrics._reduce as features_mod
from trace_lib.errors import TraceError
from trace_lib.metrics.directions import compare_directions, diff_in_means, unit
from trace_lib.metrics.features import CPFR, ActivationMuting, FeatureDrift, FeatureSmearing
from trace_lib.metrics.stats import cohens_d


def sparse_codes(n_tokens: int, n_features: int, density: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Random non-negative SAE-like codes: each entry fires with probability ``density``."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.rand(n_tokens, n_features, generator=g) * 3.0
    fires = torch.rand(n_tokens, n_features, generator=g) < density
    return mags * fires


# --------------------------------------------------------------------------------------------------- CPFR


def test_cpfr_hand_example():
    # feature 772: f_ref = [3, 0, 4] -> ||f_ref|| = sqrt(9 + 16) = 5
    #              f_q   = [3, 0, 0] -> f_ref - f_q = [0, 0, 4] -> ||diff|| = 4 -> CPFR = 1 - 4/5 = 0.2
    # feature 13:  f_ref = [1, 2, 2] -> ||f_ref|| = sqrt(1 + 4 + 4) = 3
    #              f_q   = [1, 2, 1] -> diff = [0, 0, 1] -> ||diff|| = 1 -> CPFR = 1 - 1/3 = 2/3
    # score = (0.2 + 2/3) / 2 = 13/30; both < 0.8, worst first: [772, 13]
    ref = torch.tensor([[3.0, 1.0], [0.0, 2.0], [4.0, 2.0]])
    quant = torch.tensor([[3.0, 1.0], [0.0, 2.0], [0.0, 1.0]])
    res = CPFR(degradation_threshold=0.8).compute(ref, quant, feature_ids=[772, 13],
                                                  feature_names={772: "Refusal"})
    assert res.per_feature.tolist() == pytest.approx([0.2, 2 / 3], abs=1e-7)
    assert res.score == pytest.approx(13 / 30, abs=1e-7)
    assert res.degraded_features == [772, 13]
    assert res.num_active == 2 and res.num_inactive == 0
    # degradation = 1 - CPFR: 80% for #772, 33.3% for #13
    assert res.degradation_percent(772) == pytest.approx(80.0, abs=1e-5)
    assert res.degradation.tolist() == pytest.approx([80.0, 100 / 3], abs=1e-5)
    assert "Warning: Feature #772 (Refusal) degraded by 80% in INT8" in res.summary(variant="INT8")
    # a looser threshold: only #772 (0.2) is below 0.5
    assert CPFR(degradation_threshold=0.5).compute(ref, quant, feature_ids=[772, 13]).degraded_features == [772]


def test_cpfr_inactive_feature_is_nan_excluded_and_counted():
    # feature 0: f_ref = [3, 4] (norm 5), f_q = [3, 4] -> CPFR 1
    # feature 1: silent in the reference (norm 0 <= eps) -> NaN, excluded from the score, counted as inactive;
    #            it fires in the variant, so it is listed as newly active
    ref = torch.tensor([[3.0, 0.0], [4.0, 0.0]])
    quant = torch.tensor([[3.0, 0.0], [4.0, 2.0]])
    res = CPFR().compute(ref, quant, feature_ids=[5, 9])
    assert res.per_feature[0].item() == 1.0
    assert math.isnan(res.per_feature[1].item())
    assert res.score == 1.0
    assert res.num_active == 1 and res.num_inactive == 1
    assert res.newly_active_features == [9]
    assert res.degraded_features == []
    d = res.to_dict()
    assert d["per_feature"] == [1.0, None]  # NaN -> None
    json.dumps(d, allow_nan=False)


def test_cpfr_all_inactive_gives_nan_score():
    res = CPFR().compute(torch.zeros(4, 3), torch.zeros(4, 3))
    assert math.isnan(res.score) and res.num_active == 0
    assert res.to_dict()["score"] is None
    assert "undefined" in res.summary()


def test_identical_inputs_are_perfect_everywhere():
    ref = sparse_codes(200, 40, density=0.2)
    ref[:, 7] = 0.0  # one feature silent in the reference
    quant = ref.clone()
    cpfr = CPFR().compute(ref, quant)
    active = ~torch.isnan(cpfr.per_feature)
    assert int(active.sum()) == 39 and cpfr.num_inactive == 1
    assert bool((cpfr.per_feature[active] == 1.0).all())  # exactly 1.0: ||diff|| = 0
    assert cpfr.score == 1.0
    assert cpfr.degraded_features == [] and cpfr.newly_active_features == []

    drift = FeatureDrift().compute(ref, quant)
    assert drift.mean_drift == 0.0
    assert bool((drift.wasserstein == 0).all())
    assert bool((drift.firing_rate_change == 0).all())
    assert drift.mean_cosine == pytest.approx(1.0, abs=1e-12)

    smear = FeatureSmearing().detect_smearing(ref, quant)
    assert smear["num_smeared_pairs"] == 0 and smear.num_smeared_pairs_jaccard == 0
    assert smear.num_features_considered == 39 and smear.num_pairs_considered == 39 * 38 // 2

    mute = ActivationMuting().detect_muting(ref, quant)
    assert mute["muting_rate"] == 0.0 and mute.muted_features == []
    assert mute.token_muting_rate == 0.0 and mute.token_emergence_rate == 0.0


def test_zeroed_feature_is_muted_and_degraded():
    ref = sparse_codes(100, 6, density=0.3, seed=1)
    quant = ref.clone()
    quant[:, 2] = 0.0
    ids = [10, 11, 12, 13, 14, 15]
    cpfr = CPFR().compute(ref, quant, feature_ids=ids)
    # f_q = 0 -> ||f_ref - 0|| = ||f_ref|| -> CPFR = 1 - n/(n + eps) ~ 0
    assert cpfr.cpfr_of(12) == pytest.approx(0.0, abs=1e-8)
    assert cpfr.degraded_features == [12]
    mute = ActivationMuting().detect_muting(ref, quant, feature_ids=ids)
    assert mute.muted_features == [12]
    assert mute.muting_rate == pytest.approx(1 / 6)
    assert mute.per_feature_token_muting[2].item() == 1.0
    drift = FeatureDrift().compute(ref, quant, feature_ids=ids)
    # silencing a non-negative feature moves all its mass to 0: W1 = mean(f_ref) -> normalised 1
    assert drift.normalized_wasserstein[2].item() == pytest.approx(1.0, abs=1e-6)
    assert drift.cosine[2].item() == 0.0
    assert drift.relative_mean_change[2].item() == pytest.approx(-1.0, abs=1e-6)
    assert drift.most_drifted(1) == [12]


def test_scale_and_sign_changes():
    # f_ref = [3, 0, 4] (norm 5), columns: x0.5, x2, x-1
    f = torch.tensor([3.0, 0.0, 4.0])
    ref = torch.stack([f, f, f], dim=1)
    quant = torch.stack([0.5 * f, 2.0 * f, -f], dim=1)
    cpfr = CPFR().compute(ref, quant)
    # x0.5: ||diff|| = 0.5 * 5 = 2.5 -> 1 - 2.5/5 = 0.5
    # x2:   ||diff|| = 5             -> 1 - 5/5   = 0
    # x-1:  ||diff|| = 2 * 5 = 10    -> 1 - 10/5  = -1 (not clipped)
    assert cpfr.per_feature.tolist() == pytest.approx([0.5, 0.0, -1.0], abs=1e-7)
    assert cpfr.degraded_features == [2, 1, 0]  # worst first
    assert cpfr.degradation[2].item() == pytest.approx(200.0, abs=1e-5)

    drift = FeatureDrift().compute(ref, quant)
    # scaling keeps the pattern (cosine 1); the sign flip reverses it (cosine -1)
    assert drift.cosine.tolist() == pytest.approx([1.0, 1.0, -1.0], abs=1e-12)
    # mean_ref = 7/3; relative mean change = c - 1 -> -0.5, +1, -2
    assert drift.relative_mean_change.tolist() == pytest.approx([-0.5, 1.0, -2.0], abs=1e-7)
    # W1 of c*f vs f is |c - 1| * mean(f) for c >= 0 -> normalised 0.5, 1
    # sign flip: sorted(f) = [0, 3, 4], sorted(-f) = [-4, -3, 0] -> |diffs| = 4, 6, 4 -> W1 = 14/3 -> / (7/3) = 2
    assert drift.normalized_wasserstein.tolist() == pytest.approx([0.5, 1.0, 2.0], abs=1e-7)
    # firing rate: 2/3 of tokens > 0 in the reference; the sign flip fires on none
    assert drift.firing_rate_change.tolist() == pytest.approx([0.0, 0.0, -2 / 3])


# -------------------------------------------------------------------------------------------------- Drift


def test_drift_hand_example():
    # feature 0: ref = [1, 2, 3, 0], quant = [1, 1, 3, 1]
    #   mean_ref = 6/4 = 1.5, mean_q = 6/4 = 1.5 -> relative change 0
    #   firing rate 3/4 -> 4/4: change +0.25
    #   sorted ref [0, 1, 2, 3], sorted quant [1, 1, 1, 3] -> |diffs| 1, 0, 1, 0 -> W1 = 0.5 -> /1.5 = 1/3
    #   cosine = (1 + 2 + 9 + 0) / (sqrt(14) * sqrt(12)) = 12 / sqrt(168)
    # feature 1: ref = [2, 2, 2, 2], quant = [1, 1, 1, 1]
    #   relative change (1 - 2)/2 = -0.5; rates 1 -> 1; W1 = 1 -> /2 = 0.5; cosine 1
    # mean_drift = (1/3 + 1/2) / 2 = 5/12
    ref = torch.tensor([[1.0, 2.0], [2.0, 2.0], [3.0, 2.0], [0.0, 2.0]])
    quant = torch.tensor([[1.0, 1.0], [1.0, 1.0], [3.0, 1.0], [1.0, 1.0]])
    d = FeatureDrift().compute(ref, quant)
    assert d.relative_mean_change.tolist() == pytest.approx([0.0, -0.5], abs=1e-7)
    assert d.firing_rate_ref.tolist() == [0.75, 1.0]
    assert d.firing_rate_change.tolist() == [0.25, 0.0]
    assert d.wasserstein.tolist() == pytest.approx([0.5, 1.0])
    assert d.normalized_wasserstein.tolist() == pytest.approx([1 / 3, 0.5], abs=1e-7)
    assert d.cosine.tolist() == pytest.approx([12 / math.sqrt(168), 1.0], abs=1e-12)
    assert d.mean_drift == pytest.approx(5 / 12, abs=1e-7)
    assert d.most_drifted() == [1, 0]
    json.dumps(d.to_dict(), allow_nan=False)


def test_wasserstein_matches_scipy():
    rng = np.random.default_rng(3)
    ref = rng.exponential(1.0, size=(300, 8)) * (rng.random((300, 8)) < 0.3)
    quant = ref * rng.normal(1.0, 0.2, size=ref.shape) + (rng.random((300, 8)) < 0.05) * 0.5
    d = FeatureDrift().compute(ref, quant)  # numpy inputs are accepted
    expected = [wasserstein_distance(ref[:, j], quant[:, j]) for j in range(8)]
    assert d.wasserstein.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    norm = [e / (np.abs(ref[:, j]).mean() + 1e-8) for j, e in enumerate(expected)]
    assert d.normalized_wasserstein.tolist() == pytest.approx(norm, rel=1e-10)


def test_blocked_statistics_match_unblocked(monkeypatch):
    ref = sparse_codes(50, 30, density=0.3, seed=4)
    quant = ref * 0.9 + sparse_codes(50, 30, density=0.05, seed=5)
    full_cpfr = CPFR().compute(ref, quant).per_feature
    full_drift = FeatureDrift().compute(ref, quant).normalized_wasserstein
    full_mute = ActivationMuting().detect_muting(ref, quant).per_feature_token_muting
    monkeypatch.setattr(features_mod, "_BLOCK_ELEMENTS", 50 * 7)  # 7 columns per block
    assert torch.allclose(CPFR().compute(ref, quant).per_feature, full_cpfr, equal_nan=True)
    assert torch.allclose(FeatureDrift().compute(ref, quant).normalized_wasserstein, full_drift, equal_nan=True)
    assert torch.allclose(ActivationMuting().detect_muting(ref, quant).per_feature_token_muting, full_mute,
                          equal_nan=True)


# ----------------------------------------------------------------------------------------------- Smearing


def smearing_example() -> tuple[torch.Tensor, torch.Tensor]:
    """40 tokens, 4 features.

    Features 0 and 1 fire on disjoint tokens in the reference (0-9 and 10-19: cosine 0, Jaccard 0) and both on
    tokens 0-19 in the variant (cosine 1, Jaccard 1): smeared. Features 2 and 3 fire on disjoint tokens
    (20-29 and 30-39) in both models: an unaffected pair.
    """
    ref = torch.zeros(40, 4)
    ref[0:10, 0] = 1.0
    ref[10:20, 1] = 2.0
    ref[20:30, 2] = 1.5
    ref[30:40, 3] = 0.5
    quant = ref.clone()
    quant[0:20, 0] = 1.0
    quant[0:20, 1] = 2.0
    return ref, quant


def test_smearing_detects_constructed_pair_only():
    ref, quant = smearing_example()
    res = FeatureSmearing().detect_smearing(ref, quant, feature_ids=[100, 101, 102, 103])
    assert res["num_smeared_pairs"] == 1 and res.num_smeared_pairs == 1
    assert res.num_pairs_considered == 6  # 4 features with >= 5 firing tokens -> 4*3/2 pairs
    (pair,) = res["pairs"]
    assert (pair["feature_a"], pair["feature_b"]) == (100, 101)
    assert pair["similarity_ref"] == pytest.approx(0.0, abs=1e-6)
    assert pair["similarity_quant"] == pytest.approx(1.0, abs=1e-6)
    assert pair["jaccard_ref"] == 0.0 and pair["jaccard_quant"] == 1.0
    assert res.num_smeared_pairs_jaccard == 1
    assert res.smeared_features == [100, 101]
    assert "num_smeared_pairs" in res and set(res.keys()) >= {"pairs", "num_pairs_considered"}
    json.dumps(res.to_dict(), allow_nan=False)
    assert "#100" in res.summary()


def test_smearing_thresholds_and_min_active_tokens():
    ref, quant = smearing_example()
    # partial merge: feature 1 also fires on tokens 5-9 in the variant
    # a = 1 on 0-9, b = 2 on 5-19 -> <a, b> = 5*2 = 10, ||a|| = sqrt(10), ||b|| = sqrt(15*4) = sqrt(60)
    # cosine = 10 / sqrt(600) = 0.408 < 0.5 -> not smeared
    partial = ref.clone()
    partial[5:10, 1] = 2.0
    assert FeatureSmearing().detect_smearing(ref, partial).num_smeared_pairs == 0
    # ... but it is with a lower threshold (0.3) and a smaller required increase (0.4 >= 0.35)
    assert FeatureSmearing(similarity_threshold=0.3, min_increase=0.35).detect_smearing(ref, partial)[
        "num_smeared_pairs"] == 1
    # features firing on fewer than min_active_tokens reference tokens are not considered
    res = FeatureSmearing(min_active_tokens=11).detect_smearing(ref, quant)
    assert res.num_features_considered == 0 and res.num_smeared_pairs == 0


def test_smearing_blocked_matches_single_block():
    ref = sparse_codes(300, 60, density=0.2, seed=6)
    quant = ref.clone()
    # merge features 3..8 into one pattern in the variant
    quant[:, 3:9] = ref[:, 3:4].expand(-1, 6) * torch.linspace(0.5, 2.0, 6)
    one = FeatureSmearing().detect_smearing(ref, quant)
    many = FeatureSmearing(block_size=7).detect_smearing(ref, quant)
    assert one.num_smeared_pairs == many.num_smeared_pairs == 15  # all 6*5/2 pairs among 3..8
    key = lambda r: sorted((p["feature_a"], p["feature_b"]) for p in r.pairs)  # noqa: E731
    assert key(one) == key(many)
    assert sorted(one.smeared_features) == [3, 4, 5, 6, 7, 8]
    capped = FeatureSmearing(max_pairs=4).detect_smearing(ref, quant)
    assert len(capped.pairs) == 4 and capped.num_smeared_pairs == 15 and capped.pairs_truncated


def test_smearing_is_fast():
    # 2000 tokens x 1000 features (10% density: every feature fires on >= 5 tokens) -> 499,500 pairs
    ref = sparse_codes(2000, 1000, density=0.1, seed=7)
    quant = ref * 0.95
    start = time.perf_counter()
    res = FeatureSmearing().detect_smearing(ref, quant)
    elapsed = time.perf_counter() - start
    assert res.num_pairs_considered == 1000 * 999 // 2
    assert res.num_smeared_pairs == 0
    assert elapsed < 3.0, f"smearing took {elapsed:.2f}s"


# ------------------------------------------------------------------------------------------------- Muting


def test_muting_hand_example():
    # 10 tokens:
    # feature 0 fires on 5 tokens in the reference, none in the variant -> rate 0.5 -> 0 <= 0.1*0.5: muted,
    #   token muting 5/5 = 1
    # feature 1 fires on tokens 0-3 in the reference, on tokens 0-1 in the variant -> rate 0.4 -> 0.2 > 0.04:
    #   not muted, token muting 2/4 = 0.5
    # feature 2 never fires in the reference (rate 0 < min_ref_rate): not considered; it fires on 1 token in
    #   the variant (a new firing event)
    # muting_rate = 1 muted / 2 considered = 0.5
    # token_muting_rate = (5 + 2) lost / (5 + 4) reference events = 7/9
    # token_emergence_rate = 1 new / (0 + 2 + 1) variant events = 1/3
    ref = torch.zeros(10, 3)
    quant = torch.zeros(10, 3)
    ref[0:5, 0] = 3.0
    ref[0:4, 1] = 2.0
    quant[0:2, 1] = 1.5
    quant[9, 2] = 0.7
    res = ActivationMuting().detect_muting(ref.numpy(), quant.numpy(), feature_ids=[7, 8, 9],
                                           feature_names=["Refusal", "Other", "New"])
    assert res["muting_rate"] == 0.5
    assert res.muted_features == [7]
    assert res.num_considered == 2 and res.num_muted == 1
    t = res.per_feature_token_muting.tolist()
    assert t[:2] == [1.0, 0.5] and math.isnan(t[2])
    assert res.token_muting_rate == pytest.approx(7 / 9)
    assert res.token_emergence_rate == pytest.approx(1 / 3)
    assert "Feature #7 (Refusal) muted in INT4" in res.summary(variant="INT4")
    assert res.to_dict()["per_feature_token_muting"][2] is None
    # a stricter activity threshold 1.6: features 0 (3.0) and 1 (2.0) still fire in the reference, but feature
    # 1's variant activation 1.5 is not > 1.6 -> muted too (both ratio 0; #7 first: higher reference rate)
    strict = ActivationMuting(activity_threshold=1.6).detect_muting(ref, quant, feature_ids=[7, 8, 9])
    assert strict.muted_features == [7, 8] and strict.muting_rate == 1.0


# ------------------------------------------------------------------------------------------------- Errors


@pytest.mark.parametrize("metric", [
    lambda r, q: CPFR().compute(r, q),
    lambda r, q: FeatureDrift().compute(r, q),
    lambda r, q: FeatureSmearing().detect_smearing(r, q),
    lambda r, q: ActivationMuting().detect_muting(r, q),
])
def test_shape_mismatch_and_nonfinite_raise(metric):
    with pytest.raises(TraceError, match=r"\(3, 2\).*\(3, 3\)"):
        metric(torch.ones(3, 2), torch.ones(3, 3))
    bad = torch.ones(3, 2)
    bad[1, 1] = float("nan")
    with pytest.raises(TraceError, match="_quant contains 1 NaN/Inf"):
        metric(torch.ones(3, 2), bad)
    bad[1, 1] = float("inf")
    with pytest.raises(TraceError, match="_ref contains 1 NaN/Inf"):
        metric(bad, torch.ones(3, 2))
    with pytest.raises(TraceError, match="2-D"):
        metric(torch.ones(3), torch.ones(3))


def test_feature_ids_validation():
    with pytest.raises(TraceError, match="feature_ids has 3 entries"):
        CPFR().compute(torch.ones(2, 2), torch.ones(2, 2), feature_ids=[1, 2, 3])
    with pytest.raises(TraceError, match="duplicates"):
        CPFR().compute(torch.ones(2, 2), torch.ones(2, 2), feature_ids=[1, 1])


# --------------------------------------------------------------------------------------------- Directions


def test_diff_in_means_and_unit():
    # pos = [[2, 1], [4, 1]] -> mean [3, 1]; neg = [[0, 1], [0, 1]] -> mean [0, 1]; d = [3, 0]
    pos = torch.tensor([[2.0, 1.0], [4.0, 1.0]])
    neg = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    d = diff_in_means(pos, neg)
    assert d.tolist() == [3.0, 0.0] and d.dtype == torch.float32
    assert unit(d).tolist() == [1.0, 0.0]
    assert unit(np.array([3.0, 4.0])).tolist() == pytest.approx([0.6, 0.8])
    with pytest.raises(TraceError, match="zero norm"):
        unit(torch.zeros(2))
    with pytest.raises(TraceError, match=r"\(2, 2\).*\(2, 3\)"):
        diff_in_means(pos, torch.ones(2, 3))


def test_compare_directions_hand_example():
    # reference: pos [[2, 1], [4, 1]], neg [[0, 1], [0, 1]] -> d_ref = [3, 0], r_hat = [1, 0]
    # variant:   pos [[1, 1], [2, 1]], neg [[0, 1], [0, 1]] -> d_q = [1.5, 0]
    # cosine 1; norm ratio 1.5/3 = 0.5; contrast kept <d_q, r_hat>/||d_ref|| = 1.5/3 = 0.5
    # projections onto r_hat of positive prompts: ref [2, 4] (sum 6), variant [1, 2] (sum 3) -> kept 3/6 = 0.5
    # Cohen's d, reference: pos proj [2, 4] mean 3, s^2 = 2; neg [0, 0] mean 0, s^2 = 0
    #   pooled = sqrt((1*2 + 1*0) / 2) = 1 -> d = 3
    # variant: pos [1, 2] mean 1.5, s^2 = 0.5; neg [0, 0] -> pooled = sqrt(0.5/2) = 0.5 -> d = 3
    # (the contrast halved, but the classes are as separable as before)
    pos_r = torch.tensor([[2.0, 1.0], [4.0, 1.0]])
    pos_q = torch.tensor([[1.0, 1.0], [2.0, 1.0]])
    neg = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    d_ref, d_q = diff_in_means(pos_r, neg), diff_in_means(pos_q, neg)
    res = compare_directions(d_ref, d_q, acts_ref=(pos_r, neg), acts_quant=(pos_q, neg))
    assert res["cosine"] == pytest.approx(1.0)
    assert res.norm_ratio == pytest.approx(0.5)
    assert res.contrast_kept == pytest.approx(0.5)
    assert res.projection_kept == pytest.approx(0.5)
    assert res.projection_prompts == "positive"
    assert res.separation_ref == pytest.approx(3.0)
    assert res.separation_quant == pytest.approx(3.0)
    assert res.separation_quant_own == pytest.approx(3.0)
    json.dumps(res.to_dict(), allow_nan=False)
    # the same through a matrix plus labels
    res2 = compare_directions(d_ref, d_q, torch.cat([pos_r, neg]), torch.cat([pos_q, neg]), labels=[1, 1, 0, 0])
    assert res2.to_dict() == res.to_dict()
    # without labels: projections of all rows, ref [2, 4, 0, 0] (sum 6), variant [1, 2, 0, 0] (sum 3) -> 0.5
    res3 = compare_directions(d_ref, d_q, torch.cat([pos_r, neg]), torch.cat([pos_q, neg]))
    assert res3.projection_kept == pytest.approx(0.5) and res3.projection_prompts == "all"
    assert math.isnan(res3.separation_ref) and res3.to_dict()["separation_ref"] is None


def test_compare_directions_rotation_and_errors():
    # orthogonal direction: cosine 0, nothing of the reference contrast kept; the norm is unchanged
    res = compare_directions(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert res.cosine == pytest.approx(0.0) and res.contrast_kept == pytest.approx(0.0)
    assert res.norm_ratio == pytest.approx(2.0)
    assert math.isnan(res.projection_kept)
    # opposite direction: cosine -1, contrast kept -1
    assert compare_directions([1.0, 0.0], [-1.0, 0.0]).contrast_kept == pytest.approx(-1.0)
    with pytest.raises(TraceError, match="both acts_ref and acts_quant"):
        compare_directions([1.0, 0.0], [1.0, 0.0], acts_ref=torch.ones(2, 2))
    with pytest.raises(TraceError, match=r"\(2,\).*\(3,\)"):
        compare_directions([1.0, 0.0], [1.0, 0.0, 0.0])
    with pytest.raises(TraceError, match="dir_quant contains 1 NaN/Inf"):
        compare_directions([1.0, 0.0], [float("nan"), 0.0])
    with pytest.raises(TraceError, match="labels has 3 entries"):
        compare_directions([1.0, 0.0], [1.0, 0.0], torch.ones(2, 2), torch.ones(2, 2), labels=[1, 0, 1])


def test_cohens_d_matches_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 50), rng.normal(0.0, 2.0, 70)
    pooled = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    assert cohens_d(torch.tensor(a), torch.tensor(b)) == pytest.approx((a.mean() - b.mean()) / pooled)
