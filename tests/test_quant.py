"""Quantization: names, the reference left intact, numerics against the formats' own reference code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trace_lib.errors import QuantizationError
from trace_lib.quant import QuantizationConfig, QuantizationType, parse_config, quantize, valid_names
from trace_lib.quant.gguf_backend import gguf_roundtrip

from conftest import tiny_loaded


def _ids(seed=0, shape=(2, 16)):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", [n for n in valid_names() if "gptq" not in n and "awq" not in n])
def test_names_round_trip(name):
    cfg = parse_config(name)
    assert parse_config(cfg.name) == cfg
    assert QuantizationConfig.from_dict(cfg.to_dict()) == cfg


def test_aliases_and_seed_spelling():
    assert parse_config("w4a8").name == "int4-rtn-g32-a8"
    assert parse_config("q4_0").name == "gguf-q4_0"
    assert parse_config("int4-rtn").name == "int4-rtn-g32"
    assert QuantizationConfig(QuantizationType.INT4_RTN, bits=4, group_size=32).name == "int4-rtn-g32"
    assert QuantizationConfig(QuantizationType.INT8_DYNAMIC).name == "int8-dynamic"
    assert parse_config("int3-rtn-pc").group_size is None


def test_bad_configs_are_clear():
    with pytest.raises(QuantizationError, match="valid names look like: .*int4-rtn-g32"):
        parse_config("int4-foo")
    with pytest.raises(QuantizationError, match="2 to 8 bits"):
        parse_config("int9-rtn-g32")
    with pytest.raises(QuantizationError, match="activation fake-quantization supports"):
        parse_config("int4-rtn-g32-a5")
    with pytest.raises(QuantizationError, match="already quantizes activations"):
        parse_config("int8-dynamic-a8")


def test_group_size_must_divide_width():
    ref = tiny_loaded("llama")  # hidden 32, intermediate 64
    with pytest.raises(QuantizationError, match="group size 48 does not divide the input width"):
        quantize(ref, "int4-rtn-g48")


@pytest.mark.parametrize("name", ["fp16", "bf16", "int8-dynamic", "int8-dyn-tok", "int8-weight", "int4-rtn-g32",
                                  "int2-rtn-pc", "gguf-q8_0", "gguf-q5_1", "gguf-q5_0", "gguf-q4_1", "gguf-q4_0",
                                  "w4a8", "a4"])
def test_reference_untouched_and_variant_differs(name):
    ref = tiny_loaded("llama")
    before = {k: v.clone() for k, v in ref.model.state_dict().items()}
    with torch.no_grad():
        base = ref.model(_ids()).logits
        var = quantize(ref, name)
        out = var.model(_ids()).logits.float()
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert var.content_hash != ref.content_hash and var.quant.name == parse_config(name).name
    err = (out - base).abs().max().item()
    assert 0 < err < 1.0
    # the skipped lm_head keeps the reference weights (casts change it, by design)
    if name not in ("fp16", "bf16"):
        assert torch.equal(var.model.lm_head.weight.float(), ref.model.lm_head.weight)


def test_fp32_variant_is_exact():
    ref = tiny_loaded("qwen2")
    var = quantize(ref, "fp32")
    with torch.no_grad():
        assert torch.equal(var.model(_ids()).logits, ref.model(_ids()).logits)


def test_error_grows_as_bits_fall():
    ref = tiny_loaded("llama", seed=3)
    with torch.no_grad():
        base = ref.model(_ids()).logits
        errs = [(quantize(ref, f"int{b}-rtn-g32").model(_ids()).logits - base).pow(2).mean().item() for b in (8, 4, 2)]
    assert errs[0] < errs[1] < errs[2]


@pytest.mark.parametrize("name", ["int4-rtn-g32", "int8-weight", "int3-rtn-pc"])
def test_dequantized_path_equals_torchao_kernel(name):
    ref = tiny_loaded("llama")
    fast = quantize(ref, name)
    kern = quantize(ref, name + "-kernel")
    assert "de-quantized" in fast.quant_info["path"] and "kernels" in kern.quant_info["path"]
    with torch.no_grad():
        torch.testing.assert_close(fast.model(_ids()).logits, kern.model(_ids()).logits, atol=1e-4, rtol=1e-4)


def _roundf(x):
    """C's roundf: halves away from zero (ggml uses it)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def test_gguf_q8_0_equals_ggml_reference_formula():
    # ggml quantize_row_q8_0_ref: d = amax/127, q = roundf(x/d), stored d is fp16; x' = q * fp16(d)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    deq, _ = gguf_roundtrip(x, "Q8_0")
    xb = x.numpy().reshape(-1, 32).astype(np.float32)
    d = np.abs(xb).max(axis=1, keepdims=True) / 127
    q = _roundf(xb * (1.0 / d))
    expected = (q * d.astype(np.float16).astype(np.float32)).reshape(4, 64)
    np.testing.assert_array_equal(deq.numpy(), expected)


def test_gguf_q4_0_equals_ggml_reference_formula():
    # ggml quantize_row_q4_0_ref: m = the value of largest |x|; d = m / -8; q = min(15, int(x/d + 8.5)); x' = (q-8)*fp16(d)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(1))
    deq, _ = gguf_roundtrip(x, "Q4_0")
    xb = x.numpy().reshape(-1, 32).astype(np.float32)
    m = xb[np.arange(len(xb)), np.abs(xb).argmax(axis=1)][:, None]
    d = m / -8
    q = np.minimum(15, np.trunc(xb * (1.0 / d) + 8.5))
    expected = ((q - 8) * d.astype(np.float16).astype(np.float32)).reshape(3, 96)
    np.testing.assert_allclose(deq.numpy(), expected, atol=1e-7, rtol=0)


def test_activation_fake_quant_matches_hand_formula():
    from trace_lib.quant.activations import make_fake_quantizer

    x = torch.tensor([[[-1.0, 0.0, 0.5, 2.0]]])
    # per token asymmetric int8: scale = (2 - -1)/255, zero = -128 - round(-1/scale) = -128 + 85 = -43
    scale = 3.0 / 255
    zero = -128 - round(-1.0 / scale)
    q = torch.clamp(torch.round(x / scale) + zero, -128, 127)
    expected = (q - zero) * scale
    torch.testing.assert_close(make_fake_quantizer(8)(x), expected, atol=1e-6, rtol=0)


def test_storage_report_by_hand():
    ref = tiny_loaded("llama")  # 3 layers; per layer q,o: 32x32, k,v: 16x32, gate,up: 64x32, down: 32x64
    var = quantize(ref, "gguf-q4_0")
    per_layer = 2 * 32 * 32 + 2 * 16 * 32 + 2 * 64 * 32 + 32 * 64
    q_params = 3 * per_layer
    total = sum(p.numel() for p in ref.model.parameters())
    info = var.quant_info
    assert info["quantized_params"] == q_params
    assert info["quantized_bits_per_weight"] == 4.5
    expected_bits = q_params * 4.5 + (total - q_params) * 32
    assert info["model_size_mb"] == round(expected_bits / 8 / 1e6, 3)
    assert info["bits_per_weight"] == round(expected_bits / total, 4)
    assert quantize(ref, "int4-rtn-g32").quant_info["quantized_bits_per_weight"] == 5.0  # 4 + 32/32


def test_gpt2_conv1d_is_quantized_as_linear():
    ref = tiny_loaded("gpt2")
    var = quantize(ref, "int8-weight")
    with torch.no_grad():
        err = (var.model(_ids()).logits - ref.model(_ids()).logits).abs().max().item()
    assert 0 < err < 0.1
    assert var.quant_info["quantized_params"] > 0


@pytest.mark.slow
def test_gguf_q4_1_reproduces_the_default_model_file(default_loaded):
    """The embedded default is a Q4_1 file made by llama.cpp; re-quantizing its weights gives its bytes back."""
    from gguf import GGUFReader

    from trace_lib.models.default import default_gguf_path

    tensors = {t.name: t for t in GGUFReader(default_gguf_path()).tensors}
    layers = default_loaded.model.model.layers
    for gguf_name, module in [("blk.0.ffn_down.weight", layers[0].mlp.down_proj),
                              ("blk.11.ffn_gate.weight", layers[11].mlp.gate_proj),
                              ("blk.29.attn_v.weight", layers[29].self_attn.v_proj),
                              ("blk.5.attn_output.weight", layers[5].self_attn.o_proj)]:
        deq, raw = gguf_roundtrip(module.weight, "Q4_1")
        assert np.array_equal(raw, np.asarray(tensors[gguf_name].data)), gguf_name
        assert torch.equal(deq, module.weight.detach())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_torchao_rtn_equals_symmetric_round_to_nearest(bits):
    # torchao IntxWeightOnlyConfig, MappingType.SYMMETRIC: per group of G, s = amax / ((qmax - qmin) / 2),
    # q = clamp(round_half_even(w * (1 / s)), qmin, qmax), w' = q * s, qmin = -2^(b-1), qmax = 2^(b-1) - 1.
    ref = tiny_loaded("llama", seed=4)
    var = quantize(ref, f"int{bits}-rtn-g32")
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"):
        w = ref.model.get_submodule(name).weight.detach()
        wg = w.reshape(-1, 32)
        s = wg.abs().amax(dim=1, keepdim=True) / ((qmax - qmin) / 2)
        expected = (torch.clamp(torch.round(wg * (1.0 / s)), qmin, qmax) * s).reshape(w.shape)
        torch.testing.assert_close(var.model.get_submodule(name).weight, expected, atol=1e-7, rtol=0)


def test_int8_weight_is_per_row_symmetric():
    # torchao Int8WeightOnlyConfig: one scale per output row, s = amax / 127.5, q = round(w * (1/s)) in [-128, 127].
    ref = tiny_loaded("llama", seed=5)
    var = quantize(ref, "int8-weight")
    w = ref.model.model.layers[1].mlp.up_proj.weight.detach()
    s = w.abs().amax(dim=1, keepdim=True) / 127.5
    expected = torch.clamp(torch.round(w * (1.0 / s)), -128, 127) * s
    torch.testing.assert_close(var.model.model.layers[1].mlp.up_proj.weight, expected, atol=1e-7, rtol=0)


def test_int8_dynamic_uses_one_activation_scale_per_tensor():
    # torch.ao dynamic int8 on x86: weights qint8 per tensor; the input is quantized at run time with ONE
    # affine scale for the whole tensor, reduce_range (7 bits): s = (max(x, 0) - min(x, 0)) / 127,
    # z = round(-min / s); y = linear((clamp(round(x / s) + z, 0, 127) - z) * s, dequant(W)) + b.
    ref = tiny_loaded("llama", seed=6)
    var = quantize(ref, "int8-dynamic")
    qlin = var.model.model.layers[0].mlp.gate_proj
    w_deq = qlin.weight().dequantize()
    assert qlin.weight().qscheme() == torch.per_tensor_affine
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 0, 0] = 40.0  # one outlier sets the scale of every token: the per-tensor weakness trace measures
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    s = (hi - lo) / 127
    z = int(np.clip(round(-lo / s), 0, 127))
    xq = (torch.clamp(torch.round(x / s) + z, 0, 127) - z) * s
    torch.testing.assert_close(qlin(x), torch.nn.functional.linear(xq, w_deq, qlin.bias()), atol=1e-5, rtol=0)


def _ggml_affine_reference(xb: np.ndarray, levels: int) -> np.ndarray:
    # ggml quantize_row_q4_1_ref / q5_1_ref: d = (max - min) / levels, q = min(levels, (int)((x - min) / d + 0.5)),
    # stored d and min are fp16: x' = q * fp16(d) + fp16(min)
    mn, mx = xb.min(axis=1, keepdims=True), xb.max(axis=1, keepdims=True)
    d = (mx - mn) / levels
    q = np.minimum(levels, np.trunc((xb - mn) * np.where(d != 0, 1.0 / d, 0.0) + 0.5))
    f16 = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731
    return q * f16(d) + f16(mn)


@pytest.mark.parametrize("fmt,levels", [("Q4_1", 15), ("Q5_1", 31)])
def test_gguf_affine_formats_equal_ggml_reference_formula(fmt, levels):
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(2))
    deq, _ = gguf_roundtrip(x, fmt)
    expected = _ggml_affine_reference(x.numpy().reshape(-1, 32).astype(np.float32), levels).reshape(3, 96)
    np.testing.assert_allclose(deq.numpy(), expected, atol=1e-7, rtol=0)


def test_gguf_q5_0_equals_ggml_reference_formula():
    # ggml quantize_row_q5_0_ref: m = the value of largest |x|; d = m / -16; q = min(31, (int)(x/d + 16.5));
    # x' = (q - 16) * fp16(d)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(3))
    deq, _ = gguf_roundtrip(x, "Q5_0")
    xb = x.numpy().reshape(-1, 32).astype(np.float32)
    d = xb[np.arange(len(xb)), np.abs(xb).argmax(axis=1)][:, None] / -16
    q = np.minimum(31, np.trunc(xb * (1.0 / d) + 16.5))
    expected = ((q - 16) * d.astype(np.float16).astype(np.float32)).reshape(3, 96)
    np.testing.assert_allclose(deq.numpy(), expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_activation_fake_quant_per_token_at_each_width(bits):
    from trace_lib.quant.activations import make_fake_quantizer

    # per token asymmetric: s = (max - min) / (2^b - 1), z = qmin - round(min / s), x' = (clamp(round(x/s) + z) - z) s
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(bits))
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / (qmax - qmin)
    z = qmin - torch.round(lo / s)
    expected = (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s
    torch.testing.assert_close(make_fake_quantizer(bits)(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gguf-q4_0-a8", "int8-weight-a6", "int4-rtn-g32-a4"])
def test_activation_bits_combine_with_weight_types(name):
    ref = tiny_loaded("llama")
    weights_only = quantize(ref, name.rsplit("-a", 1)[0])
    both = quantize(ref, name)
    with torch.no_grad():
        w = weights_only.model(_ids()).logits
        wa = both.model(_ids()).logits
    assert both.quant.act_bits == int(name.rsplit("-a", 1)[1])
    assert 0 < (wa - w).abs().max().item() < 1.0  # the activations really are quantized on top of the weights


@pytest.mark.parametrize("name", ["int4-rtn-g32", "int8-weight", "gguf-q4_0", "int8-rtn-pc-a8"])
def test_quantizing_a_bf16_reference_keeps_its_dtype(name):
    ref = tiny_loaded("llama")
    ref.model.to(torch.bfloat16)
    var = quantize(ref, name)
    assert var.model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = var.model(_ids()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
