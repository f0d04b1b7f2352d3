"""Selecting the Linear layers a config quantizes, and making every model's projections plain ``nn.Linear``."""

from __future__ import annotations

from torch import nn

from trace_lib.errors import QuantizationError
from trace_lib.quant.config import QuantizationConfig


def convert_conv1d(model: nn.Module) -> int:
    """Replace transformers' GPT-2 style ``Conv1D`` (weight [in, out]) with an equivalent ``nn.Linear``.

    Quantization libraries act on ``nn.Linear``; ``Conv1D(x) = x @ W + b`` equals ``Linear`` with weight
    ``W.T``. Returns how many modules were replaced.
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        return 0
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                in_f, out_f = child.weight.shape
                lin = nn.Linear(in_f, out_f, bias=child.bias is not None, dtype=child.weight.dtype)
                lin.weight.data.copy_(child.weight.data.t())
                if child.bias is not None:
                    lin.bias.data.copy_(child.bias.data)
                setattr(module, child_name, lin)
                count += 1
    return count


def is_skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantizable_linears(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` not named in ``skip`` (matched as a name or a dotted suffix)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not is_skipped(n, skip)]
    if not found:
        raise QuantizationError(f"no Linear layers left to quantize after skip={skip}")
    return found


def matches(name: str, pattern: str) -> bool:
    """An override pattern matches the module it names and every module under it (a dotted prefix)."""
    return name == pattern or name.startswith(pattern + ".")


def assign_linears(model: nn.Module, config: QuantizationConfig
                   ) -> list[tuple[str, nn.Linear, QuantizationConfig]]:
    """Each Linear a (mixed-precision) config touches, with the config it gets.

    A Linear that an override pattern matches gets that override's config (the longest matching pattern wins,
    and a layer ``skip`` names can be overridden); every other Linear not in ``skip`` gets the base config. An
    override pattern that matches no Linear of the model is a mistake (a typo, or a config written for another
    model): the error names it and a few of the model's Linear names.
    """
    base = config.base
    chosen = config.override_configs
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    out: list[tuple[str, nn.Linear, QuantizationConfig]] = []
    matched: set[str] = set()
    for name, m in linears:
        hits = [p for p in chosen if matches(name, p)]
        matched.update(hits)
        if hits:
            out.append((name, m, chosen[max(hits, key=len)]))
        elif not is_skipped(name, config.skip):
            out.append((name, m, base))
    missing = [p for p in chosen if p not in matched]
    if missing:
        examples = ", ".join(n for n, _ in linears[:3])
        raise QuantizationError(f"override {missing[0]!r} names no Linear layer of this model; its Linear layers are "
                                f"named like {examples} (a pattern is such a name or a dotted prefix of it)")
    if not out:
        raise QuantizationError(f"no Linear layers left to quantize after skip={config.skip}")
    return out


def check_group_size(linears: list[tuple[str, nn.Linear]], group: int | None, what: str) -> None:
    """Every quantized weight's input width must be a multiple of the group (block) size."""
    if not group:
        return
    bad = [(n, m.in_features) for n, m in linears if m.in_features % group]
    if bad:
        name, width = bad[0]
        raise QuantizationError(
            f"{what}: group size {group} does not divide the input width {width} of {name} "
            f"({len(bad)} layer(s) affected); choose a group size that divides {width}, or skip those layers")
