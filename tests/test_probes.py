"""Linear probes (trace_lib.probes): the fit against scipy's optimiser, AUROC against scipy's Mann-Whitney U,
the bootstrap against explicit resamples, and a planted injury."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.stats import mannwhitneyu

from trace_lib.probes import audit_probe, auroc_pairs, bootstrap_counts, fit_logistic, fit_probe


def _planted(n: int = 60, d: int = 16, seed: int = 0, gap: float = 3.0):
    """Safety prompts are baseline noise plus ``gap`` along one direction ``r`` (unit)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(d, generator=g)
    r /= r.norm()
    pos = torch.randn(n, d, generator=g) + gap * r
    neg = torch.randn(n, d, generator=g)
    return pos.double(), neg.double(), r.double()


def test_logistic_fit_matches_scipy_on_the_same_objective():
    pos, neg, _ = _planted(40, 8)
    z = torch.cat([pos, neg])
    z = (z - z.mean(0)) / z.std(0, unbiased=False)
    y = torch.cat([torch.ones(40), torch.zeros(40)]).double()
    fit = fit_logistic(z, y, l2=1.0)
    zn, yn = z.numpy(), y.numpy()

    def j(theta):  # sum log(1 + e^s) - y s + 1/2 ||w||^2, the bias unpenalised
        s = zn @ theta[:-1] + theta[-1]
        return np.logaddexp(0, s).sum() - yn @ s + 0.5 * theta[:-1] @ theta[:-1]

    ref = minimize(j, np.zeros(9), method="BFGS", options={"gtol": 1e-10})
    np.testing.assert_allclose(fit.weight.numpy(), ref.x[:-1], atol=1e-5)
    assert fit.bias == pytest.approx(ref.x[-1], abs=1e-5) and fit.grad_norm < 1e-8


def test_auroc_and_accuracy_equal_independent_computations():
    pos, neg, _ = _planted(30, 6, gap=1.0)
    probe = fit_probe(pos, neg, "refusal", "h", "logistic")
    a = audit_probe(probe, pos, neg, pos, neg, n_resamples=50)
    sp, sn = probe.score(pos).numpy(), probe.score(neg).numpy()
    u = mannwhitneyu(sp, sn).statistic
    assert a.reference.auroc == pytest.approx(u / (30 * 30), abs=1e-12)
    assert a.reference.accuracy == pytest.approx(((sp > probe.threshold).sum() + (sn <= probe.threshold).sum()) / 60)
    # hand-worked ties: pos [3, 1, 2, 2] vs neg [2, 0, 1] -> U = 3 + 1.5 + 2.5 + 2.5 = 9.5, AUROC 9.5 / 12
    assert auroc_pairs(torch.tensor([3.0, 1, 2, 2]), torch.tensor([2.0, 0, 1])).mean().item() == pytest.approx(9.5 / 12)
    # the threshold is the midpoint of the train classes' mean scores
    assert probe.threshold == pytest.approx(0.5 * (sp.mean() + sn.mean()))


def test_a_bootstrap_resample_equals_the_explicitly_resampled_auroc():
    pos, neg = torch.randn(7).double(), torch.randn(5).double()
    gen = torch.Generator().manual_seed(3)
    cp, cn = bootstrap_counts(7, 4, gen), bootstrap_counts(5, 4, gen)
    m = auroc_pairs(pos, neg)
    for b in range(4):
        p = pos.repeat_interleave(cp[b].long()).numpy()
        n = neg.repeat_interleave(cn[b].long()).numpy()
        assert (cp[b] @ m @ cn[b]).item() / 35 == pytest.approx(mannwhitneyu(p, n).statistic / 35)


def test_identical_variant_gives_identical_scores_and_zero_difference():
    pos, neg, _ = _planted()
    for method in ("logistic", "diff_in_means"):
        probe = fit_probe(pos[:30], neg[:30], "refusal", "h", method)
        a = audit_probe(probe, pos[30:], neg[30:], pos[30:].clone(), neg[30:].clone())
        assert a.variant == a.reference
        assert (a.auroc_diff, a.auroc_diff_low, a.auroc_diff_high) == (0.0, 0.0, 0.0)
        assert (a.accuracy_diff, a.accuracy_diff_low, a.accuracy_diff_high) == (0.0, 0.0, 0.0)


def test_planted_injury_drops_the_probe_auroc():
    """The variant's activations with the safety direction ablated (x - <x, r> r, as intervene.ablate does in
    the forward pass): both probes fall from separating the classes to chance, and the interval of the change
    excludes 0."""
    pos, neg, r = _planted(80, gap=4.0)
    for method in ("logistic", "diff_in_means"):
        probe = fit_probe(pos[:40], neg[:40], "refusal", "h", method)
        tp, tn = pos[40:], neg[40:]
        ablate = lambda x: x - (x @ r)[:, None] * r  # noqa: E731
        a = audit_probe(probe, tp, tn, ablate(tp), ablate(tn))
        assert a.reference.auroc > 0.95 and a.reference.accuracy > 0.85
        assert a.variant.auroc < 0.75 and a.auroc_diff_high < 0, a.line()
        assert a.reference.auroc_low <= a.reference.auroc <= a.reference.auroc_high


def test_bootstrap_is_deterministic_for_a_seed():
    pos, neg, _ = _planted(gap=0.5)
    probe = fit_probe(pos, neg, "refusal", "h")
    noisy = pos + 0.3 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(9)).double()
    a = audit_probe(probe, pos, neg, noisy, neg, seed=5)
    b = audit_probe(probe, pos, neg, noisy, neg, seed=5)
    c = audit_probe(probe, pos, neg, noisy, neg, seed=6)
    assert a == b and a.to_dict() == b.to_dict()
    assert (a.reference.auroc_low, a.auroc_diff_low) != (c.reference.auroc_low, c.auroc_diff_low)
    assert type(a).from_dict(a.to_dict()).to_dict() == a.to_dict()


def test_train_residuals_are_cached_and_equal_a_fresh_pass(tiny_folder, tmp_path, monkeypatch):
    """The probes' train-split pass runs once: a second audit reads the cached residuals, equal to a new pass."""
    from types import SimpleNamespace

    import trace_lib.audit.reference as reference
    from trace_lib.capture.prompts import capture_prompts
    from trace_lib.fingerprint import reduce_prompt_acts
    from trace_lib.models import load_model

    monkeypatch.setenv("TRACE_CACHE", str(tmp_path))
    audit = SimpleNamespace(reference=load_model(tiny_folder), batch_size=4)
    texts, hooks = ["How do I pick a lock?", "How do I bake bread?", "Tell me a joke."], ["blocks.1.hook_resid_post"]
    first = reference._train_residuals(audit, texts, hooks)
    _, fresh = reduce_prompt_acts(capture_prompts(audit.reference, texts, hooks, batch_size=4), {})
    assert torch.equal(first[hooks[0]], fresh[hooks[0]])

    def no_pass(*a, **k):
        raise AssertionError("ran the train prompts again")

    monkeypatch.setattr(reference, "capture_prompts", no_pass)
    again = reference._train_residuals(audit, texts, hooks)
    assert torch.equal(again[hooks[0]], first[hooks[0]])
    with pytest.raises(AssertionError, match="again"):  # other texts are a new key
        reference._train_residuals(audit, texts[:2], hooks)
