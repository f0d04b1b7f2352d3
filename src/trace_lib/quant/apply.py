"""``quantize(loaded, config)``: build a variant of a reference model; the reference is never modified."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from trace_lib.cache import stable_hash
from trace_lib.errors import QuantizationError
from trace_lib.models.arch import adapt
from trace_lib.models.load import Loaded
from trace_lib.quant.config import GGUF_BPW, GGUF_TYPES, QuantizationConfig, QuantizationType, parse_config
from trace_lib.quant.linears import convert_conv1d, quantizable_linears


def quantize(loaded: Loaded, config: QuantizationConfig | str) -> Loaded:
    """Return a new :class:`Loaded` holding the quantized variant of ``loaded``.

    The reference model is deep-copied first; its weights are untouched. The variant's ``quant_info``
    records the library and execution path used, the time taken, and the storage the format implies
    (bits per weight, model size; see :func:`storage_report`).
    """
    config = parse_config(config)
    start = time.perf_counter()
    model = copy.deepcopy(loaded.model)
    model.eval()
    convert_conv1d(model)
    t = config.type
    linears = quantizable_linears(model, config.skip) if t is not QuantizationType.FP32 or config.act_bits else []
    if t in (QuantizationType.FP32, QuantizationType.FP16, QuantizationType.BF16):
        from trace_lib.quant.casts import apply_cast

        info = apply_cast(model, config)
    elif t is QuantizationType.INT8_DYNAMIC:
        from trace_lib.quant.torchao_backend import apply_dynamic_int8

        info = apply_dynamic_int8(model, config, linears)
    elif t in (QuantizationType.INT8_DYNAMIC_PER_TOKEN, QuantizationType.INT8_WEIGHT, QuantizationType.INT_RTN):
        from trace_lib.quant.torchao_backend import apply_torchao

        info = apply_torchao(model, config, linears)
    elif t in GGUF_TYPES:
        from trace_lib.quant.gguf_backend import apply_gguf

        info = apply_gguf(model, config, linears)
    elif t in (QuantizationType.INT4_GPTQ, QuantizationType.INT4_AWQ):
        from trace_lib.quant.calibrated import apply_calibrated

        info = apply_calibrated(model, config, linears, loaded)
    else:  # pragma: no cover - every enum member is handled above
        raise QuantizationError(f"no backend for {t.value}")
    if config.act_bits:
        from trace_lib.quant.activations import add_activation_fake_quant

        info.update(add_activation_fake_quant(linears, config.act_bits))
    info["seconds_to_build"] = round(time.perf_counter() - start, 3)
    info.update(storage_report(loaded.model, config, {n for n, _ in linears}))
    return Loaded(model=model, tokenizer=loaded.tokenizer, arch=adapt(model),
                  content_hash=stable_hash({"ref": loaded.content_hash, "config": config.to_dict()}),
                  name=f"{loaded.name} [{config.name}]", spec=f"{loaded.spec}@{config.name}", source=loaded.source,
                  quant=config, quant_info=info)


def _weight_bits(config: QuantizationConfig, in_features: int) -> float:
    """Storage bits per weight of one quantized Linear of input width ``in_features``.

    int RTN and GPTQ (symmetric): b + 32/G (a float32 scale per group of G, no zero point; per channel
    G = in_features). AWQ (asymmetric): b + (32 + 4)/G (plus a 4-bit zero point per group, packed as
    compressed-tensors stores it). int8 per-row types: 8 + 32/in_features. torch.ao dynamic int8: 8 (one scale per
    tensor). GGUF: the block format's exact size (e.g. Q4_0 = 18 bytes per 32 weights = 4.5).
    """
    t = config.type
    if t in GGUF_TYPES:
        return GGUF_BPW[GGUF_TYPES[t]]
    if t in (QuantizationType.INT_RTN, QuantizationType.INT4_GPTQ, QuantizationType.INT4_AWQ):
        group = config.group_size or in_features
        zero_bits = 4 if t is QuantizationType.INT4_AWQ else 0
        return config.bits + (32 + zero_bits) / group
    if t in (QuantizationType.INT8_WEIGHT, QuantizationType.INT8_DYNAMIC_PER_TOKEN):
        return 8 + 32 / in_features
    if t is QuantizationType.INT8_DYNAMIC:
        return 8.0
    return float(config.weight_bits)


def storage_report(reference: nn.Module, config: QuantizationConfig, quantized: set[str]) -> dict:
    """Bits per weight and model size the variant's format implies (shared/tied parameters counted once).

    Parameters of quantized Linears count at :func:`_weight_bits`; everything else at the variant's float
    width (the reference dtype, or 16 bits for the fp16/bf16 casts).
    """
    float_bits = 16 if config.type in (QuantizationType.FP16, QuantizationType.BF16) else None
    quantized_weights = {id(m.weight): m.in_features for n, m in reference.named_modules()
                         if n in quantized and isinstance(m, nn.Linear)}
    # GPT-2 Conv1D layers are quantized as Linear: their weight [in, out] has in_features = shape[0].
    for n, m in reference.named_modules():
        if n in quantized and not isinstance(m, nn.Linear) and hasattr(m, "weight"):
            quantized_weights[id(m.weight)] = m.weight.shape[0]
    total_bits = 0.0
    total_params = 0
    q_params = 0
    q_bits = 0.0
    for p in reference.parameters():  # parameters() yields tied tensors once
        n = p.numel()
        total_params += n
        if id(p) in quantized_weights and config.type not in (QuantizationType.FP32, QuantizationType.FP16,
                                                               QuantizationType.BF16):
            b = n * _weight_bits(config, quantized_weights[id(p)])
            q_params += n
            q_bits += b
        elif p.dtype.is_floating_point:
            b = n * (float_bits or torch.finfo(p.dtype).bits)
        else:
            b = n * p.element_size() * 8
        total_bits += b
    return {"bits_per_weight": round(total_bits / total_params, 4),
            "quantized_bits_per_weight": round(q_bits / q_params, 4) if q_params else None,
            "quantized_params": q_params, "total_params": total_params,
            "model_size_mb": round(total_bits / 8 / 1e6, 3)}
