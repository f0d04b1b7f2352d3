"""Integer quantization with the libraries that implement it: torchao and torch.ao.

- ``int8-dynamic``: ``torch.ao.quantization.quantize_dynamic`` with the default dynamic qconfig (int8
  weights with a per-tensor scale; activations quantized per tensor at run time, real fbgemm kernels).
- ``int8-dyn-tok``: torchao ``Int8DynamicActivationInt8WeightConfig`` (int8 per-row weights, int8 per-token
  dynamic activations; torchao's real path).
- ``int8-weight``: torchao ``Int8WeightOnlyConfig`` (int8 per-row weights).
- ``int{b}-rtn-g{G}``: torchao ``IntxWeightOnlyConfig(weight_dtype=torch.int{b}, granularity=PerGroup(G))``,
  symmetric round-to-nearest.

For the weight-only types the variant's numerics are those of its de-quantized weights, so by default the
quantized weights are de-quantized once (``tensor.dequantize()``) into plain float parameters and the
variant runs at reference speed; ``kernel=True`` keeps torchao's quantized tensors and kernels instead.
``tests/test_quant.py`` checks the two paths agree.
"""

from __future__ import annotations

import torch
from torch import nn

from trace_lib.errors import QuantizationError
from trace_lib.quant.config import QuantizationConfig, QuantizationType
from trace_lib.quant.linears import check_group_size


def _torchao_config(config: QuantizationConfig):
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerAxis, PerGroup

    t = config.type
    if t is QuantizationType.INT8_DYNAMIC_PER_TOKEN:
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if t is QuantizationType.INT8_WEIGHT:
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if t is QuantizationType.INT_RTN:
        granularity = PerGroup(config.group_size) if config.group_size else PerAxis(0)
        return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{config.bits}"), granularity=granularity)
    raise QuantizationError(f"{config.name} is not a torchao type")


def apply_torchao(model: nn.Module, config: QuantizationConfig, linears: list[tuple[str, nn.Linear]]) -> dict:
    import torchao
    from torchao.quantization import quantize_

    if config.type is QuantizationType.INT_RTN:
        check_group_size(linears, config.group_size, config.name)
    chosen = {id(m) for _, m in linears}
    dtypes = {id(m): m.weight.dtype for _, m in linears}  # de-quantize back to the model's own dtype
    try:
        quantize_(model, _torchao_config(config), filter_fn=lambda m, fqn: id(m) in chosen)
    except (RuntimeError, NotImplementedError, AssertionError) as e:
        raise QuantizationError(f"torchao could not apply {config.name} on this machine: {str(e).splitlines()[0]}") from e
    info = {"library": f"torchao {torchao.__version__}", "path": "torchao quantized tensors and kernels"}
    if config.weight_only and not config.kernel:
        for _, m in linears:
            w = m.weight
            if type(w.data) is not torch.Tensor or type(w) not in (torch.Tensor, nn.Parameter):
                m.weight = nn.Parameter(w.dequantize().to(dtypes[id(m)]), requires_grad=False)
        info["path"] = "de-quantized torchao weights (same numerics as the kernel, reference speed)"
    return info


def apply_dynamic_int8(model: nn.Module, config: QuantizationConfig, linears: list[tuple[str, nn.Linear]]) -> dict:
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            quantize_dynamic(model, qconfig_spec={n for n, _ in linears}, dtype=torch.qint8, inplace=True)
        except (RuntimeError, AssertionError) as e:
            raise QuantizationError(f"torch.ao dynamic int8 failed on this machine: {str(e).splitlines()[0]}") from e
    engine = torch.backends.quantized.engine
    return {"library": f"torch.ao.quantization {torch.__version__}", "path": f"quantized kernels ({engine})"}
