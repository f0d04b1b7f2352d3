"""Repair by steering and by weight editing, on tiny random models of every family.

Steering is checked against the activations it must produce (the next block's input = the unsteered residual
plus strength * direction), its hook's lifetime, a hand-computed difference in means, and the strength rule on
hand-made outcomes. The weight edit is checked against the existing hook-based ablation on every hook point,
its inverse against the original weights, and the tied unembedding against the original embedding.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import binomtest

from trace_lib.capture import HookConfig, HookManager, installed_hooks, remove_hooks
from trace_lib.errors import HookError, InvalidValueError, TraceError
from trace_lib.intervene import ablate_directions
from trace_lib.redteam.classify import ReplyLabel
from trace_lib.repair import (
    EditUnsupportedError,
    Outcomes,
    SteeringVector,
    choose_strength,
    remove_direction,
    restore_direction,
    select_strength,
    steer_variant,
)

from conftest import ARCHS, TINY, tiny_loaded

EDITABLE = [a for a in ARCHS if not a.startswith("gemma")]


def _ids(seed: int = 1, vocab: int = 100) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(seed))


def _direction(d: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(ids).logits


def _all_acts(loaded, ids):
    """Every hook point's activation [batch, seq, d] and the logits, from one forward pass."""
    names = loaded.arch.hook_names()
    hm = HookManager(loaded, HookConfig(layers=[], hook_points=(), names=tuple(names)))
    with hm.capture():
        logits = _logits(loaded, ids)
    return {n: hm.get_activations(n) for n in names}, logits


# ------------------------------------------------------------------------------------------------ a chat model
WORDS = "the a cat dog house tree red blue green small big old river stone cloud door road book lamp chair".split()
SPECIAL = ["<pad>", "<unk>", "<u>", "</u>", "<a>"]
TEMPLATE = ("{% for m in messages %}<u> {{ m['content'] }} </u>{% endfor %}"
            "{% if add_generation_prompt %}<a>{% endif %}")


def _chat_loaded():
    """A tiny Llama with a word-level tokenizer and a chat template: ``<u> words </u> <a>`` (2 post-instruction
    tokens)."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    from trace_lib.models import from_model

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<a>")
    tok.add_special_tokens({"additional_special_tokens": ["<u>", "</u>", "<a>"]})
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    cfg = T.LlamaConfig(**{**TINY, "vocab_size": len(vocab)}, pad_token_id=0, eos_token_id=4)
    cfg._attn_implementation = "eager"
    return from_model(T.LlamaForCausalLM(cfg).eval(), tok, name="tiny-chat")


POSITIVE = ["the cat red house", "a dog blue tree stone", "cat cat river", "small old door road book"]
NEGATIVE = ["lamp chair green", "big cloud", "the book the lamp the road", "tree stone river cloud door"]


# ------------------------------------------------------------------------------------------------ steering
def test_strength_zero_changes_nothing():
    ref = tiny_loaded("llama")
    ids = _ids()
    sv = SteeringVector(_direction(ref.d_model), "blocks.1.hook_resid_post")
    plain = _logits(ref, ids)
    with sv.apply(ref, 0.0):
        assert torch.equal(_logits(ref, ids), plain)
    assert torch.equal(_logits(sv.as_variant(ref, 0), ids), plain)


@pytest.mark.parametrize("arch", ARCHS)
def test_steering_adds_strength_times_direction_to_the_next_blocks_input(arch):
    ref = tiny_loaded(arch)
    ids, d, s = _ids(), _direction(ref.d_model), 2.5
    names = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_pre", "blocks.0.hook_resid_post")
    hm = HookManager(ref, HookConfig(layers=[], hook_points=(), names=names))
    with hm.capture():
        plain_logits = _logits(ref, ids)
    plain = {n: hm.get_activations(n) for n in names}
    hm.clear()
    with SteeringVector(d, "blocks.1.hook_resid_post").apply(ref, s), hm.capture():
        steered_logits = _logits(ref, ids)
    steered = {n: hm.get_activations(n) for n in names}
    assert torch.equal(steered["blocks.0.hook_resid_post"], plain["blocks.0.hook_resid_post"])  # upstream: same
    expected = plain["blocks.1.hook_resid_post"] + s * d  # every token, position 0 included
    torch.testing.assert_close(steered["blocks.2.hook_resid_pre"], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(steered_logits, plain_logits)
    # a resid_pre hook adds to the block's input
    hm2 = HookManager(ref, HookConfig(layers=[], hook_points=(), names=("blocks.1.hook_resid_pre",)))
    with SteeringVector(d, "blocks.1.hook_resid_pre").apply(ref, -1.0), hm2.capture():
        _logits(ref, ids)
    torch.testing.assert_close(hm2.get_activations("blocks.1.hook_resid_pre"),
                               plain["blocks.0.hook_resid_post"] - d, rtol=0, atol=1e-6)


def test_apply_removes_its_hook_when_the_body_raises():
    ref = tiny_loaded("llama")
    ids = _ids()
    plain = _logits(ref, ids)
    sv = SteeringVector(_direction(ref.d_model), "blocks.0.hook_resid_post")
    with pytest.raises(RuntimeError, match="boom"), sv.apply(ref, 3.0):
        assert [(r.kind, r.permanent) for r in installed_hooks(ref)] == [("steering", False)]
        raise RuntimeError("boom")
    assert installed_hooks(ref) == []
    assert torch.equal(_logits(ref, ids), plain)


def test_steered_variant_identity_and_hook():
    ref = tiny_loaded("llama")
    d = _direction(ref.d_model)
    sv = SteeringVector(d, "blocks.1.hook_resid_post")
    v = sv.as_variant(ref, 4.0)
    assert v.name == "tiny-llama+steer(L1,4)" and v.quant_info["steering"]["strength"] == 4.0
    assert installed_hooks(ref) == []  # the reference is untouched
    (rec,) = installed_hooks(v)
    assert (rec.hook_name, rec.kind, rec.permanent) == ("blocks.1.hook_resid_post", "steering", True)
    hashes = {v.content_hash, sv.as_variant(ref, 4.5).content_hash, ref.content_hash,
              SteeringVector(d + 1e-3, "blocks.1.hook_resid_post").as_variant(ref, 4.0).content_hash,
              SteeringVector(d, "blocks.2.hook_resid_post").as_variant(ref, 4.0).content_hash}
    assert len(hashes) == 5
    assert sv.as_variant(ref, 4.0).content_hash == v.content_hash  # the same steering: the same variant
    ids = _ids()
    with sv.apply(ref, 4.0):
        torch.testing.assert_close(_logits(v, ids), _logits(ref, ids), rtol=0, atol=0)
    two = steer_variant(ref, [sv, SteeringVector(d, "blocks.0.hook_resid_post")], 1.0)
    assert len(installed_hooks(two)) == 2 and two.name == "tiny-llama+steer(L1,L0,1)"
    remove_hooks(v, kind="steering")
    assert torch.equal(_logits(v, ids), _logits(ref, ids))


@pytest.mark.parametrize("position", ["last", "post_instruction"])
def test_from_prompts_equals_a_hand_computed_difference_in_means(position):
    loaded = _chat_loaded()
    tok, layer = loaded.tokenizer, 1

    def per_prompt(text):
        chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True)
        ids = torch.tensor([tok(chat, add_special_tokens=False)["input_ids"]])
        assert tok.convert_ids_to_tokens(ids[0, -2:].tolist()) == ["</u>", "<a>"]
        with torch.no_grad():
            h = loaded.model(ids, output_hidden_states=True).hidden_states[layer + 1][0].double()
        return h[-1] if position == "last" else h[-2:].mean(0)  # the 2 post-instruction tokens

    expected = (torch.stack([per_prompt(p) for p in POSITIVE]).mean(0)
                - torch.stack([per_prompt(p) for p in NEGATIVE]).mean(0))
    sv = SteeringVector.from_prompts(loaded, POSITIVE, NEGATIVE, layer, position=position, batch_size=3)
    assert sv.hook_name == "blocks.1.hook_resid_post" and sv.layer == 1
    torch.testing.assert_close(sv.direction.double(), expected, rtol=0, atol=1e-5)
    assert sv.meta["n_positive"] == 4 and sv.meta["position"] == position
    assert abs(sv.meta["norm"] - float(expected.norm())) < 1e-4


# ------------------------------------------------------------------------------------------------ strength
def _out(harmful: str, harmless: str) -> Outcomes:
    return Outcomes(tuple(c == "1" for c in harmful), tuple(c == "1" for c in harmless))


def test_select_strength_picks_the_smallest_that_restores_without_over_refusal():
    ref = _out("1111111110", "1000000000")  # refusal 0.9, over-refusal 0.1
    measured = {
        0.0: _out("1110000000", "1000000000"),  # refusal 0.3: not restored
        0.5: _out("1111111100", "1111111000"),  # 0.8 restored (tolerance 0.1), but 6 new over-refusals
        1.0: _out("1111111110", "1110000000"),  # 0.9, 2 new over-refusals: not significant
        2.0: _out("1111111111", "1000000000"),
    }
    choice = select_strength(ref, measured, tolerance=0.1, alpha=0.05)
    assert choice.strength == 1.0
    by_s = {c.strength: c for c in choice.candidates}
    assert [c.strength for c in choice.candidates] == [0.0, 0.5, 1.0, 2.0]
    assert not by_s[0.0].restored and by_s[0.5].restored and by_s[0.5].over_refusal_rise
    assert (by_s[0.5].new_over_refusals, by_s[0.5].lost_over_refusals) == (6, 0)
    assert by_s[0.5].over_refusal_p == pytest.approx(binomtest(6, 6, 0.5).pvalue) == pytest.approx(2 / 2 ** 6)
    assert by_s[1.0].over_refusal_p == pytest.approx(binomtest(2, 2, 0.5).pvalue)
    assert by_s[1.0].refusal["rate"] == pytest.approx(0.9) and by_s[1.0].over_refusal["k"] == 3
    # a smaller magnitude wins, whatever its sign; a strict tolerance leaves only full refusal
    assert select_strength(ref, {**measured, -0.25: measured[1.0]}, tolerance=0.1).strength == -0.25
    assert select_strength(ref, measured, tolerance=0.0).strength == 1.0
    none = select_strength(ref, {0.0: measured[0.0], 0.5: measured[0.5]}, tolerance=0.1)
    assert none.strength is None and "over-refusal" in none.reason
    none = select_strength(ref, {0.0: measured[0.0]}, tolerance=0.1)
    assert none.strength is None and "no strength restores" in none.reason
    with pytest.raises(TraceError, match="same prompts"):
        select_strength(ref, {1.0: _out("11", "00")})
    with pytest.raises(InvalidValueError):
        select_strength(ref, measured, tolerance=1.5)


def test_choose_strength_measures_each_steered_variant(tmp_path, monkeypatch):
    from trace_lib.redteam.generate import generate_replies

    monkeypatch.setenv("TRACE_CACHE", str(tmp_path))
    loaded = _chat_loaded()
    sv = SteeringVector.from_prompts(loaded, POSITIVE, NEGATIVE, 1)

    def classify(text):  # a stand-in classifier: "refusal" when the tiny model says "cat"
        return ReplyLabel("refusal" if "cat" in text.split() else "compliance", "test")

    kw = dict(max_new_tokens=4, batch_size=4, cache=False)
    damaged = sv.as_variant(loaded, -3.0)  # a variant that lost the direction
    strengths = [1.5, 3.0, 4.5]
    choice = choose_strength(damaged, sv, strengths, POSITIVE, NEGATIVE, loaded, tolerance=0.25, classify=classify,
                             **kw)

    def outcomes(model):
        refused = [classify(r).label == "refusal" for r in generate_replies(model, POSITIVE + NEGATIVE, **kw)]
        return Outcomes(tuple(refused[:4]), tuple(refused[4:]))

    expected = select_strength(outcomes(loaded), {s: outcomes(sv.as_variant(damaged, s)) for s in strengths}, 0.25)
    assert choice.strength == expected.strength == 3.0  # adding back what was taken away
    assert choice.candidates[0].refusal["rate"] < choice.reference["refusal"]["rate"] - 0.25  # 1.5 is not enough
    assert [(c.strength, c.refusal, c.over_refusal) for c in choice.candidates] == [
        (c.strength, c.refusal, c.over_refusal) for c in expected.candidates]
    assert choice.settings["hooks"] == ["blocks.1.hook_resid_post"] and choice.split == "train"


# ------------------------------------------------------------------------------------------------ weight edit
def _write_ablation(ref, d, layers=None, embeddings=True):
    """The hook-based equivalent: ablate ``d`` from every residual write (embedding output, attn_out, mlp_out)."""
    v = ablate_directions(ref, "blocks.0.hook_resid_pre", d) if embeddings else ref
    for i in range(ref.n_layers) if layers is None else layers:
        v = ablate_directions(v, f"blocks.{i}.hook_attn_out", d)
        v = ablate_directions(v, f"blocks.{i}.hook_mlp_out", d)
    return v


@pytest.mark.parametrize("arch", EDITABLE)
def test_weight_edit_equals_hook_ablation_of_every_write_on_every_hook_point(arch):
    ref = tiny_loaded(arch)
    d, ids = _direction(ref.d_model), _ids()
    edited, ablated = remove_direction(ref, d), _write_ablation(ref, d)
    assert installed_hooks(edited) == []  # no hook: the weights carry the edit
    e_acts, e_logits = _all_acts(edited, ids)
    a_acts, a_logits = _all_acts(ablated, ids)
    assert e_acts.keys() == a_acts.keys()
    for name in e_acts:
        torch.testing.assert_close(e_acts[name], a_acts[name], rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(e_logits, a_logits, rtol=0, atol=1e-5)
    assert (e_logits - _logits(ref, ids)).abs().max() > 1e-3  # the edit does something


@pytest.mark.parametrize("arch", EDITABLE)
def test_weight_edit_equals_ablating_the_residual_stream_at_every_point(arch):
    """Arditi et al.'s equivalence: ablating r from the residual stream at block 0's input and after every
    sub-layer gives the same residual stream; the sub-layer outputs differ only by their r component."""
    ref = tiny_loaded(arch)
    d, ids = _direction(ref.d_model), _ids()
    r = d / d.norm()
    v = ablate_directions(ref, "blocks.0.hook_resid_pre", d)
    for i in range(ref.n_layers):
        if ref.arch.layout.resid_mid is not None:
            v = ablate_directions(v, f"blocks.{i}.hook_resid_mid", d)
        v = ablate_directions(v, f"blocks.{i}.hook_resid_post", d)
    e_acts, e_logits = _all_acts(remove_direction(ref, d), ids)
    a_acts, a_logits = _all_acts(v, ids)
    for name in e_acts:
        expected = a_acts[name]
        if name.endswith(("attn_out", "mlp_out")):
            expected = expected - (expected @ r)[..., None] * r
        torch.testing.assert_close(e_acts[name], expected, rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(e_logits, a_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", EDITABLE)
def test_no_residual_point_has_a_component_along_the_direction_after_the_edit(arch):
    ref = tiny_loaded(arch)
    d = _direction(ref.d_model)
    r = d / d.norm()
    e_acts, _ = _all_acts(remove_direction(ref, d), _ids())
    ref_acts, _ = _all_acts(ref, _ids())
    for name, x in e_acts.items():
        if name.startswith("blocks."):
            assert (x @ r).abs().max() < 1e-5 * max(1.0, float(x.abs().max())), name
    assert (ref_acts["blocks.1.hook_resid_post"] @ r).abs().max() > 1e-2  # it was there before


@pytest.mark.parametrize("arch", EDITABLE)
def test_restore_round_trips_to_the_original_weights(arch):
    ref = tiny_loaded(arch)
    d = _direction(ref.d_model)
    before = {k: v.clone() for k, v in ref.model.state_dict().items()}
    edited = remove_direction(ref, d)
    back = restore_direction(edited, d, ref)
    after = back.model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-6, msg=k)
        assert torch.equal(ref.model.state_dict()[k], before[k])  # the reference is never modified
    assert back.content_hash != edited.content_hash != ref.content_hash
    assert [e["edit"] for e in back.quant_info["weight_edits"]] == ["orth", "restore"]


@pytest.mark.parametrize("arch", ["llama_tied", "gpt2"])
def test_a_tied_unembedding_is_not_edited(arch):
    import transformers as T

    from trace_lib.models import from_model

    if arch == "llama_tied":
        torch.manual_seed(0)
        cfg = T.LlamaConfig(**TINY, tie_word_embeddings=True)
        cfg._attn_implementation = "eager"
        ref = from_model(T.LlamaForCausalLM(cfg).eval(), name="tiny-tied")
    else:
        ref = tiny_loaded(arch)
    assert ref.arch.unembed.weight is ref.arch.embed.weight
    original = ref.arch.embed.weight.detach().clone()
    d = _direction(ref.d_model)
    edited = remove_direction(ref, d)
    assert edited.arch.unembed.weight is not edited.arch.embed.weight
    assert torch.equal(edited.arch.unembed.weight, original)  # the read-out of the logits is unchanged
    assert (edited.arch.embed.weight.double() @ (d / d.norm()).double()).abs().max() < 1e-6
    assert edited.model.config.tie_word_embeddings is False and edited.quant_info["weight_edits"][0][
        "unembedding_untied"]
    assert ref.arch.unembed.weight is ref.arch.embed.weight and torch.equal(ref.arch.embed.weight, original)


def test_layers_restrict_the_edit_to_those_blocks():
    ref = tiny_loaded("qwen2")
    d, ids = _direction(ref.d_model), _ids()
    edited = remove_direction(ref, d, layers=[1])
    changed = {k for k, v in edited.model.state_dict().items() if not torch.equal(v, ref.model.state_dict()[k])}
    assert changed == {"model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert edited.name == "tiny-qwen2+orth(L1)"
    e_acts, e_logits = _all_acts(edited, ids)
    a_acts, a_logits = _all_acts(_write_ablation(ref, d, layers=[1], embeddings=False), ids)
    for name in e_acts:
        torch.testing.assert_close(e_acts[name], a_acts[name], rtol=0, atol=1e-5, msg=name)
    with_embed = remove_direction(ref, d, layers=[-1], embeddings=True)
    assert with_embed.name == "tiny-qwen2+orth(L2+emb)"
    assert not torch.equal(with_embed.arch.embed.weight, ref.arch.embed.weight)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_raises_one_clear_trace_error():
    ref = tiny_loaded("llama")
    wrong = torch.ones(ref.d_model + 1)
    for call in (lambda: remove_direction(ref, wrong), lambda: restore_direction(ref, wrong, ref),
                 lambda: SteeringVector(wrong, "blocks.0.hook_resid_post").as_variant(ref, 1.0),
                 lambda: SteeringVector(wrong, "blocks.0.hook_resid_post").apply(ref, 1.0).__enter__()):
        with pytest.raises(HookError, match=f"width {ref.d_model + 1} but .* d_model {ref.d_model}") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(HookError, match="layer 3 is out of range: .* 3 blocks") as e:
        SteeringVector.from_prompts(_chat_loaded(), POSITIVE, NEGATIVE, 3)
    assert "\n" not in str(e.value)
    with pytest.raises(HookError, match="layer 5 is out of range"):
        remove_direction(ref, torch.ones(ref.d_model), layers=[5])
    with pytest.raises(HookError, match="out of range"):
        SteeringVector(torch.ones(ref.d_model), "blocks.9.hook_resid_post").as_variant(ref, 1.0)
    with pytest.raises(HookError, match="resid_pre or blocks.L.hook_resid_post"):
        SteeringVector(torch.ones(ref.d_model), "blocks.0.hook_resid_mid").as_variant(ref, 1.0)
    with pytest.raises(InvalidValueError, match="finite number"):
        SteeringVector(torch.ones(ref.d_model), "blocks.0.hook_resid_post").as_variant(ref, float("nan"))
    with pytest.raises(TraceError, match="zero norm"):
        remove_direction(ref, torch.zeros(ref.d_model))
    with pytest.raises(TraceError, match="does not match"):
        restore_direction(ref, torch.ones(ref.d_model), tiny_loaded("qwen2"))


def test_weights_stored_quantized_are_refused_and_weight_only_variants_are_compensated():
    from trace_lib.quant import quantize
    from trace_lib.repair import EditError

    ref = tiny_loaded("llama")
    d = _direction(ref.d_model)
    r = (d / d.norm()).double()
    with pytest.raises(EditError, match="edit the reference before quantizing"):
        remove_direction(quantize(ref, "int8-dynamic"), d)
    variant = quantize(ref, "gguf-q4_0")  # weight-only: de-quantized float weights
    fixed = restore_direction(variant, d, ref)
    for name, w in fixed.model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w_ref, w_var = ref.model.get_parameter(name).double(), variant.model.get_parameter(name).double()
            expected = w_var - torch.outer(r, r @ w_var) + torch.outer(r, r @ w_ref)  # W' = P W + r r^T W_ref
            torch.testing.assert_close(w.double(), expected, rtol=0, atol=1e-6, msg=name)
            assert not torch.equal(w_var, w_ref)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_post_norms_are_refused_with_the_reason(arch):
    ref = tiny_loaded(arch)
    with pytest.raises(EditUnsupportedError, match="post-norms") as e:
        remove_direction(ref, torch.ones(ref.d_model))
    assert isinstance(e.value, TraceError) and isinstance(e.value, NotImplementedError)
    assert "\n" not in str(e.value)
