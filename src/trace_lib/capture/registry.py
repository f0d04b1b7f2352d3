"""One registry of every forward hook trace installs on a model: list them, remove them.

>>> installed_hooks(variant)
[HookRecord(module='model.layers.1', hook_name='blocks.1.hook_resid_post', kind='ablation',
            owner='ablate_directions', permanent=True, phase='forward')]
>>> remove_hooks(variant, kind="ablation")      # the variant computes as its reference again

Every hook trace registers (capture, ablation, activation fake-quantization, activation replacement, steering) goes
through :func:`register_hook`, which tags the hook; :func:`installed_hooks` reads the tags back from the
modules' own hook tables. So the list is never stale: a hook removed through its handle (a capture block
ending) is gone from it, and a model copied with ``copy.deepcopy`` lists the hooks it carries. Hooks that
trace did not install are never listed or removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

KINDS = ("capture", "ablation", "fake-quant", "replacement", "steering")
_TAG = "_trace_hook"
# The hook tables a forward (pre-)hook lives in; RemovableHandle.remove() deletes its id from the same ones.
_TABLES = {"pre": ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"),
           "forward": ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")}


@dataclass(frozen=True)
class _Tag:
    hook_name: str
    kind: str
    owner: str
    permanent: bool


@dataclass(frozen=True)
class HookRecord:
    """One hook trace installed: where (``module``, its qualified name; ``""`` is the model itself), on what
    (``hook_name``: a TransformerLens hook name, a Linear's name, or ``model:start``/``model:end``), what for
    (``kind``: capture, ablation, fake-quant, replacement, steering), by whom (``owner``), and whether it stays on the
    model (``permanent``) or is removed when its block ends."""

    module: str
    hook_name: str
    kind: str
    owner: str
    permanent: bool
    phase: str  # "pre" (sees the module's input) | "forward" (its output)
    hook_id: int = field(repr=False, compare=False)
    _holder: nn.Module = field(repr=False, compare=False)

    def remove(self) -> None:
        """Take the hook off its module (a no-op when it is already gone)."""
        for table in _TABLES[self.phase]:
            getattr(self._holder, table, {}).pop(self.hook_id, None)


def register_hook(module: nn.Module, fn: Callable[..., Any], *, hook_name: str, kind: str, owner: str,
                  permanent: bool = False, pre: bool = False, with_kwargs: bool = False) -> RemovableHandle:
    """Register ``fn`` as a forward hook (``pre=True``: forward pre-hook) on ``module``, recorded in the
    registry; returns torch's handle (``handle.remove()`` takes it off, and out of the registry)."""
    if kind not in KINDS:
        raise ValueError(f"unknown hook kind {kind!r}; one of {', '.join(KINDS)}")

    def hook(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    setattr(hook, _TAG, _Tag(hook_name, kind, owner, permanent))
    if pre:
        return module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
    return module.register_forward_hook(hook, with_kwargs=with_kwargs)


def _root(model: Any) -> nn.Module:
    """The torch module of a model: an ``nn.Module`` or a trace ``Loaded`` (its ``.model``)."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"expected a torch model or a trace Loaded, not a {type(model).__name__}")


def installed_hooks(model: Any) -> list[HookRecord]:
    """Every hook trace has installed on ``model`` (an ``nn.Module`` or a ``Loaded``), in install order."""
    records = []
    for name, module in _root(model).named_modules():
        for phase, tables in _TABLES.items():
            for hook_id, fn in getattr(module, tables[0], {}).items():
                tag = getattr(fn, _TAG, None)
                if isinstance(tag, _Tag):
                    records.append(HookRecord(name, tag.hook_name, tag.kind, tag.owner, tag.permanent, phase,
                                              hook_id, module))
    return sorted(records, key=lambda r: r.hook_id)


def remove_hooks(model: Any, kind: str | None = None, owner: str | None = None) -> list[HookRecord]:
    """Remove the hooks trace installed on ``model`` (only those of ``kind`` and/or ``owner`` when given);
    returns what was removed."""
    removed = [r for r in installed_hooks(model)
               if (kind is None or r.kind == kind) and (owner is None or r.owner == owner)]
    for r in removed:
        r.remove()
    return removed
