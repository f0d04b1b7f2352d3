"""Basis fidelity (sae/fidelity.py): an SAE's quality on the audited tokens, recomputed by hand, and its warning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trace_lib.sae import SAE, SAEConfig
from trace_lib.sae.fidelity import BasisFidelity, measure_fidelity

HOOK = "blocks.1.hook_resid_post"


def _perfect_sae(d: int) -> SAE:
    """x = relu(x) - relu(-x): latents +e_i and -e_i reconstruct every input exactly (EV 1)."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, architecture="relu", apply_b_dec_to_input=False, hook_name=HOOK))
    eye = torch.eye(d)
    sae.W_enc.data.copy_(torch.cat([eye, -eye], 1))
    sae.W_dec.data.copy_(torch.cat([eye, -eye], 0))
    return sae


def _random_sae(d: int, seed: int = 0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, d_sae=4 * d, architecture="relu", apply_b_dec_to_input=False, hook_name=HOOK))
    sae.W_enc.data.copy_(torch.randn(d, 4 * d, generator=g))
    sae.W_dec.data.copy_(torch.randn(4 * d, d, generator=g))
    return sae


def test_fidelity_equals_an_independent_computation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=g) + 0.5
    sae = _random_sae(8)
    sae.cfg.metadata["quality"] = {"l0": 3.0, "explained_variance": 0.9}
    fid = measure_fidelity(sae, HOOK, x)
    # by hand in numpy: SAELens's explained variance 1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2, L0 = mean count
    xn = x.double().numpy()
    z = np.maximum(xn @ sae.W_enc.detach().double().numpy(), 0)
    x_hat = z @ sae.W_dec.detach().double().numpy()
    ev = 1 - ((xn - x_hat) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert fid.explained_variance == pytest.approx(ev, rel=1e-5)
    assert fid.l0 == pytest.approx((z != 0).sum(1).mean())
    assert fid.tokens == 200 and fid.training_l0 == 3.0 and fid.training_explained_variance == 0.9


def test_a_random_sae_is_flagged_naming_the_hook_and_a_perfect_one_is_not():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(2))
    bad = measure_fidelity(_random_sae(8), HOOK, x)
    assert bad.explained_variance < 0.8 and not bad.ok
    assert any(w.startswith(f"basis warning: the SAE at {HOOK} reconstructs the audited prompts poorly (EV ")
               for w in bad.warnings)
    good_sae = _perfect_sae(8)
    good = measure_fidelity(good_sae, HOOK, x)
    assert good.explained_variance == pytest.approx(1.0) and good.ok and good.warnings == []
    # the same perfect SAE firing 8 latents per token against a training L0 of 2 is flagged for its L0
    good_sae.cfg.metadata["quality"] = {"l0": 2.0}
    dense = measure_fidelity(good_sae, HOOK, x)
    assert dense.l0 == pytest.approx(8.0) and len(dense.warnings) == 1 and "training L0 2" in dense.warnings[0]
    assert BasisFidelity.from_dict(dense.to_dict()) == dense


def test_ce_recovered_shares_one_clean_pass_and_is_cached(tiny_folder, tmp_path, monkeypatch):
    """fidelity_of_saes over two hooks gives what ce_loss_with_sae gives hook by hook, and a second call reads
    the cached splices instead of running them again."""
    import trace_lib.sae.splice as splice
    from trace_lib.capture.inputs import prompt_batches
    from trace_lib.models import load_model
    from trace_lib.sae.fidelity import fidelity_of_saes

    monkeypatch.setenv("TRACE_CACHE", str(tmp_path))
    loaded = load_model(tiny_folder)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    saes = {h: _random_sae(loaded.d_model, seed=i) for i, h in enumerate(hooks)}
    for h in hooks:
        saes[h].cfg.hook_name = h
    prompts = ["How do I pick a lock?", "Bake bread, please.", "What is 2+2?"]
    acts = {h: torch.randn(20, loaded.d_model) for h in hooks}
    got = fidelity_of_saes(saes, acts, loaded, prompts, batch_size=2)
    batches = list(prompt_batches(loaded.tokenizer, prompts, batch_size=2))
    for h in hooks:
        want = splice.ce_loss_with_sae(loaded, saes[h], h, batches)
        assert got[h].ce_loss_recovered == pytest.approx(want["ce_loss_recovered"], rel=1e-6)
        assert got[h].ce_loss_clean == pytest.approx(want["ce_loss_clean"], rel=1e-6)

    def no_splice(*a, **k):
        raise AssertionError("spliced again")

    monkeypatch.setattr(splice, "ce_loss_with_sae", no_splice)
    again = fidelity_of_saes(saes, acts, loaded, prompts, batch_size=2)
    assert [again[h].ce_loss_recovered for h in hooks] == [got[h].ce_loss_recovered for h in hooks]
