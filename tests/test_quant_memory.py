"""Memory-lean variants: a variant shares every tensor its config leaves unchanged with the reference, computes
exactly what the old deep-copy build computed, and nothing (building, running, un-quantizing, keeping Linears at
another precision) writes into the reference."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from trace_lib.cache import stable_hash
from trace_lib.errors import QuantizationError
from trace_lib.models import load_model
from trace_lib.quant import QuantizationConfig, parse_config, quantize
from trace_lib.quant import apply as quant_apply
from trace_lib.quant.linears import assign_linears, convert_conv1d, quantizable_linears

from conftest import tiny_loaded

MIXED = {"base": "gguf-q4_0", "overrides": {"model.layers.1": "fp16", "model.layers.1.mlp.down_proj": "q8_0",
                                            "model.layers.2.self_attn": "int4-rtn-g32"}}
CONFIGS = ["gguf-q4_0", "int4-rtn-g32", "int8-dynamic", "fp16", "mixed"]
# content_hash of each config's variant of a reference whose content_hash is REF_HASH, as the deep-copy build
# (commit 4e7d7ac, before variants shared tensors) gave them.
REF_HASH = "0123456789abcdef"
GOLDEN_HASH = {"gguf-q4_0": "a9dca9b3540b8051", "int4-rtn-g32": "7f5792524512c483",
               "int8-dynamic": "ff1667c9081bb3f4", "fp16": "0250850c87fb8143", "mixed": "6f3da8b2de07faa4"}
# Every kind of variant, for the reference-untouched check (weight-only, kernels, module swaps, casts, fake-quant).
KINDS = ["fp32", "fp16", "bf16", "int8-dynamic", "int8-dyn-tok", "int8-weight", "int4-rtn-g32", "int4-rtn-g32-kernel",
         "int2-rtn-pc", "gguf-q8_0", "gguf-q4_1", "gguf-q4_0", "w4a8", "gguf-q4_0-skipnone", "mixed"]


def _config(name: str, tmp_path=None) -> QuantizationConfig:
    if name != "mixed":
        return parse_config(name)
    if tmp_path is None:
        return QuantizationConfig.from_json(MIXED)
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(MIXED))
    return parse_config(str(path))


def old_build(loaded, config: QuantizationConfig) -> nn.Module:
    """The build before variants shared tensors: deep-copy the whole reference, then quantize the copy in place."""
    model = copy.deepcopy(loaded.model)
    model.eval()
    convert_conv1d(model)
    if config.overrides:
        quant_apply._apply_mixed(model, assign_linears(model, config), loaded)
        return model
    linears = quantizable_linears(model, config.skip) if config.type.value != "fp32" or config.act_bits else []
    quant_apply._apply_one(model, config, linears, loaded)
    if config.act_bits:
        from trace_lib.quant.activations import add_activation_fake_quant

        add_activation_fake_quant(linears, config.act_bits)
    return model


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


def _plain(t) -> bool:
    return isinstance(t, torch.Tensor) and type(t) in (torch.Tensor, nn.Parameter) and not t.is_quantized


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def folder_ref(tiny_folder):
    return load_model(tiny_folder)


@pytest.mark.parametrize("name", CONFIGS)
def test_variant_equals_the_deep_copy_build_and_shares_what_it_leaves(folder_ref, tmp_path, name):
    ref = folder_ref
    config = _config(name, tmp_path)
    before = _snapshot(ref.model)
    ids = _ids(len(ref.tokenizer))
    var = quantize(ref, config)
    old = old_build(ref, config)
    with torch.no_grad():
        got, want = var.model(ids).logits, old(ids).logits
    assert got.dtype == want.dtype and torch.equal(got, want)
    _assert_same(ref.model, before)

    # Independently of quantize: the tensors the old build left equal to the reference's must be shared now,
    # the ones it changed must be the variant's own.
    ref_state, old_state = ref.model.state_dict(), old.state_dict()
    var_state = var.model.state_dict()
    assert var_state.keys() == old_state.keys()
    ref_ptrs = {v.data_ptr() for v in ref_state.values()}
    shared = 0
    for k, v in var_state.items():
        if not _plain(v):
            continue
        unchanged = k in ref_state and old_state[k].dtype == ref_state[k].dtype and torch.equal(old_state[k],
                                                                                                ref_state[k])
        if unchanged:
            assert v.data_ptr() == ref_state[k].data_ptr(), f"{k} is unchanged but not shared"
            shared += 1
        else:
            assert v.data_ptr() not in ref_ptrs, f"{k} changed but shares the reference's storage"
    embed = "model.embed_tokens.weight"
    if name == "fp16":
        assert shared == 0  # a whole-model cast changes every float tensor
        assert var.model.model.embed_tokens.weight.dtype == torch.float16
    else:
        assert var_state[embed].data_ptr() == ref_state[embed].data_ptr()
        assert var.model.lm_head.weight is var.model.model.embed_tokens.weight  # the skipped lm_head stays tied
        assert var_state["model.norm.weight"].data_ptr() == ref_state["model.norm.weight"].data_ptr()
        assert shared >= 2 + 2 * ref.n_layers  # embedding, final norm, and two norms per block at least
    # shared tensors are separate Parameter objects: rebinding or .data = on the variant never reaches the reference
    ref_params = {id(p) for p in ref.model.parameters()}
    assert not any(id(p) in ref_params for p in var.model.parameters())
    assert var.content_hash == stable_hash({"ref": ref.content_hash, "config": config.to_dict()})


@pytest.mark.parametrize("name", CONFIGS)
def test_content_hash_is_what_the_deep_copy_build_gave(name):
    ref = dataclasses.replace(tiny_loaded("llama"), content_hash=REF_HASH)
    assert quantize(ref, _config(name)).content_hash == GOLDEN_HASH[name]


@pytest.mark.parametrize("name", KINDS)
def test_reference_bit_identical_after_building_and_using_each_kind(name):
    ref = tiny_loaded("llama")
    before = _snapshot(ref.model)
    var = quantize(ref, _config(name))
    with torch.no_grad():
        var.model(_ids(128))
    var.model.to(torch.float64 if name not in ("int8-dynamic", "int8-dyn-tok", "int4-rtn-g32-kernel") else "cpu")
    _assert_same(ref.model, before)
    assert all(p.dtype == torch.float32 for p in ref.model.parameters())


def test_casts_share_exactly_what_stays():
    ref = tiny_loaded("llama")
    ptrs = {t.data_ptr() for t in ref.model.state_dict().values()}
    fp16 = quantize(ref, "fp16")
    assert not any(t.data_ptr() in ptrs for t in fp16.model.state_dict().values())
    fp32 = quantize(ref, "fp32")  # a no-op cast shares everything
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(ref.model.state_dict().values(),
                                                            fp32.model.state_dict().values()))
    half = quantize(fp16, "fp16")  # casting to the dtype it has shares everything too
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(fp16.model.state_dict().values(),
                                                            half.model.state_dict().values()))
    back = quantize(fp16, "fp32")  # and a cast that changes the dtype shares nothing float
    assert not any(t.data_ptr() in {u.data_ptr() for u in fp16.model.state_dict().values()}
                   for t in back.model.state_dict().values())
    assert torch.equal(back.model.model.norm.weight, fp16.model.model.norm.weight.float())


def test_a_backend_writing_into_a_shared_tensor_is_refused(monkeypatch):
    ref = tiny_loaded("llama")

    def bad(model, config, linears):
        with torch.no_grad():
            model.model.norm.weight.mul_(2)  # shared with the reference
        return {"library": "x", "path": "y"}

    monkeypatch.setattr("trace_lib.quant.gguf_backend.apply_gguf", bad)
    with pytest.raises(QuantizationError, match=r"building gguf-q4_0 wrote into the reference's model\.norm\.weight"):
        quantize(ref, "gguf-q4_0")


def test_unquantized_and_kept_at_never_write_into_the_reference():
    from trace_lib.attribution.weights import differing_linears, unquantized
    from trace_lib.repair.precision import kept_at

    ref = tiny_loaded("llama")
    before = _snapshot(ref.model)
    var, keep = quantize(ref, "gguf-q4_0"), quantize(ref, "gguf-q8_0")
    var_before = _snapshot(var.model)
    names = differing_linears(ref, var)
    ids = _ids(128)
    mods = dict(var.model.named_modules())
    with torch.no_grad():
        with unquantized(ref, var, names):
            assert torch.equal(var.model(ids).logits, ref.model(ids).logits)  # every differing Linear restored
        with kept_at(var, keep, names):
            assert torch.equal(var.model(ids).logits, keep.model(ids).logits)
            assert all(mods[n].weight.data_ptr() == dict(keep.model.named_modules())[n].weight.data_ptr()
                       for n in names)  # the keep variant's own tensors, not copies
    _assert_same(ref.model, before)
    _assert_same(var.model, var_before)


def test_calibrated_results_rebind_only_what_changed():
    from trace_lib.quant.calibrated import _take_changed

    ref = tiny_loaded("llama")
    ref.model.lm_head.weight = ref.model.model.embed_tokens.weight  # tied, as SmolLM2's
    before = _snapshot(ref.model)
    model = quant_apply.shared_copy(ref.model)
    work = copy.deepcopy(model)
    with torch.no_grad():
        work.model.layers[0].input_layernorm.weight.mul_(3)  # as AWQ rescales a norm
        work.model.embed_tokens.weight[0, 0] += 1  # a tied tensor changed: both names take the new value
    _take_changed(model, work.state_dict(), set(), parse_config("int4-gptq-g32"))
    _assert_same(ref.model, before)
    norm = model.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, before["model.layers.0.input_layernorm.weight"] * 3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight[0, 0] == before["model.embed_tokens.weight"][0, 0] + 1
    other = model.model.layers[1].input_layernorm.weight
    assert other.data_ptr() == ref.model.model.layers[1].input_layernorm.weight.data_ptr()
    assert norm.data_ptr() != ref.model.model.layers[0].input_layernorm.weight.data_ptr()
