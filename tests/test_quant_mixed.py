"""Mixed-precision configs: per-module overrides, their names, JSON form and storage, and the GGUF file they
write (read back by gguf-py and loaded by transformers, with the in-memory variant's logits)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from trace_lib.errors import OutputPathError, QuantizationError, UnsupportedArchitectureError
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


# ------------------------------------------------------------------ the GGUF file

@pytest.fixture(scope="module")
def smol_tiny(tmp_path_factory):
    """A tiny random Llama (hidden 32, intermediate 64, tied embeddings) with SmolLM2's real tokenizer, read from
    the default model's GGUF metadata (no weights are loaded)."""
    import transformers as T
    from transformers import AutoTokenizer

    from trace_lib.models import from_model
    from trace_lib.models.default import default_gguf_path

    p = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name, local_files_only=True)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**{**TINY, "vocab_size": len(tok)}, tie_word_embeddings=True)).eval()
    return from_model(model, tokenizer=tok, name="tiny-smol")


GGUF_MIX = {DOWN1: "gguf-q8_0", "model.layers.2": "fp16", "lm_head": "q8_0", "model.layers.0.self_attn.v_proj": "fp32"}


def test_the_written_gguf_has_each_tensors_type_and_loads_to_the_variants_logits(smol_tiny, tmp_path, monkeypatch):
    from gguf import GGUFReader

    from trace_lib.models import load_model
    from trace_lib.quant.gguf_write import write_mixed_gguf

    monkeypatch.setenv("TRACE_CACHE", str(tmp_path / "cache"))
    cfg = mixed(GGUF_MIX)
    path = write_mixed_gguf(smol_tiny, cfg, tmp_path / "out" / "tiny-mixed.gguf")
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    gguf_parts = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]  # llama.cpp's names
    want = {"token_embd.weight": "F32", "output_norm.weight": "F32", "output.weight": "Q8_0"}
    for i in range(3):
        want |= {f"blk.{i}.attn_norm.weight": "F32", f"blk.{i}.ffn_norm.weight": "F32"}
        for g in gguf_parts:
            want[f"blk.{i}.{g}.weight"] = "F16" if i == 2 else "Q4_0"
    want |= {"blk.1.ffn_down.weight": "Q8_0", "blk.0.attn_v.weight": "F32"}
    assert types == want

    variant = quantize(smol_tiny, cfg)
    loaded = load_model(path)  # transformers' GGUF loader, de-quantized to float32, then trace's cache
    assert not loaded.model.config.tie_word_embeddings  # the head is its own Q8_0 tensor
    ids = _ids(vocab=len(smol_tiny.tokenizer))
    with torch.no_grad():
        got, expected = loaded.model(ids).logits, variant.model(ids).logits
    # The same float32 weights (row-wise blocks commute with llama.cpp's Q/K row permutation) give the same
    # logits; the tolerance leaves room for rms_norm_eps, which GGUF stores as float32 (1e-6 -> 9.99999997e-7).
    assert (got - expected).abs().max().item() <= 1e-5
    want_sd, got_sd = variant.model.state_dict(), loaded.model.state_dict()
    assert want_sd.keys() == got_sd.keys() and all(torch.equal(want_sd[k], got_sd[k]) for k in want_sd)
    text = "Quantized models, 123 tokens: <|im_start|>hi"
    assert loaded.tokenizer.encode(text) == smol_tiny.tokenizer.encode(text)


def test_every_type_reads_back_as_the_variants_weights_after_undoing_the_qk_permutation(tmp_path):
    """Without transformers: gguf-py de-quantizes each tensor of the file, the Q/K rows are put back in HF order
    (transformers' ``_reverse_permute_weights``, written out here), and each equals the variant's weight."""
    import numpy as np
    import transformers as T
    from gguf import GGUFReader, quants
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from trace_lib.quant.gguf_write import write_mixed_gguf

    ref = tiny_loaded("llama")
    bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
    ref.tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=bpe)
    cfg = mixed({"model.layers.1": "bf16", "model.layers.0.mlp": "q4_1", "model.layers.2.self_attn.q_proj": "fp16"},
                base="gguf-q5_1")
    reader = GGUFReader(write_mixed_gguf(ref, cfg, tmp_path / "toy.gguf"))
    variant = dict(quantize(ref, cfg).model.named_parameters())
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
    seen = set()
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d)\.(\w+)\.weight", t.name)
        if not m or m.group(2) not in hf:
            continue
        want = variant[f"model.layers.{m.group(1)}.{hf[m.group(2)]}.weight"].detach().numpy()
        w = quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if m.group(2) in ("attn_q", "attn_k"):
            heads = 4 if m.group(2) == "attn_q" else 2
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(2, 1).reshape(want.shape)
        assert np.array_equal(w, want), t.name
        seen.add(t.tensor_type.name)
    assert seen == {"Q5_1", "Q4_1", "BF16", "F16"}
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:4] == ["a", "b", "ab", "[PAD3]"]
    assert reader.fields["general.file_type"].contents() == 9  # llama.cpp's MOSTLY_Q5_1


def test_llama_quantize_args_name_each_tensor_once_with_its_type(smol_tiny):
    from trace_lib.quant.gguf_write import gguf_tensor_plan, llama_quantize_args, llama_quantize_command

    cfg = mixed(GGUF_MIX)
    args = llama_quantize_args(cfg, smol_tiny)
    assert args[:4] == ["--token-embedding-type", "f32", "--output-tensor-type", "q8_0"] and args[-1] == "Q4_0"
    plan = {t.name: t.type for t in gguf_tensor_plan(smol_tiny, cfg)}
    pairs = [args[i + 1].split("=") for i in range(4, len(args) - 1, 2)]
    assert all(args[i] == "--tensor-type" for i in range(4, len(args) - 1, 2))
    for pattern, ggml_type in pairs:  # llama.cpp searches each pattern as a regex in every tensor name
        hits = [n for n in plan if re.search(pattern, n)]
        assert hits == [pattern + ".weight"] and plan[hits[0]].lower() == ggml_type
    overridden = {p + ".weight" for p, _ in pairs}
    linear_types = {n: t for n, t in plan.items() if n.startswith("blk.") and "norm" not in n}
    assert {n for n, t in linear_types.items() if t != "Q4_0"} == overridden
    assert len(pairs) == 1 + 7 + 1  # blk.1.ffn_down, layer 2's seven, blk.0.attn_v
    assert llama_quantize_command(cfg, smol_tiny).endswith("model-f32.gguf model-mixed.gguf Q4_0")
    tied = {t.name: t.type for t in gguf_tensor_plan(smol_tiny, mixed({DOWN1: "q8_0"}))}
    assert "output.weight" not in tied and llama_quantize_args(mixed({DOWN1: "q8_0"}), smol_tiny)[3] == "f32"


def test_what_the_gguf_writer_refuses(tmp_path):
    from trace_lib.quant.gguf_write import write_mixed_gguf

    ref = tiny_loaded("llama")
    with pytest.raises(QuantizationError, match="the base must be a gguf-\\* type"):
        write_mixed_gguf(ref, mixed({DOWN1: "fp16"}, base="int4-rtn-g32"), tmp_path / "a.gguf")
    with pytest.raises(QuantizationError, match="int8-weight has no GGUF tensor type"):
        write_mixed_gguf(ref, mixed({DOWN1: "int8-weight"}), tmp_path / "a.gguf")
    with pytest.raises(QuantizationError, match="drop the -a8"):
        write_mixed_gguf(ref, "gguf-q4_0-a8", tmp_path / "a.gguf")
    with pytest.raises(OutputPathError, match="ends in .gguf"):
        write_mixed_gguf(ref, "gguf-q4_0", tmp_path / "a.bin")
    with pytest.raises(UnsupportedArchitectureError, match="llama-family models .* not 'qwen2'"):
        write_mixed_gguf(tiny_loaded("qwen2"), "gguf-q4_0", tmp_path / "a.gguf")
    with pytest.raises(QuantizationError, match="override 'model.layers.9' names no Linear"):
        write_mixed_gguf(ref, mixed({"model.layers.9": "fp16"}), tmp_path / "a.gguf")
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_the_default_model_written_mixed_loads_to_the_variants_logits(default_loaded, tmp_path, monkeypatch):
    from trace_lib.models import load_model
    from trace_lib.quant.gguf_write import write_mixed_gguf

    monkeypatch.setenv("TRACE_CACHE", str(tmp_path / "cache"))
    cfg = mixed({"model.layers.12.mlp.down_proj": "gguf-q8_0", "model.layers.13": "fp16"})
    loaded = load_model(write_mixed_gguf(default_loaded, cfg, tmp_path / "smollm2-mixed.gguf"))
    ids = default_loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (loaded.model(ids).logits - quantize(default_loaded, cfg).model(ids).logits).abs().max().item()
    assert diff <= 1e-4
