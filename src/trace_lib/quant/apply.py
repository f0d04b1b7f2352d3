"""``quantize(loaded, config)``: build a variant of a reference model; the reference is never modified.

A variant shares the storage of every tensor its config leaves as it is (embeddings, norms, skipped Linears,
biases) with the reference (:func:`shared_copy`); only the tensors the backend changes are new, so building one
never holds a second full copy of the weights.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping

import torch
from torch import nn

from trace_lib.cache import stable_hash
from trace_lib.errors import QuantizationError
from trace_lib.models.arch import adapt
from trace_lib.models.load import Loaded
from trace_lib.quant.casts import CAST_DTYPES
from trace_lib.quant.config import (
    CASTS,
    GGUF_BPW,
    GGUF_TYPES,
    QuantizationConfig,
    QuantizationType,
    parse_config,
)
from trace_lib.quant.linears import assign_linears, convert_conv1d, quantizable_linears


def quantize(loaded: Loaded, config: QuantizationConfig | str) -> Loaded:
    """Return a new :class:`Loaded` holding the quantized variant of ``loaded``.

    The variant's module tree is a copy of the reference's whose tensors share the reference's storage
    (:func:`shared_copy`); the backends give each quantized Linear new weights and leave every shared tensor as
    it is (checked: :func:`_check_untouched`). The variant's ``quant_info``
    records the library and execution path used, the time taken, and the storage the format implies
    (bits per weight, model size; see :func:`storage_report`). A mixed-precision config (one with
    ``overrides``) quantizes each group of Linear layers with its own type (:func:`assign_linears`).
    """
    config = parse_config(config)
    start = time.perf_counter()
    versions = _versions(loaded.model)
    cast = CAST_DTYPES[config.type] if config.type in CASTS and not config.overrides else None
    model = shared_copy(loaded.model, cast)
    model.eval()
    convert_conv1d(model)
    quantized: set[str] | dict[str, QuantizationConfig]
    if config.overrides:
        assigned = assign_linears(model, config)
        info = _apply_mixed(model, assigned, loaded)
        quantized = {n: c for n, _, c in assigned}
    else:
        t = config.type
        linears = quantizable_linears(model, config.skip) if t is not QuantizationType.FP32 or config.act_bits else []
        info = _apply_one(model, config, linears, loaded)
        if config.act_bits:
            from trace_lib.quant.activations import add_activation_fake_quant

            info.update(add_activation_fake_quant(linears, config.act_bits))
        quantized = {n for n, _ in linears}
    _check_untouched(loaded.model, versions, config)
    info["seconds_to_build"] = round(time.perf_counter() - start, 3)
    info.update(storage_report(loaded.model, config, quantized))
    return Loaded(model=model, tokenizer=loaded.tokenizer, arch=adapt(model),
                  content_hash=stable_hash({"ref": loaded.content_hash, "config": config.to_dict()}),
                  name=f"{loaded.name} [{config.name}]", spec=f"{loaded.spec}@{config.name}", source=loaded.source,
                  quant=config, quant_info=info)


def shared_copy(model: nn.Module, cast: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers share ``model``'s tensor storage.

    Each plain parameter becomes a new ``nn.Parameter`` over the same storage, each plain buffer a new tensor
    over it: the copy's modules, and the tensor objects they hold, are its own (rebinding a weight, ``.data =``
    or ``.to()`` on the copy never reaches ``model``), but no weight is duplicated. With ``cast`` (a whole-model
    fp16/bf16/fp32 cast) every floating-point parameter and buffer of another dtype is converted instead, which
    allocates it at the new width only (a deep copy would first clone it at the old one). Tied parameters stay
    tied. Tensors of other types (quantized tensor subclasses) are deep-copied as before.
    """
    memo: dict[int, object] = {}
    for p in model.parameters():
        if type(p) is nn.Parameter:
            data = p.detach()
            if cast is not None and data.is_floating_point() and data.dtype != cast:
                data = data.to(cast)
            memo[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
    for b in model.buffers():
        if type(b) is torch.Tensor:
            data = b.detach()
            memo[id(b)] = data.to(cast) if cast is not None and data.is_floating_point() else data
    return copy.deepcopy(model, memo)


def _versions(model: nn.Module) -> dict[str, int]:
    """The in-place version counter of each of ``model``'s tensors (a counter that views and the copies made
    by :func:`shared_copy` share: any in-place write through them bumps it)."""
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor) and not t.is_inference():
            out[name] = t._version
    return out


def _check_untouched(reference: nn.Module, before: dict[str, int], config: QuantizationConfig) -> None:
    """Refuse a variant whose build wrote into the reference's tensors in place (through a shared tensor)."""
    after = _versions(reference)
    changed = [n for n, v in before.items() if after.get(n, v) != v]
    if changed:
        raise QuantizationError(f"building {config.name} wrote into the reference's {changed[0]} in place "
                                f"({len(changed)} tensor(s)); the reference is no longer what was loaded")


def _apply_one(model: nn.Module, config: QuantizationConfig, linears: list[tuple[str, nn.Linear]],
               loaded: Loaded) -> dict:
    """Quantize ``linears`` of ``model`` in place with the one backend that implements ``config``'s type."""
    t = config.type
    if t in CASTS:
        from trace_lib.quant.casts import apply_cast

        return apply_cast(model, config)
    if t is QuantizationType.INT8_DYNAMIC:
        from trace_lib.quant.torchao_backend import apply_dynamic_int8

        return apply_dynamic_int8(model, config, linears)
    if t in (QuantizationType.INT8_DYNAMIC_PER_TOKEN, QuantizationType.INT8_WEIGHT, QuantizationType.INT_RTN):
        from trace_lib.quant.torchao_backend import apply_torchao

        return apply_torchao(model, config, linears)
    if t in GGUF_TYPES:
        from trace_lib.quant.gguf_backend import apply_gguf

        return apply_gguf(model, config, linears)
    if t in (QuantizationType.INT4_GPTQ, QuantizationType.INT4_AWQ):
        from trace_lib.quant.calibrated import apply_calibrated

        return apply_calibrated(model, config, linears, loaded)
    raise QuantizationError(f"no backend for {t.value}")  # pragma: no cover - every enum member is handled above


def _apply_mixed(model: nn.Module, assigned: list[tuple[str, nn.Linear, QuantizationConfig]], loaded: Loaded) -> dict:
    """Quantize each group of Linears with its own config: the base group first (GPTQ/AWQ calibrate on the
    reference's other layers), then the overrides by name. fp32/fp16/bf16 overrides round the weights only."""
    from trace_lib.quant.casts import round_weights

    groups: dict[QuantizationConfig, list[tuple[str, nn.Linear]]] = {}
    for name, m, cfg in assigned:
        groups.setdefault(cfg, []).append((name, m))
    base = assigned[0][2].base
    libraries: list[str] = []
    paths: list[str] = []
    for cfg in sorted(groups, key=lambda c: (c != base, c.name)):
        linears = groups[cfg]
        part = round_weights(linears, cfg) if cfg.type in CASTS else _apply_one(model, cfg, linears, loaded)
        libraries.append(part["library"])
        paths.append(f"{cfg.name} on {len(linears)} Linear(s): {part['path']}")
    return {"library": "; ".join(dict.fromkeys(libraries)), "path": "; ".join(paths),
            "layers_by_config": {c.name: len(groups[c]) for c in sorted(groups, key=lambda c: c.name)}}


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


def storage_report(reference: nn.Module, config: QuantizationConfig,
                   quantized: set[str] | Mapping[str, QuantizationConfig]) -> dict:
    """Bits per weight and model size the variant's format implies (shared/tied parameters counted once).

    ``quantized`` names the Linears the config quantizes, or maps each to its own config (a mixed-precision
    config). Their weights count at :func:`_weight_bits`, an fp32/fp16/bf16 override's at that width (never more
    than the reference's); everything else at the variant's float width (the reference dtype, or 16 bits for the
    fp16/bf16 casts). ``quantized_bits_per_weight`` is the average over those Linears' weights. An output layer
    tied to the embedding but quantized apart from it is stored twice: the float embedding and the quantized copy.
    """
    from trace_lib.quant.casts import keeps_weight

    per_module = dict(quantized) if isinstance(quantized, Mapping) else dict.fromkeys(quantized, config)
    mixed = bool(config.overrides)
    float_bits = 16 if not mixed and config.type in (QuantizationType.FP16, QuantizationType.BF16) else None
    weights: dict[int, tuple[int, QuantizationConfig]] = {}
    for n, m in reference.named_modules():
        if n in per_module and hasattr(m, "weight"):
            # GPT-2 Conv1D layers are quantized as Linear: their weight [in, out] has in_features = shape[0].
            in_features = m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0]
            weights[id(m.weight)] = (in_features, per_module[n])
    embeddings = {id(m.weight) for m in reference.modules() if isinstance(m, nn.Embedding)}
    total_bits = 0.0
    total_params = 0
    q_params = 0
    q_bits = 0.0
    for p in reference.parameters():  # parameters() yields tied tensors once
        n = p.numel()
        total_params += n
        own = n * (float_bits or torch.finfo(p.dtype).bits) if p.dtype.is_floating_point else n * p.element_size() * 8
        entry = weights.get(id(p))
        if entry is None or (entry[1].type in CASTS and not mixed):  # a whole-model cast quantizes no Linear
            total_bits += own
            continue
        in_features, cfg = entry
        cast = cfg.type in CASTS
        b = min(float(cfg.weight_bits), own / n) if cast else _weight_bits(cfg, in_features)
        q_params += n
        q_bits += n * b
        if id(p) in embeddings and not (cast and keeps_weight(p, cfg)):
            total_bits += own + n * b
            total_params += n
        else:
            total_bits += n * b
    return {"bits_per_weight": round(total_bits / total_params, 4),
            "quantized_bits_per_weight": round(q_bits / q_params, 4) if q_params else None,
            "quantized_params": q_params, "total_params": total_params,
            "model_size_mb": round(total_bits / 8 / 1e6, 3)}
