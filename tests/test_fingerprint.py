"""Safety fingerprints on a tiny random Llama with a planted signal (fast: a few forward passes of 8 tokens).

Safety prompts end with the trigger word "bomb" twice, baseline prompts with "cake" twice; the other words are
drawn from the same filler list. A hand-built ReLU SAE reads, at each hook:

* feature 3: the post-instruction difference-in-means direction, estimated on a separate *calibration* set,
  with its bias at the midpoint, so it must be selected with AUROC ~1 on new prompts;
* feature 5: the "bomb" embedding direction, with a threshold that only the trigger tokens themselves (in the
  user's message) exceed, so it is invisible at the post-instruction positions but obvious over all tokens;
* the others: random unit directions.
"""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest
import torch

from trace_lib.audit import fingerprint_cache_key
from trace_lib.capture.prompts import capture_prompts
from trace_lib.errors import DatasetError, ResultFormatError, SAEError, TraceError
from trace_lib.fingerprint import (
    CircuitTracer,
    DirectionRecord,
    FeatureRecord,
    SafetyFingerprint,
    _sae_identity,
    fingerprint_from_dataset,
)
from trace_lib.metrics.directions import diff_in_means, unit
from trace_lib.metrics.stats import auroc, bh_adjust, cohens_d_columns, contrast_statistics
from trace_lib.models import from_model
from trace_lib.sae import load_sae, save_sae
from trace_lib.sae.model import SAE, SAEConfig

from conftest import TINY

FILLER = ("the a cat dog house tree red blue green small big old new river stone cloud door road book lamp "
          "chair").split()
WORDS = [*FILLER, "bomb", "cake", "please", "make"]
SPECIAL = ["<pad>", "<unk>", "<u>", "</u>", "<a>"]
TEMPLATE = ("{% for m in messages %}<u> {{ m['content'] }} </u>{% endfor %}"
            "{% if add_generation_prompt %}<a>{% endif %}")
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
D_SAE = 16
PLANTED, USER_ONLY = 3, 5


def prompts(n: int, trigger: str, seed: int) -> list[str]:
    r = random.Random(seed)
    return [" ".join(["please", "make", *r.sample(FILLER, 2), trigger, trigger]) for _ in range(n)]


def make_tokenizer():
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<a>")
    tok.add_special_tokens({"additional_special_tokens": ["<u>", "</u>", "<a>"]})
    tok.chat_template = TEMPLATE
    return tok


def make_model():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(**{**TINY, "vocab_size": len(SPECIAL) + len(WORDS)}, pad_token_id=0, eos_token_id=4)
    cfg._attn_implementation = "eager"
    return T.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    model = make_model()
    loaded = from_model(model, tok, name="tiny-fingerprint")
    cal_s, cal_b = prompts(30, "bomb", 1), prompts(30, "cake", 2)
    acts = capture_prompts(loaded, cal_s + cal_b, HOOKS)
    is_safety = acts.prompt < 30
    trigger_tok = is_safety & ((acts.from_end == 2) | (acts.from_end == 3))  # "... bomb bomb </u> <a>"
    post = acts.select("post_instruction")
    embed = loaded.arch.embed.weight.detach()
    saes, planted_dirs = {}, {}
    g = torch.Generator().manual_seed(0)
    for hook in HOOKS:
        x = acts.acts[hook]
        post_mean = acts.per_prompt(x, "post_instruction", "mean")
        w3 = unit(diff_in_means(post_mean[:30], post_mean[30:]))
        proj = post_mean @ w3
        last = acts.per_prompt(x, "last", "mean")
        planted_dirs[hook] = diff_in_means(last[:30], last[30:])
        w5 = unit(embed[SPECIAL.__len__() + WORDS.index("bomb")])
        p5 = x @ w5
        # precondition of the positions test: only the trigger tokens themselves reach the threshold
        assert p5[trigger_tok].min() > p5[~trigger_tok].max() + 0.01
        assert p5[trigger_tok].min() > p5[post].max() + 0.01
        W = torch.randn(TINY["hidden_size"], D_SAE, generator=g)
        W /= W.norm(dim=0)
        W[:, PLANTED], W[:, USER_ONLY] = w3, w5
        b = torch.zeros(D_SAE)
        b[PLANTED] = -(proj[:30].mean() + proj[30:].mean()) / 2
        b[USER_ONLY] = -(p5[trigger_tok].min() + p5[~trigger_tok].max()) / 2
        sae = SAE(SAEConfig(d_in=TINY["hidden_size"], d_sae=D_SAE, architecture="relu", hook_name=hook))
        sae.W_enc.data.copy_(W)
        sae.b_enc.data.copy_(b)
        saes[hook] = sae
    return {"loaded": loaded, "tok": tok, "model": model, "saes": saes, "planted": planted_dirs}


@pytest.fixture(scope="module")
def fitted(setup):
    tracer = CircuitTracer(setup["loaded"], setup["saes"])
    fp = tracer.create_fingerprint({"refusal": prompts(30, "bomb", 11)}, prompts(30, "cake", 12),
                                   capability_prompts={"same": prompts(16, "cake", 100),
                                                       "trig": prompts(12, "bomb", 14)}, top_k=6)
    return tracer, fp


# ---------------------------------------------------------------------------------------------- statistics


def test_auroc_and_u_match_pair_counting():
    s = np.array([3.0, 1.0, 2.0, 2.0])
    b = np.array([2.0, 0.0, 1.0])
    st = contrast_statistics(s, b)
    assert st["u_statistic"][0] == pytest.approx(9.5)  # 3 + 1.5 + 2.5 + 2.5
    assert st["auroc"][0] == pytest.approx(9.5 / 12)
    rng = np.random.default_rng(0)
    xs, xb = rng.integers(0, 4, (9, 6)).astype(float), rng.integers(0, 4, (7, 6)).astype(float)
    st = contrast_statistics(xs, xb)
    for j in range(6):
        pairs = sum((a > c) + 0.5 * (a == c) for a in xs[:, j] for c in xb[:, j])
        assert st["u_statistic"][j] == pytest.approx(pairs)
        assert st["auroc"][j] == pytest.approx(pairs / 63)
    assert auroc([1.0, 2.0], [0.0, 0.5]) == 1.0


def test_p_values_and_constant_features():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(1)
    xs = np.concatenate([rng.normal(1, 1, (20, 3)), np.zeros((20, 1))], 1)
    xb = np.concatenate([rng.normal(0, 1, (25, 3)), np.zeros((25, 1))], 1)
    st = contrast_statistics(xs, xb)
    for j in range(3):
        assert st["p_value"][j] == pytest.approx(mannwhitneyu(xs[:, j], xb[:, j]).pvalue)
    assert st["p_value"][3] == 1.0 and st["auroc"][3] == 0.5 and st["constant"][3]
    assert st["effect_size"][3] == 0.0
    assert st["fire_rate_safety"][3] == 0.0


def test_bh_hand_worked():
    p = [0.01, 0.04, 0.03, 0.005, 0.20]
    # sorted: .005 .01 .03 .04 .2 -> p*m/rank: .025 .025 .05 .05 .2 -> running min from the top
    assert bh_adjust(p) == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.2])


def test_cohens_d_hand_worked():
    assert cohens_d_columns([1, 2, 3], [4, 5, 6])[0] == pytest.approx(-3.0)
    # pooled = sqrt((3 * 20/3 + 0) / 6) = sqrt(10/3)
    assert cohens_d_columns([2, 4, 6, 8], [1, 1, 1, 1])[0] == pytest.approx(4 / math.sqrt(10 / 3))
    assert cohens_d_columns([1, 1], [2, 2])[0] == 0.0


# ---------------------------------------------------------------------------------------------- the tracer


def test_prompt_features_match_direct_computation(setup, monkeypatch):
    import trace_lib.fingerprint.tracer as fpmod

    monkeypatch.setattr(fpmod, "_CHUNK_ELEMENTS", 3 * D_SAE)  # force many chunks
    ps = prompts(5, "bomb", 40) + prompts(4, "cake", 41)
    tracer = CircuitTracer(setup["loaded"], setup["saes"])
    feats = tracer.prompt_features(ps)
    resid = tracer.prompt_residuals(ps)
    acts = capture_prompts(setup["loaded"], ps, HOOKS)
    for hook, sae in setup["saes"].items():
        codes = sae.encode(acts.acts[hook]).detach()
        assert feats[hook].shape == (9, D_SAE)
        torch.testing.assert_close(feats[hook], acts.per_prompt(codes, "post_instruction", "max"))
        torch.testing.assert_close(resid[hook], acts.per_prompt(acts.acts[hook], "last", "mean"))
    mean_tracer = CircuitTracer(setup["loaded"], setup["saes"], reduce="mean", positions="all")
    codes = setup["saes"][HOOKS[0]].encode(acts.acts[HOOKS[0]]).detach()
    torch.testing.assert_close(mean_tracer.prompt_features(ps)[HOOKS[0]], acts.per_prompt(codes, "all", "mean"))


def test_planted_feature_selected(fitted):
    _, fp = fitted
    assert fp.categories == ["refusal"]
    top = fp.features[0]
    assert top.feature == PLANTED and top.auroc > 0.99 and top.p_adjusted < 1e-6
    assert top.mean_safety > top.mean_baseline and top.label == "refusal"
    for hook in HOOKS:
        assert PLANTED in fp.feature_ids(hook)
        assert USER_ONLY not in fp.feature_ids(hook)  # it never fires at the post-instruction tokens
    assert len(fp.features) <= 6
    assert all(r.p_adjusted < 0.05 and r.auroc >= 0.7 for r in fp.features)
    ranks = [(-r.auroc, -r.effect_size) for r in fp.features]
    assert ranks == sorted(ranks)
    assert fp.features_for("refusal", HOOKS[1]) == [r for r in fp.features if r.hook == HOOKS[1]]
    m = fp.metadata
    assert m["prompt_counts"]["refusal"] == {"safety": 30, "baseline": 30}
    assert m["hooks"] == HOOKS and m["positions"] == "post_instruction" and m["reduce"] == "max"
    assert m["saes"][HOOKS[0]]["d_sae"] == D_SAE and len(m["saes"][HOOKS[0]]["w_enc_sha256"]) == 64
    assert m["n_post_instruction_tokens"] == 2
    assert "blocks.1.hook_resid_post #3 AUROC 1.00" in fp.summary()


def test_capability_categories(fitted):
    _, fp = fitted
    assert fp.capability_categories == ["same", "trig"]
    assert fp.features_for("same") == []  # same distribution as the baseline prompts: nothing selected
    trig = fp.features_for("trig")
    assert trig and trig[0].feature == PLANTED and trig[0].label == "trig"
    assert fp.feature_ids(HOOKS[0], kind="capability") == sorted({r.feature for r in trig if r.hook == HOOKS[0]})
    assert not [d for d in fp.directions if d.category in ("same", "trig")]


def test_direction_recovered(fitted, setup):
    _, fp = fitted
    for hook in HOOKS:
        d = fp.direction("refusal", hook)
        cos = torch.nn.functional.cosine_similarity(d.double(), setup["planted"][hook].double(), dim=0)
        assert cos > 0.9
        rec = next(r for r in fp.directions if r.hook == hook)
        assert rec.auroc > 0.99 and rec.norm == pytest.approx(float(d.norm()), rel=1e-5)
    with pytest.raises(TraceError, match="no direction"):
        fp.direction("nope", HOOKS[0])


def test_evaluate_held_out(fitted):
    tracer, fp = fitted
    res = fp.evaluate(tracer, {"refusal": prompts(40, "bomb", 21)}, prompts(40, "cake", 22))
    r = res["categories"]["refusal"]
    assert r["n_safety"] == 40 and r["score_auroc"] > 0.95
    assert all(a > 0.95 for a in r["direction_auroc"].values())
    planted = [f for f in r["features"] if f["feature"] == PLANTED]
    assert len(planted) == 2 and all(f["test_auroc"] > 0.97 for f in planted)
    other = CircuitTracer(tracer.loaded, {h: SAE(s.cfg) for h, s in tracer.saes.items()})
    with pytest.raises(SAEError, match="not the one"):
        fp.evaluate(other, {"refusal": prompts(4, "bomb", 21)}, prompts(4, "cake", 22))


def _with_bias(sae: SAE, latent: int = 0, delta: float = 0.5) -> SAE:
    out = copy.deepcopy(sae)
    with torch.no_grad():
        out.b_enc[latent] += delta
    return out


def test_sae_identity_and_cache_keys_cover_biases_and_thresholds(tmp_path):
    """SAEs equal in W_enc but not in b_enc (or a JumpReLU threshold) get different identities, hence different
    fingerprint cache keys and fingerprint metadata; equal SAEs, also after a SAELens round trip, get equal ones."""
    g = torch.Generator().manual_seed(3)
    relu = SAE(SAEConfig(d_in=32, d_sae=D_SAE, architecture="relu", hook_name=HOOKS[0]))
    jump = SAE(SAEConfig(d_in=32, d_sae=D_SAE, architecture="jumprelu", hook_name=HOOKS[0]))
    for sae in (relu, jump):
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.rand(p.shape, generator=g))
    moved_threshold = copy.deepcopy(jump)
    with torch.no_grad():
        moved_threshold.threshold[1] += 0.5
    for a, b in ((relu, _with_bias(relu)), (jump, _with_bias(jump)), (jump, moved_threshold)):
        assert torch.equal(a.W_enc, b.W_enc)
        assert _sae_identity(a)["w_enc_sha256"] == _sae_identity(b)["w_enc_sha256"]  # the old identity
        assert a.content_hash() != b.content_hash()
        assert _sae_identity(a) != _sae_identity(b)
        key_a = fingerprint_cache_key("model", "data", None, {HOOKS[0]: a}, 0)
        assert key_a != fingerprint_cache_key("model", "data", None, {HOOKS[0]: b}, 0)
        back = load_sae(save_sae(a, tmp_path / a.cfg.architecture))
        assert back.content_hash() == a.content_hash() and _sae_identity(back) == _sae_identity(a)
        assert key_a == fingerprint_cache_key("model", "data", None, {HOOKS[0]: back}, 0)
        assert key_a == fingerprint_cache_key("model", "data", None, {HOOKS[0]: copy.deepcopy(a)}, 0)


def test_evaluate_checks_the_whole_sae(fitted):
    """An SAE differing from the fitted one only in a bias is refused; a fingerprint written before the content
    hash (W_enc's hash only) is still checked by W_enc."""
    tracer, fp = fitted
    ident = fp.metadata["saes"][HOOKS[0]]
    assert ident["content_sha256"] == tracer.saes[HOOKS[0]].content_hash()
    other = CircuitTracer(tracer.loaded, {h: _with_bias(s, PLANTED, 1e-3) for h, s in tracer.saes.items()})
    with pytest.raises(SAEError, match="not the one.*content hash"):
        fp.evaluate(other, {"refusal": prompts(4, "bomb", 21)}, prompts(4, "cake", 22))
    old = SafetyFingerprint.from_dict(fp.to_dict())
    for entry in old.metadata["saes"].values():
        del entry["content_sha256"]
    res = old.evaluate(other, {"refusal": prompts(4, "bomb", 21)}, prompts(4, "cake", 22))
    assert res["categories"]["refusal"]["n_safety"] == 4


def test_positions_post_instruction_vs_all(setup):
    tracer = CircuitTracer(setup["loaded"], setup["saes"], positions="all")
    fp = tracer.create_fingerprint({"refusal": prompts(30, "bomb", 11)}, prompts(30, "cake", 12))
    for hook in HOOKS:
        assert USER_ONLY in fp.feature_ids(hook)
    assert fp.features[0].feature == USER_ONLY and fp.features[0].auroc == 1.0


def test_null_contrast_selects_nothing(setup):
    g = torch.Generator().manual_seed(1)
    saes = {}
    for hook in HOOKS:
        sae = SAE(SAEConfig(d_in=32, d_sae=64, architecture="relu", hook_name=hook))
        sae.W_enc.data.copy_(torch.randn(32, 64, generator=g))
        saes[hook] = sae
    tracer = CircuitTracer(setup["loaded"], saes)
    # Both groups from one distribution: under this null BH admits any feature with probability <= alpha,
    # so over 6 independent draws at most one may select anything (binomial tail < 5%).
    found = []
    for seed in range(6):
        fp = tracer.create_fingerprint({"refusal": prompts(20, "cake", 100 + seed)}, prompts(20, "cake", 200 + seed))
        found.append(len(fp.features))
        assert len(fp.features) == sum(fp.metadata["candidates"]["refusal"].values())
    assert sum(n > 0 for n in found) <= 1, found


# ---------------------------------------------------------------------------------------------- files


def test_save_load_round_trip(fitted, tmp_path):
    _, fp = fitted
    path = fp.save(tmp_path / "fp.json")
    data = json.loads(path.read_text())
    assert data["kind"] == "trace.fingerprint" and data["version"] == 1
    back = SafetyFingerprint.load(path)
    assert back == fp
    assert back.features == fp.features and back.directions == fp.directions
    torch.testing.assert_close(back.direction("refusal", HOOKS[0]), fp.direction("refusal", HOOKS[0]))


def test_load_errors(tmp_path, fitted):
    _, fp = fitted
    with pytest.raises(TraceError, match="no fingerprint file"):
        SafetyFingerprint.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "trace.compare", "version": 1}))
    with pytest.raises(ResultFormatError, match="kind"):
        SafetyFingerprint.load(bad)
    bad.write_text(json.dumps({**fp.to_dict(), "version": 99}))
    with pytest.raises(ResultFormatError, match="version"):
        SafetyFingerprint.load(bad)
    d = fp.to_dict()
    del d["features"][0]["auroc"]
    bad.write_text(json.dumps(d))
    with pytest.raises(ResultFormatError, match="auroc"):
        SafetyFingerprint.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ResultFormatError):
        SafetyFingerprint.load(bad)


def test_nan_round_trip(tmp_path):
    rec = FeatureRecord("c", "blocks.0.hook_resid_post", 1, float("nan"), 0.0, 1.0, 0.5, 0.5, 0, 0, 0, 0, "c")
    fp = SafetyFingerprint(["c"], [rec], [], [DirectionRecord("c", "h", [1.0, 0.0], 1.0, 0.5)], {"hooks": []})
    back = SafetyFingerprint.load(fp.save(tmp_path / "n.json"))
    assert math.isnan(back.features[0].auroc) and back == fp


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_prompt_groups(setup):
    tracer = CircuitTracer(setup["loaded"], setup["saes"])
    base = prompts(4, "cake", 1)
    with pytest.raises(DatasetError, match="refusal"):
        tracer.create_fingerprint({"refusal": []}, base)
    with pytest.raises(DatasetError, match="baseline"):
        tracer.create_fingerprint({"refusal": base}, [])
    with pytest.raises(DatasetError, match="at least 2"):
        tracer.create_fingerprint({"refusal": base[:1]}, base)
    with pytest.raises(DatasetError, match="code"):
        tracer.create_fingerprint({"refusal": base}, base, capability_prompts={"code": []})
    with pytest.raises(DatasetError, match="refusal"):
        tracer.create_fingerprint({"refusal": base}, {"other": base})


def test_bad_saes_and_models(setup):
    wrong = SAE(SAEConfig(d_in=16, d_sae=8, architecture="relu"))
    with pytest.raises(SAEError, match="d_in=16"):
        CircuitTracer(setup["loaded"], {HOOKS[0]: wrong})
    elsewhere = SAE(SAEConfig(d_in=32, d_sae=8, architecture="relu", hook_name=HOOKS[1]))
    with pytest.raises(SAEError, match="trained on"):
        CircuitTracer(setup["loaded"], {HOOKS[0]: elsewhere})
    with pytest.raises(TraceError, match="tokenizer"):
        CircuitTracer(setup["model"], setup["saes"])
    with pytest.raises(TraceError, match="positions"):
        CircuitTracer(setup["loaded"], setup["saes"], positions="middle")
    bare = CircuitTracer(setup["model"], setup["saes"], tokenizer=setup["tok"])
    assert bare.hooks == HOOKS
    nan_sae = SAE(SAEConfig(d_in=32, d_sae=8, architecture="relu", hook_name=HOOKS[1]))
    nan_sae.b_enc.data[2] = float("nan")
    tracer = CircuitTracer(setup["loaded"], {"blocks.1.hook_resid_post": nan_sae})
    with pytest.raises(TraceError, match="blocks.1.hook_resid_post"):
        tracer.prompt_features(prompts(3, "bomb", 1))


def test_fingerprint_from_dataset(setup):
    tracer = CircuitTracer(setup["loaded"], setup["saes"])
    fp = fingerprint_from_dataset(tracer, "safety_comprehensive_v1", top_k=3)
    assert fp.categories == ["refusal", "safety_warning", "uncertainty"]
    assert fp.capability_categories == ["arithmetic", "code", "facts", "reasoning", "translation"]
    counts = fp.metadata["prompt_counts"]
    assert counts["refusal"] == {"safety": 96, "baseline": 96}
    assert counts["uncertainty"] == {"safety": 65, "baseline": 65}
    assert counts["code"]["baseline"] == 96 + 65 + 70
    assert fp.metadata["dataset"]["name"] == "safety_comprehensive_v1"
    assert fp.metadata["dataset"]["split"] == "train"
    single = fingerprint_from_dataset(tracer, "harmful_refusal_v1", capability_dataset=None)
    assert single.categories == ["refusal"] and single.capability_categories == []
