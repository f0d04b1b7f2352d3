"""Mixed-precision configs: per-module overrides, their names, JSON form and storage."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from trace_lib.errors import QuantizationError
from trace_lib.quant import QuantizationConfig, parse_config, quantize
from trace_lib.quant.linears import matches

from conftest import TINY, tiny_loaded

# Per tiny-llama layer (hidden 32, intermediate 64, 4 heads, 2 KV heads of 8): the Linears' weight sizes.
SIZES = {"self_attn.q_proj": 32 * 32, "self_attn.k_proj": 16 * 32, "self_attn.v_proj": 16 * 32,
         "self_attn.o_proj": 32 * 32, "mlp.gate_proj": 64 * 32, "mlp.up_proj": 64 * 32, "mlp.down_proj": 32 * 64}
DOWN1 = "model.layers.1.mlp.down_proj"


def mixed(overrides: dict, base: str = "gguf-q4_0") -> QuantizationConfig:
    return QuantizationConfig.from_json({"base": base, "overrides": overrides})


def _ids(vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# ------------------------------------------------------------------ overrides in quantize()

def test_an_fp32_override_keeps_exactly_that_linear_and_the_rest_is_the_plain_base():
    ref = tiny_loaded("llama")
    var = quantize(ref, mixed({DOWN1: "fp32"}))
    plain = quantize(ref, "gguf-q4_0")
    r, v, p = (_linear_weights(x.model) for x in (ref, var, plain))
    assert torch.equal(v[DOWN1], r[DOWN1])
    others = [n for n in v if n != DOWN1]
    assert all(torch.equal(v[n], p[n]) for n in others)
    assert sum(not torch.equal(v[n], r[n]) for n in others) == len(others) - 1  # all quantized but lm_head (skip)
    with torch.no_grad():
        assert not torch.equal(var.model(_ids()).logits, plain.model(_ids()).logits)


def test_a_block_prefix_covers_its_layers_and_the_longest_pattern_wins():
    ref = tiny_loaded("llama")
    var = quantize(ref, mixed({"model.layers.1": "fp16", DOWN1: "q8_0"}))
    q8 = _linear_weights(quantize(ref, "gguf-q8_0").model)
    r, v = _linear_weights(ref.model), _linear_weights(var.model)
    for part in SIZES:
        name = f"model.layers.1.{part}"
        want = q8[name] if name == DOWN1 else r[name].half().float()  # fp16 storage, fp32 compute
        assert torch.equal(v[name], want), name
    assert var.quant_info["layers_by_config"] == {"fp16": 6, "gguf-q4_0": 14, "gguf-q8_0": 1}
    assert matches("model.layers.1.mlp", "model.layers.1") and not matches("model.layers.10.mlp", "model.layers.1")


def test_an_override_can_quantize_a_skipped_layer():
    ref = tiny_loaded("llama")
    var = quantize(ref, mixed({"lm_head": "q8_0"}))
    q8 = quantize(ref, "gguf-q8_0-skipnone")
    assert torch.equal(var.model.lm_head.weight, q8.model.lm_head.weight)
    assert not torch.equal(var.model.lm_head.weight, ref.model.lm_head.weight)


def test_rtn_and_int8_overrides_use_their_own_backends():
    ref = tiny_loaded("llama")
    var = quantize(ref, mixed({"model.layers.0": "int4-rtn-g32", DOWN1: "int8-weight"}))
    rtn = _linear_weights(quantize(ref, "int4-rtn-g32").model)
    i8 = _linear_weights(quantize(ref, "int8-weight").model)
    v = _linear_weights(var.model)
    assert all(torch.equal(v[f"model.layers.0.{p}"], rtn[f"model.layers.0.{p}"]) for p in SIZES)
    assert torch.equal(v[DOWN1], i8[DOWN1])


# ------------------------------------------------------------------ names and cache keys

def test_the_name_is_stable_and_changes_with_the_overrides():
    overrides = {"model.layers.12.mlp.down_proj": "gguf-q8_0", "model.layers.13": "fp16"}
    cfg = mixed(overrides)
    # the hash of the sorted (pattern, config name) pairs, computed independently: sha256 of sorted-key JSON
    blob = json.dumps([["model.layers.12.mlp.down_proj", "gguf-q8_0"], ["model.layers.13", "fp16"]], sort_keys=True)
    assert cfg.name == "gguf-q4_0+mx" + hashlib.sha256(blob.encode()).hexdigest()[:8] == "gguf-q4_0+mxb509f61b"
    assert mixed(dict(reversed(overrides.items()))).name == cfg.name  # order does not matter
    assert mixed({"model.layers.12.mlp.down_proj": "q8_0", "model.layers.13": "fp16"}).name == cfg.name  # alias
    assert mixed({**overrides, "model.layers.13": "bf16"}).name != cfg.name
    assert mixed(overrides, base="int4-rtn-g32").name.startswith("int4-rtn-g32+mx")
    assert hash(cfg) == hash(mixed(overrides)) and cfg.base == parse_config("gguf-q4_0")
    assert "overrides" not in parse_config("gguf-q4_0").to_dict()  # plain configs keep their cache keys
    ref = tiny_loaded("llama")
    assert quantize(ref, mixed({DOWN1: "fp32"})).content_hash != quantize(ref, "gguf-q4_0").content_hash


def test_a_mixed_name_cannot_be_parsed_back_and_says_to_give_the_file():
    with pytest.raises(QuantizationError, match="names a mixed-precision config.*JSON file"):
        parse_config("gguf-q4_0+mxb509f61b")


# ------------------------------------------------------------------ storage

def test_bits_per_weight_by_hand():
    ref = tiny_loaded("llama")  # untied; lm_head (128 x 32) stays fp32 (skip)
    cfg = mixed({"model.layers.0.mlp.down_proj": "q8_0", "model.layers.2": "fp16",
                 "model.layers.1.self_attn.q_proj": "int4-rtn-g32", "model.layers.1.mlp.up_proj": "fp32"})
    info = quantize(ref, cfg).quant_info
    per_layer = sum(SIZES.values())  # 9216
    fp16, q8, rtn, fp32 = per_layer, 32 * 64, 32 * 32, 64 * 32
    q4 = 3 * per_layer - fp16 - q8 - rtn - fp32
    q_bits = q4 * 4.5 + q8 * 8.5 + fp16 * 16 + rtn * (4 + 32 / 32) + fp32 * 32
    total = sum(p.numel() for p in ref.model.parameters())
    bits = q_bits + (total - 3 * per_layer) * 32
    assert info["quantized_params"] == 3 * per_layer
    assert info["quantized_bits_per_weight"] == round(q_bits / (3 * per_layer), 4) == 10.6852  # 295424 / 27648
    assert info["bits_per_weight"] == round(bits / total, 4)
    assert info["model_size_mb"] == round(bits / 8 / 1e6, 3)


def test_a_tied_head_quantized_apart_is_stored_twice_and_an_fp32_one_stays_tied():
    import transformers as T

    from trace_lib.models import from_model

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**TINY, tie_word_embeddings=True)).eval()
    ref = from_model(model)
    total = sum(p.numel() for p in model.parameters())  # the tied matrix once
    head = 128 * 32
    q8 = quantize(ref, mixed({"lm_head": "q8_0"}))
    assert q8.model.lm_head.weight is not q8.model.model.embed_tokens.weight
    assert q8.quant_info["total_params"] == total + head
    linears = 3 * sum(SIZES.values())
    bits = linears * 4.5 + head * 8.5 + (total - linears) * 32  # the float embedding and its Q8_0 copy
    assert q8.quant_info["bits_per_weight"] == round(bits / (total + head), 4)
    kept = quantize(ref, mixed({"lm_head": "fp32"}))
    assert kept.model.lm_head.weight is kept.model.model.embed_tokens.weight
    assert kept.quant_info["total_params"] == total


# ------------------------------------------------------------------ the JSON form

def test_json_round_trip_through_a_file_parse_config_and_resolve_variant(tmp_path):
    from trace_lib.audit import Audit
    from trace_lib.compare import resolve_variant
    from trace_lib.validate import check_variant_spec

    cfg = mixed({DOWN1: "gguf-q8_0", "model.layers.2": "fp16"})
    path = tmp_path / "repaired.json"
    cfg.to_json(path)
    data = json.loads(path.read_text())
    assert data == {"base": "gguf-q4_0", "overrides": {DOWN1: "gguf-q8_0", "model.layers.2": "fp16"},
                    "name": cfg.name}
    assert QuantizationConfig.from_json(path) == QuantizationConfig.from_json(data) == parse_config(str(path)) == cfg
    assert QuantizationConfig.from_json({k: v for k, v in data.items() if k != "name"}) == cfg  # name optional
    assert QuantizationConfig.from_dict(cfg.to_dict()) == cfg
    check_variant_spec(str(path))
    ref = tiny_loaded("llama")
    Audit(ref, variants=[str(path)])  # accepted where `trace audit --variant` checks it, before any work
    var = resolve_variant(ref, str(path))
    assert var.quant == cfg and var.name.endswith(f"[{cfg.name}]")


@pytest.mark.parametrize(("data", "expect"), [
    ({"base": "fp16", "overrides": {DOWN1: "q8_0"}},
     "fp16 quantizes no weights; there are no modules to keep at higher precision"),
    ({"base": "int8-dynamic", "overrides": {DOWN1: "q8_0"}}, "int8-dynamic quantizes activations"),
    ({"base": "w4a8", "overrides": {DOWN1: "q8_0"}}, "int4-rtn-g32-a8 quantizes activations"),
    ({"base": "q4_0", "overrides": {DOWN1: "int8-dyn-tok"}}, "int8-dyn-tok quantizes activations; an override"),
    ({"base": "q4_0", "overrides": {DOWN1: "q8_0-a8"}}, "gguf-q8_0-a8 quantizes activations"),
    ({"base": "q4_0", "overrides": {DOWN1: "int4-gptq-g128"}}, "calibrates the whole model"),
    ({"base": "q4_0", "overrides": {DOWN1: "q9_0"}}, "override 'model.layers.1.mlp.down_proj': unknown quantization"),
    ({"base": "q4_0", "overrides": {"layers 1": "fp16"}}, "'layers 1' is not a module name"),
    ({"base": "q4_0", "overrides": {DOWN1: 8}}, "pair of strings"),
    ({"base": "q4_0", "overrides": [DOWN1]}, "\"overrides\" must be an object"),
    ({"overrides": {}}, "has no \"base\" config name"),
    ({"base": "q4_0", "extra": 1}, "unknown key 'extra'"),
    ({"base": "q4_0", "overrides": {DOWN1: "fp16"}, "name": "mine"}, "says its name is 'mine'"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_json_configs_are_one_clear_line(data, expect):
    with pytest.raises(QuantizationError, match=re.escape(expect)) as e:
        QuantizationConfig.from_json(data)
    assert "\n" not in str(e.value)


def test_bad_config_files_are_one_clear_line(tmp_path):
    (tmp_path / "bad.json").write_text('{"base": "gguf-q4_0",')
    (tmp_path / "latin1.json").write_bytes(b'{"base": "\xe9"}')
    for spec, expect in [(tmp_path / "missing.json", "no config file at"), (tmp_path / "bad.json", "is not valid JSON"),
                         (tmp_path / "latin1.json", "is not UTF-8 text")]:
        with pytest.raises(QuantizationError, match=expect):
            parse_config(str(spec))


def test_a_pattern_the_model_lacks_is_named_with_valid_names():
    ref = tiny_loaded("llama")
    with pytest.raises(QuantizationError, match=r"override 'model\.layers\.7' names no Linear layer of this model; "
                                                r"its Linear layers are named like model\.layers\.0\.self_attn\.q_proj"):
        quantize(ref, mixed({"model.layers.7": "fp16"}))
    with pytest.raises(QuantizationError, match="'model.norm' names no Linear"):
        quantize(ref, mixed({"model.norm": "fp16"}))
