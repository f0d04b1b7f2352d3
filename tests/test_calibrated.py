"""GPTQ / AWQ with llmcompressor on a tiny random Llama: int4 grid, GPTQ beats RTN, plain float variant.

The tests that run the calibration skip where llmcompressor is not installed; the ones that check what a
user is told (including that a missing llmcompressor is named, with the install lines) always run.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys

import pytest
import torch
from torch import nn

from trace_lib.errors import QuantizationError
from trace_lib.quant import QuantizationConfig, QuantizationType, quantize
from trace_lib.quant import calibrated as C

from conftest import TINY, tiny_model

os.environ.setdefault("LLM_COMPRESSOR_LOG_DISABLED", "true")  # before anything imports llmcompressor


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# Not pytest.importorskip at module level: test_missing_llmcompressor_is_named must run without it.
needs_llmcompressor = pytest.mark.skipif(not _installed("llmcompressor"),
                                         reason="llmcompressor is not installed (see docs/quantization.md)")

CAL = {"n_samples": 8, "seq_len": 64}
GROUP = 32


def char_tokenizer():
    """A character-level tokenizer (printable ASCII -> its code point) that fits the tiny models' vocab of 128."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{chr(i): i for i in range(32, 127)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_ref(tied: bool = False, seed: int = 0):
    import transformers as T

    from trace_lib.models import from_model

    if tied:
        torch.manual_seed(seed)
        cfg = T.LlamaConfig(**TINY, tie_word_embeddings=True)
        cfg._attn_implementation = "eager"
        model = T.LlamaForCausalLM(cfg).eval()
    else:
        model = tiny_model("llama", seed)
    return from_model(model, tokenizer=char_tokenizer(), name="tiny-llama")


def gptq(**kw) -> QuantizationConfig:
    return QuantizationConfig(QuantizationType.INT4_GPTQ, group_size=GROUP, calibration=dict(CAL), **kw)


def awq(**kw) -> QuantizationConfig:
    return QuantizationConfig(QuantizationType.INT4_AWQ, group_size=GROUP, calibration=dict(CAL), **kw)


def build(ref, config):
    """quantize(ref, config), also returning llmcompressor's {linear name: (scale, zero_point)}."""
    qparams: dict = {}
    original = C.apply_calibrated
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "apply_calibrated",
                   lambda m, c, lin, r: original(m, c, lin, r, qparams=qparams))
        variant = quantize(ref, config)
    return variant, qparams


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy 2-core machine AWQ's thousands of small matmuls
    run 10-100x slower with two threads contending; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- always run ---------------------------------------------------------------------------------------------


def test_missing_llmcompressor_is_named(monkeypatch):
    for name in ("llmcompressor", "compressed_tensors"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    ref = tiny_ref()
    for config in (gptq(), awq()):
        with pytest.raises(QuantizationError, match="needs llmcompressor") as e:
            quantize(ref, config)
        assert "pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0" in str(e.value)
    for p in ref.model.parameters():
        assert type(p) is nn.Parameter


def test_bad_inputs_are_clear():
    ref = tiny_ref()  # hidden 32, intermediate 64
    with pytest.raises(QuantizationError, match="group size 48 does not divide the input width"):
        quantize(ref, "int4-gptq-g48")
    with pytest.raises(QuantizationError, match=r"unknown calibration option\(s\) \['samples'\]"):
        quantize(ref, gptq().with_(calibration={"samples": 4}))
    with pytest.raises(QuantizationError, match="n_samples must be a positive integer"):
        quantize(ref, awq().with_(calibration={"n_samples": 0}))
    no_tokenizer = copy.copy(ref)
    no_tokenizer.tokenizer = None
    with pytest.raises(QuantizationError, match="GPTQ/AWQ calibration .* needs the model's tokenizer"):
        quantize(no_tokenizer, "int4-gptq-g32")


def test_calibration_settings_defaults_and_tokens():
    s = C.calibration_settings(QuantizationConfig(QuantizationType.INT4_GPTQ, group_size=64))
    assert s == {"n_samples": 16, "seq_len": 256, "seed": 0, "block_size": 128, "dampening_frac": 0.01}
    s = C.calibration_settings(awq().with_(calibration={"n_grid": 5}))
    assert s == {"n_samples": 16, "seq_len": 256, "seed": 0, "duo_scaling": True, "n_grid": 5}
    tok = char_tokenizer()
    a = C.calibration_tokens(tok, 4, 32, seed=0)
    assert a.shape == (4, 32) and torch.equal(a, C.calibration_tokens(tok, 4, 32, seed=0))
    assert not torch.equal(a, C.calibration_tokens(tok, 4, 32, seed=1))


# ---- with llmcompressor -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built():
    ref = tiny_ref()
    before = {k: v.clone() for k, v in ref.model.state_dict().items()}
    g, g_q = build(ref, gptq())
    a, a_q = build(ref, awq())
    rtn = quantize(ref, "int4-rtn-g32")
    return {"ref": ref, "before": before, "gptq": (g, g_q), "awq": (a, a_q), "rtn": rtn}


def _inputs_and_logits(model: nn.Module, ids: torch.Tensor):
    """Every Linear's input on ``ids``, and the final logits."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, args[0].detach()))
             for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def _assert_on_int4_grid(model: nn.Module, qparams: dict, symmetric: bool) -> None:
    modules = dict(model.named_modules())
    for name, (scale, zero) in qparams.items():
        w = modules[name].weight.detach()
        rows, cols = w.shape
        assert scale.shape == (rows, cols // GROUP), name
        groups = w.view(rows, cols // GROUP, GROUP)
        z = torch.zeros_like(scale) if zero is None else zero.to(scale.dtype)
        q = groups / scale.unsqueeze(-1) + z.unsqueeze(-1)
        assert (q - q.round()).abs().max() < 1e-3, name
        assert q.round().min() >= -8 and q.round().max() <= 7, name
        if symmetric:
            assert zero is None or not zero.any(), name
        # Independently of the recorded parameters: at most 2**4 distinct values in every group.
        for g in groups.reshape(-1, GROUP):
            assert len(torch.unique(g)) <= 16, name


@needs_llmcompressor
def test_reference_untouched_and_variant_is_plain(built):
    ref, before = built["ref"], built["before"]
    after = ref.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ref_modules = [(n, type(m)) for n, m in ref.model.named_modules()]
    for key in ("gptq", "awq"):
        variant, qparams = built[key]
        model = variant.model
        assert [(n, type(m)) for n, m in model.named_modules()] == ref_modules
        assert model.state_dict().keys() == before.keys()  # no weight_scale / zero_point left behind
        for n, p in model.named_parameters():
            assert type(p) is nn.Parameter and type(p.data) is torch.Tensor and p.dtype == torch.float32, n
        for m in model.modules():
            assert not m._forward_hooks and not m._forward_pre_hooks and not hasattr(m, "quantization_scheme")
        quantized = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
        assert set(qparams) == quantized
        assert torch.equal(model.lm_head.weight, ref.model.lm_head.weight)  # skipped by default
        # What the algorithm left equal is shared with the reference; what it changed is the variant's own.
        ref_state = ref.model.state_dict()
        for k, v in model.state_dict().items():
            same = torch.equal(v, ref_state[k])
            assert (v.data_ptr() == ref_state[k].data_ptr()) == same, k
        assert model.model.embed_tokens.weight.data_ptr() == ref.model.model.embed_tokens.weight.data_ptr()
        info = variant.quant_info
        assert info["library"].startswith("llmcompressor 0.14") and "compressed-tensors" in info["library"]
        assert info["path"].startswith("de-quantized " + key.upper())
        cal = info["calibration"]
        assert (cal["n_sequences"], cal["seq_len"], cal["tokens"]) == (8, 64, 512)
        assert len(cal["tokens_sha256"]) == 64 and cal["seed"] == 0
        # a float32 scale per group; AWQ adds a 4-bit zero point per group (compressed-tensors' storage)
        assert info["quantized_bits_per_weight"] == 4 + (32 + (4 if key == "awq" else 0)) / GROUP
        if key == "awq":
            assert cal["awq_mappings"] == 3 * 3  # per block: norm -> q/k/v, norm -> gate/up, up -> down
            if not torch.accelerator.is_available():
                assert "pin_memory" in cal["patch"]


@needs_llmcompressor
def test_gptq_weights_lie_on_the_symmetric_int4_grid(built):
    variant, qparams = built["gptq"]
    _assert_on_int4_grid(variant.model, qparams, symmetric=True)


@needs_llmcompressor
def test_awq_weights_lie_on_the_asymmetric_int4_grid_and_norms_are_rescaled(built):
    variant, qparams = built["awq"]
    _assert_on_int4_grid(variant.model, qparams, symmetric=False)
    assert any(z is not None and z.any() for _, z in qparams.values())  # asymmetric: real zero points
    ref = dict(built["ref"].model.named_parameters())
    norms = [n for n, _ in variant.model.named_parameters() if "layernorm" in n]
    # AWQ folds its input scales into the preceding norms: the variant carries those rescaled norms.
    assert any(not torch.equal(p, ref[n]) for n, p in variant.model.named_parameters() if n in norms)


@needs_llmcompressor
def test_gptq_beats_round_to_nearest_on_the_calibration_data(built):
    ref = built["ref"]
    (g, _), rtn = built["gptq"], built["rtn"]
    ids = C.calibration_tokens(ref.tokenizer, CAL["n_samples"], CAL["seq_len"], seed=0)
    x, ref_logits = _inputs_and_logits(ref.model, ids)
    _, g_logits = _inputs_and_logits(g.model, ids)
    _, r_logits = _inputs_and_logits(rtn.model, ids)
    ref_m, g_m, r_m = (dict(m.named_modules()) for m in (ref.model, g.model, rtn.model))
    for name, inp in x.items():
        if name == "lm_head":
            continue
        exact = inp @ ref_m[name].weight.T
        g_err = ((inp @ g_m[name].weight.T - exact) ** 2).mean()
        r_err = ((inp @ r_m[name].weight.T - exact) ** 2).mean()
        assert g_err < r_err, f"{name}: GPTQ output error {g_err:.3g} >= RTN's {r_err:.3g}"
    assert ((g_logits - ref_logits) ** 2).mean() < ((r_logits - ref_logits) ** 2).mean()


@needs_llmcompressor
def test_logits_change_but_not_wildly(built):
    ref = built["ref"]
    ids = C.calibration_tokens(ref.tokenizer, 2, 48, seed=7)
    _, ref_logits = _inputs_and_logits(ref.model, ids)
    for key in ("gptq", "awq"):
        _, logits = _inputs_and_logits(built[key][0].model, ids)
        assert not torch.equal(logits, ref_logits)
        rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
        agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        assert 0 < rel < 0.25 and agree > 0.7, (key, rel, agree)


@needs_llmcompressor
def test_gptq_is_deterministic_and_honours_skip_with_tied_embeddings(built):
    ref = built["ref"]
    again, _ = build(ref, gptq())
    first = built["gptq"][0].model.state_dict()
    assert all(torch.equal(first[k], v) for k, v in again.model.state_dict().items())
    assert again.quant_info["calibration"] == built["gptq"][0].quant_info["calibration"]

    tied = tiny_ref(tied=True)
    assert tied.model.lm_head.weight is tied.model.model.embed_tokens.weight
    embed_before = tied.model.model.embed_tokens.weight.detach().clone()
    variant, qparams = build(tied, gptq(skip=("down_proj",)))
    model = variant.model
    assert "lm_head" in qparams and not any(n.endswith("down_proj") for n in qparams)
    ref_params = dict(tied.model.named_parameters())
    for n, m in model.named_modules():
        if n.endswith("down_proj"):
            assert torch.equal(m.weight, ref_params[n + ".weight"]), n
    # The quantized lm_head gets its own weights; the tied embedding stays full precision.
    assert torch.equal(model.model.embed_tokens.weight, embed_before)
    assert torch.equal(tied.model.model.embed_tokens.weight, embed_before)
    assert not torch.equal(model.lm_head.weight, embed_before)
    _assert_on_int4_grid(model, {"lm_head": qparams["lm_head"]}, symmetric=True)


@needs_llmcompressor
def test_gpt2_conv1d_gptq_works_and_awq_without_mappings_is_refused():
    from trace_lib.models import from_model

    ref = from_model(tiny_model("gpt2"), tokenizer=char_tokenizer(), name="tiny-gpt2")
    variant, qparams = build(ref, gptq())
    assert len(qparams) == 4 * 3  # c_attn, c_proj, c_fc, mlp.c_proj per block, as Linear
    _assert_on_int4_grid(variant.model, qparams, symmetric=True)
    with pytest.raises(QuantizationError, match="AWQ found no layers to smooth in GPT2LMHeadModel"):
        quantize(ref, awq())
