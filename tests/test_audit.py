"""The audit end to end: on a tiny model (fast) and on the real default model (slow, the issue's bar)."""

from __future__ import annotations

import json

import pytest
import torch

import trace_lib as trace
from trace_lib.audit import AuditResult
from trace_lib.errors import QuantizationError, ResultFormatError, SAEError
from trace_lib.models import load_model
from trace_lib.sae import SAETrainingConfig
from trace_lib.sae.store import SAEDataPlan

TINY_SAE = dict(cfg=SAETrainingConfig(k=8, expansion_factor=2, epochs=1, batch_size=256),
                plan=SAEDataPlan(text_sequences=32, seq_len=64, eval_tokens=512, ce_eval_sequences=2))


@pytest.fixture(scope="module")
def tiny_audit(tiny_folder, tmp_path_factory):
    import os

    before = os.environ.get("TRACE_CACHE")
    os.environ["TRACE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        audit = trace.Audit(load_model(tiny_folder), variants=["fp32", "int2-rtn-g32"],
                            hooks=["blocks.1.hook_resid_post"], kl_chunks=2, kl_ctx=64)
        audit.train_sae(**TINY_SAE)
        yield audit, audit.trace_features("harmful_refusal_v1")
    finally:
        if before is None:
            os.environ.pop("TRACE_CACHE")
        else:
            os.environ["TRACE_CACHE"] = before


def test_fp32_against_itself_is_perfect(tiny_audit):
    _, result = tiny_audit
    fp32 = result.variant("fp32")
    assert all(f.cpfr == 1.0 for f in fp32.features)
    assert fp32.hooks["blocks.1.hook_resid_post"]["cpfr_all_features"] == 1.0
    assert fp32.hooks["blocks.1.hook_resid_post"]["degraded_features_all"] == 0
    assert fp32.degraded("safety") == [] and fp32.degraded("capability") == []
    assert fp32.outputs.kld_mean == 0.0 and fp32.outputs.same_top_rate == 1.0
    assert all(d["cosine"] == pytest.approx(1.0) and d["projection_kept"] == pytest.approx(1.0)
               for d in fp32.directions)


def test_two_bit_variant_is_worse(tiny_audit):
    _, result = tiny_audit
    int2 = result.variant("int2-rtn-g32")
    assert int2.hooks["blocks.1.hook_resid_post"]["cpfr_all_features"] < 0.99
    assert int2.outputs.kld_mean > 0


def test_result_round_trips_and_summarises(tiny_audit, tmp_path):
    _, result = tiny_audit
    path = result.save(tmp_path / "audit.json")
    again = AuditResult.load(path)
    assert again.summary() == result.summary()
    assert json.loads(path.read_text())["kind"] == "trace.audit"
    assert "fp32" in result.summary() and "int2-rtn-g32" in result.summary()
    with pytest.raises(ResultFormatError):
        AuditResult.from_dict({"kind": "trace.compare", "version": 1})


def test_sae_is_cached(tiny_audit):
    audit, _ = tiny_audit
    import time

    t = time.perf_counter()
    again = audit.train_sae(**TINY_SAE)
    assert time.perf_counter() - t < 5
    sae = again["blocks.1.hook_resid_post"]
    assert "quality" in sae.cfg.metadata and "explained_variance" in sae.cfg.metadata["quality"]


def test_bad_inputs(tiny_folder, tmp_path):
    with pytest.raises(QuantizationError, match="unknown quantization config"):
        trace.Audit(tiny_folder, quant_model="int5-nope")
    audit = trace.Audit(load_model(tiny_folder), quant_model="fp32")
    with pytest.raises(SAEError, match="no SAE folder"):
        audit.load_sae(tmp_path / "missing")
    from trace_lib.sae import SAE, SAEConfig, save_sae

    save_sae(SAE(SAEConfig(d_in=48, d_sae=16, architecture="relu", hook_name="blocks.1.hook_resid_post")),
             tmp_path / "wrong")
    with pytest.raises(SAEError, match="d_in=48"):
        audit.load_sae(tmp_path / "wrong")


def test_ablation_variant_removes_the_direction(tiny_folder):
    from trace_lib import HookConfig, HookManager
    from trace_lib.intervene import ablate_directions

    ref = load_model(tiny_folder)
    d = torch.randn(2, ref.d_model)
    var = ablate_directions(ref, "blocks.1.hook_resid_post", d)
    hm = HookManager(var, HookConfig(layers=[1]))
    with torch.no_grad(), hm.capture():
        var.model(torch.tensor([[5, 6, 7, 8]]))
    acts = hm.get_activations("resid_post", layer=1)
    assert (acts @ d.T).abs().max() < 1e-4


def test_sae_for_a_hook_the_model_lacks(tiny_folder, tmp_path):
    from trace_lib.errors import HookError
    from trace_lib.sae import SAE, SAEConfig, save_sae

    audit = trace.Audit(load_model(tiny_folder), quant_model="fp32")
    save_sae(SAE(SAEConfig(d_in=32, d_sae=16, architecture="relu", hook_name="blocks.7.hook_resid_post")),
             tmp_path / "deep")
    with pytest.raises(HookError, match="layer 7 is out of range"):
        audit.load_sae(tmp_path / "deep")


def test_examples_show_reference_top_tokens(tiny_audit):
    audit, result = tiny_audit
    int2 = result.variant("int2-rtn-g32")
    examples = int2.hooks["blocks.1.hook_resid_post"]["examples"]
    assert examples, "the most degraded features come with examples"
    for rows in examples.values():
        acts = [r["ref"] for r in rows]
        assert acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
        for r in rows:
            assert r["token"] and 0 <= r["prompt"] < len(result.prompts)


def test_readout_cpfr_separates_a_topk_switch_from_a_changed_detector():
    """Hand-worked: a k=1 TopK SAE over two latents reading x[0] and x[1]. Input (1.00, 0.99) -> (0.99, 1.00):
    the codes swap, so each latent's code CPFR is 1 - ||(1, 0) - (0, 0)|| / 1 = 0 on its token, while the
    readouts move by 0.01: readout CPFR = 1 - 0.01 / 1.00 = 0.99 for latent 0 and 1 - 0.01 / 0.99 for latent 1."""
    from trace_lib.metrics import CPFR
    from trace_lib.metrics.readout import encode_codes as _encode
    from trace_lib.metrics.readout import encoder_readout as _readout
    from trace_lib.metrics.readout import readout_differs as _differs
    from trace_lib.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=2, d_sae=2, architecture="topk", k=1, apply_b_dec_to_input=False))
    sae.W_enc.data.copy_(torch.eye(2))
    x_ref, x_var = torch.tensor([[1.00, 0.99]]), torch.tensor([[0.99, 1.00]])
    codes = CPFR().compute(_encode(sae, x_ref), _encode(sae, x_var))
    assert codes.per_feature[0].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isnan(codes.per_feature[1])  # latent 1 never fires in the reference: no reference signal
    readout = CPFR().compute(_readout(sae, x_ref, [0, 1]), _readout(sae, x_var, [0, 1]))
    assert readout.per_feature.tolist() == pytest.approx([0.99, 1 - 0.01 / 0.99], abs=1e-6)
    # a ReLU SAE's code is its readout: the two CPFRs are one number, and the summary prints it once
    relu = SAE(SAEConfig(d_in=2, d_sae=2, architecture="relu", apply_b_dec_to_input=False))
    relu.W_enc.data.copy_(torch.eye(2))
    assert torch.equal(_encode(relu, x_var), _readout(relu, x_var, [0, 1]))
    code = CPFR().compute(_encode(relu, x_ref), _encode(relu, x_var))
    assert torch.equal(code.per_feature, readout.per_feature)
    assert not _differs(float(code.per_feature[0]), float(readout.per_feature[0]))
    assert _differs(float(codes.per_feature[0]), float(readout.per_feature[0]))


def test_readout_cpfr_is_perfect_for_fp32_and_reported(tiny_audit):
    import copy
    import dataclasses

    _, result = tiny_audit
    fp32, int2 = result.variant("fp32"), result.variant("int2-rtn-g32")
    assert fp32.features and all(f.readout_cpfr == 1.0 for f in fp32.features)
    assert sum(f.readout_cpfr for f in int2.features) / len(int2.features) < 0.99
    assert all("readout_cpfr" in f for f in int2.to_dict()["features"])
    # The tiny model's fingerprint has capability features only, so the summary has no safety readout to print.
    # Call a TopK latent whose code switched off (CPFR far under its readout CPFR) a safety feature: the summary
    # then prints the variant's readout CPFR and the degraded feature's readout beside its CPFR.
    worst = min(int2.features, key=lambda f: f.cpfr - f.readout_cpfr)
    assert worst.cpfr < 0.8 and worst.readout_cpfr - worst.cpfr > 0.1
    edited = copy.copy(result)
    edited.variants = [dataclasses.replace(int2, features=[dataclasses.replace(worst, kind="safety")])]
    text = edited.summary()
    assert f"readout CPFR {worst.readout_cpfr:.3f}" in text
    assert f"encoder readout kept {worst.readout_cpfr:.2f})" in text


def test_quick_start_with_saes_from_a_folder(tiny_audit, tiny_folder, tmp_path):
    """The README's quick start, with SAEs loaded from a SAELens folder instead of trained."""
    from trace_lib.sae import save_sae

    trained, reference_result = tiny_audit
    sae = trained.sae_dict["blocks.1.hook_resid_post"]
    save_sae(sae, tmp_path / "saes" / "blocks.1.hook_resid_post")
    audit = trace.Audit(base_model=str(tiny_folder), quant_model="int2-rtn-g32", kl_chunks=2, kl_ctx=64)
    loaded = audit.load_sae(tmp_path / "saes")
    assert list(loaded) == ["blocks.1.hook_resid_post"]
    torch.testing.assert_close(loaded["blocks.1.hook_resid_post"].W_dec, sae.W_dec)
    results = audit.trace_features(dataset="harmful_refusal_v1")
    assert [v.name for v in results.variants] == ["int2-rtn-g32"]
    # the same SAE and model give the same measurement as the audit that trained it
    a = results.variant("int2-rtn-g32").hooks["blocks.1.hook_resid_post"]["cpfr_all_features"]
    b = reference_result.variant("int2-rtn-g32").hooks["blocks.1.hook_resid_post"]["cpfr_all_features"]
    assert a == pytest.approx(b, abs=1e-6)
    assert "int2-rtn-g32" in results.summary()


def test_cli_audit_writes_json_and_html(tiny_audit, tiny_folder, tmp_path, capsys):
    from trace_lib.cli import main
    from trace_lib.sae import save_sae

    trained, _ = tiny_audit
    save_sae(trained.sae_dict["blocks.1.hook_resid_post"], tmp_path / "sae")
    main(["audit", "--model", str(tiny_folder), "-v", "fp32", "-v", "int2-rtn-g32", "--sae", str(tmp_path / "sae"),
          "--out", str(tmp_path / "out"), "--html", str(tmp_path / "audit.html")])
    data = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert data["kind"] == "trace.audit" and [v["name"] for v in data["variants"]] == ["fp32", "int2-rtn-g32"]
    assert data["dataset"]["name"] == "safety_comprehensive_v1"  # the default: all three safety behaviours
    again = AuditResult.load(tmp_path / "out" / "audit.json")
    assert again.variant("fp32").hooks["blocks.1.hook_resid_post"]["cpfr_all_features"] == 1.0
    printed = capsys.readouterr().out
    assert "int2-rtn-g32" in printed and "wrote" in printed
    page = (tmp_path / "audit.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "int2-rtn-g32" in page


def test_reference_side_is_computed_once_and_frozen(tiny_audit):
    """The reference's SAE codes are encoded when the session is built, and a variant's audit encodes only the
    variant's activations: no SAE input during ``run`` is the reference's activations (the int2 variant's
    differ). The reference side is frozen: its fields cannot be reassigned nor its mappings written."""
    import dataclasses

    from trace_lib.audit import ReferenceSide
    from trace_lib.compare import resolve_variant
    from trace_lib.sae import SAE

    audit, result = tiny_audit
    hook = "blocks.1.hook_resid_post"
    seen: list[torch.Tensor] = []
    real_encode = SAE.encode

    def encode(self, x, *a, **k):
        seen.append(x.detach().clone())
        return real_encode(self, x, *a, **k)

    SAE.encode = encode
    try:
        sess = audit.session("harmful_refusal_v1")
        built = len(seen)
        ref = sess.ref
        ref_inputs = [ref.acts.acts[hook][ref.mask], ref.acts.acts[hook][ref.fp_mask]]

        def of_reference(x):  # a chunk (encode_codes' 4096 rows) of the reference's token activations
            return any(x.shape[1:] == r.shape[1:] and torch.equal(x, r[i:i + len(x)])
                       for r in ref_inputs for i in range(0, len(r), 4096))

        assert built >= 2 and sum(map(of_reference, seen)) >= 2  # encoded here, once
        seen.clear()
        int2 = sess.run(resolve_variant(audit.reference, "int2-rtn-g32"))
        ran = len(seen)
        assert ran and not any(map(of_reference, seen))
        seen.clear()
        sess.run(resolve_variant(audit.reference, "int2-rtn-g32"))
        assert len(seen) == ran  # a second variant costs the same: nothing of the reference is redone
    finally:
        SAE.encode = real_encode
    assert int2.to_dict()["hooks"] == result.variant("int2-rtn-g32").to_dict()["hooks"]
    assert sess.ref is ref and isinstance(ref, ReferenceSide)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.codes = {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.threshold = 0.5
    with pytest.raises(TypeError):
        ref.codes[hook] = torch.zeros(1)


def test_audit_variant_reads_the_reference_codes_it_is_given(tiny_audit):
    """``compare_variant`` takes the reference's codes from the reference side: zeroed reference codes leave no
    active reference feature to recover, so the whole-dictionary CPFR of fp32 goes from 1 to undefined."""
    import dataclasses
    from types import MappingProxyType

    from trace_lib.audit import compare_variant
    from trace_lib.compare import resolve_variant

    audit, _ = tiny_audit
    hook = "blocks.1.hook_resid_post"
    ref = audit.session("harmful_refusal_v1").ref
    fp32 = resolve_variant(audit.reference, "fp32")
    from trace_lib.capture.prompts import capture_prompts

    acts = capture_prompts(fp32, list(ref.texts), ref.hooks, batch_size=ref.batch_size)
    assert compare_variant(ref, "fp32", {}, acts).hooks[hook].cpfr_all_features == 1.0
    blank = dataclasses.replace(ref, codes=MappingProxyType({hook: torch.zeros_like(ref.codes[hook])}))
    whole = compare_variant(blank, "fp32", {}, acts).hooks[hook].cpfr_all_features
    assert whole != 1.0


def test_typed_records_write_the_dicts_they_replace(tiny_audit):
    from trace_lib.audit import DirectionAudit, HookStats

    _, result = tiny_audit
    v = result.variant("int2-rtn-g32")
    for s in v.hooks.values():
        assert isinstance(s, HookStats) and list(s.to_dict()) == list(s) and s["tokens"] == s.tokens
    assert all(isinstance(d, DirectionAudit) and d["cosine"] == d.cosine for d in v.directions)
    again = type(v).from_dict(json.loads(json.dumps(v.to_dict())))
    assert json.dumps(again.to_dict()) == json.dumps(v.to_dict())
    assert HookStats.from_dict({"cpfr_all_features": 0.8, "new_key": 1}).to_dict() == {"cpfr_all_features": 0.8,
                                                                                         "new_key": 1}


def test_probes_fidelity_and_damage_are_in_the_result(tiny_audit, tmp_path):
    """Issue 13: the probes of the reference basis read through each variant (fp32: identical, change exactly
    0), the SAE's fidelity on the audited tokens (equal to evaluate_sae on the reference's activations of the
    same tokens), readable damage on every feature; all in the JSON, the summary and the page."""
    from trace_lib.report import render_html
    from trace_lib.sae.quality import evaluate_sae

    audit, result = tiny_audit
    hook = "blocks.1.hook_resid_post"
    fp32, int2 = result.variant("fp32"), result.variant("int2-rtn-g32")
    cats = list(result.fingerprint["reference_eval"])
    assert {(p.category, p.hook, p.method) for p in fp32.probes} == {
        (c, hook, m) for c in cats for m in ("logistic", "diff_in_means")}
    for p in fp32.probes:
        assert p.variant == p.reference and (p.auroc_diff, p.auroc_diff_low, p.auroc_diff_high) == (0.0, 0.0, 0.0)
        assert p.n_resamples == 1000 and p.n_train_safety > 0
    for p in (p for p in fp32.probes if p.method == "diff_in_means"):  # the fingerprint's own direction AUROC
        want = result.fingerprint["reference_eval"][p.category]["direction_auroc"][p.hook]
        assert p.reference.auroc == pytest.approx(want, abs=1e-6)
    assert [(p.category, p.method, p.reference) for p in int2.probes] == [
        (p.category, p.method, p.reference) for p in fp32.probes]  # the reference side is the same
    ref = audit.session("harmful_refusal_v1").ref
    q = evaluate_sae(audit.sae_dict[hook], ref.acts.acts[hook][ref.mask])
    fid = result.basis_fidelity[hook]
    assert fid.explained_variance == pytest.approx(q["explained_variance"], rel=1e-9)
    assert fid.l0 == pytest.approx(q["l0"]) and fid.tokens == q["tokens"] == int(ref.mask.sum())
    assert fid.training_l0 == audit.sae_dict[hook].cfg.metadata["quality"]["l0"]
    assert -10 < fid.ce_loss_recovered < 10 and fid.ce_prompts > 0
    assert all(f.damage == "kept" for f in fp32.features if f.firing_rate_ref > 0)
    assert {f.damage for f in int2.features} <= {"kept", "silenced", "over-fired", "moved", ""}
    text = result.summary()
    assert f"basis: SAE at {hook}" in text and f"probe at {hook}: AUROC" in text
    again = AuditResult.load(result.save(tmp_path / "a.json"))
    assert again.summary() == text and again.basis_fidelity[hook].l0 == fid.l0
    page = render_html(result)
    assert 'id="basis-table"' in page and 'id="probes-table"' in page


def test_files_written_before_probes_fidelity_and_damage_still_load(tiny_audit):
    _, result = tiny_audit
    d = json.loads(json.dumps(result.to_dict()))
    d.pop("basis_fidelity")
    for v in d["variants"]:
        v.pop("probes")
        for f in v["features"]:
            for k in ("damage", "mass_ratio", "mass_kept", "on_target", "firing_jaccard"):
                f.pop(k)
    old = AuditResult.from_dict(d)
    assert old.basis_fidelity == {} and old.variants[0].probes == [] and old.variants[0].features[0].damage == ""
    assert "basis" not in old.summary() and "probe at" not in old.summary()


def test_localize_audit_localises_only_flagged_variants(tiny_audit):
    """``trace audit --localize``: fp32 (nothing degraded) gets no localisation; the flagged 2-bit variant gets
    one, here the reason there is no ranking (a random model refuses nothing), and its summary shows it."""
    import copy

    from trace_lib.attribution.triage import localize_audit

    audit, result = tiny_audit
    result = copy.deepcopy(result)
    fp32, int2 = result.variant("fp32"), result.variant("int2-rtn-g32")
    # flag it by hand: the tiny fingerprint's safety features may all keep CPFR above the threshold
    int2.degraded = lambda kind="safety": int2.features[:1]
    localize_audit(audit, result, "harmful_refusal_v1")
    assert fp32.localization is None
    assert int2.localization["line"].startswith("not localised:") and "refuses none" in int2.localization["line"]
    assert int2.localization["line"] in result.summary()


def test_category_verdicts_count_each_category_and_render():
    """Per-category verdicts: a feature selected for two categories counts in both; the means and counts are
    recomputed here by hand, and the summary and the page carry one line / row per category."""
    from trace_lib.audit.records import FeatureAudit, VariantAudit
    from trace_lib.report.audit import categories_table

    def feat(i, cat, cpfr, damage):
        return FeatureAudit(hook="blocks.1.hook_resid_post", feature=i, kind="safety", category=cat, train_auroc=0.9,
                            cpfr=cpfr, relative_mean_change=0.0, normalized_wasserstein=0.0, firing_rate_ref=0.1,
                            firing_rate_variant=0.1, token_muting_rate=0.0, muted=False, prompt_activation_kept=1.0,
                            damage=damage)

    feats = [feat(0, "refusal", 0.5, "silenced"), feat(1, "refusal,uncertainty", 0.95, "kept"),
             feat(2, "uncertainty", 0.9, "kept"), feat(3, "safety_warning", -0.2, "moved"),
             feat(4, "safety_warning", 0.7, "over-fired")]
    v = VariantAudit("int4", {}, feats, {}, [], {}, None, degradation_threshold=0.8)
    cats = {c.category: c for c in v.category_verdicts()}
    assert list(cats) == ["refusal", "uncertainty", "safety_warning"]
    assert cats["refusal"].cpfr == pytest.approx((0.5 + 0.95) / 2) and cats["refusal"].n_features == 2
    assert cats["uncertainty"].verdict == "ok" and cats["uncertainty"].cpfr == pytest.approx(0.925)
    assert cats["safety_warning"].n_degraded == 2 and cats["safety_warning"].damage == {"moved": 1, "over-fired": 1}
    assert cats["refusal"].line() == ("[WARNING] refusal: CPFR 0.725 over 2 features, 1 degraded (CPFR < 0.8): "
                                      "1 silenced")
    again = VariantAudit.from_dict(json.loads(json.dumps(v.to_dict())))
    assert [c.to_dict() for c in again.category_verdicts()] == v.to_dict()["categories"]
    page = str(categories_table([v]))
    assert 'id="categories-table"' in page and page.count("<tr") == 4  # header + three categories
    # A category with probes but no selected feature still gets a verdict: from its probe's paired interval.
    from trace_lib.probes.records import ProbeAudit, ProbeScore

    score = ProbeScore(auroc=0.9, accuracy=0.8)
    drop = ProbeAudit(category="harm_warning", hook="blocks.1.hook_resid_post", method="logistic",
                      reference=score, variant=score, auroc_diff=-0.2, auroc_diff_low=-0.3, auroc_diff_high=-0.1)
    v.probes = [drop]
    extra = v.category_verdicts()[-1]
    assert extra.category == "harm_warning" and extra.n_features == 0 and extra.verdict == "WARNING"
    assert extra.line() == ("[WARNING] harm_warning: no SAE feature passed the fingerprint's thresholds; probe AUROC "
                            "change -0.200 at blocks.1.hook_resid_post (significant drop)")
