"""Replacing an activation inside the forward pass (for SAE splicing, ablations and patching).

Every replacement hook is recorded in :mod:`trace_lib.capture.registry` (kind ``replacement`` while a
:func:`replace_activation` block runs; a permanent one, e.g. an ablation, under its own kind)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

from trace_lib.capture.registry import register_hook
from trace_lib.models.arch import first_tensor


def _rebuild(original, new: torch.Tensor):
    if isinstance(original, torch.Tensor):
        return new
    if isinstance(original, tuple):
        return (new, *original[1:])
    if isinstance(original, list):
        return [new, *original[1:]]
    raise TypeError(f"cannot replace the hidden state inside a {type(original).__name__}")


def register_replacement(site, fn: Callable[[torch.Tensor], torch.Tensor], *, kind: str = "replacement",
                         owner: str = "replace_activation", permanent: bool = False):
    """Register a hook on ``site`` (a :class:`~trace_lib.models.arch.HookSite`) that replaces its activation
    with ``fn(activation)``, recorded in the hook registry under ``kind``/``owner``; returns the hook handle
    (``handle.remove()`` undoes it)."""
    tag = {"hook_name": site.name, "kind": kind, "owner": owner, "permanent": permanent}
    if site.kind == "in":
        def pre_hook(module, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = fn(kwargs["hidden_states"])
            return args, kwargs

        return register_hook(site.module, pre_hook, pre=True, with_kwargs=True, **tag)

    def hook(module, args, output):
        return _rebuild(output, fn(first_tensor(output)))

    return register_hook(site.module, hook, **tag)


@contextmanager
def replace_activation(loaded, hook_name: str, fn: Callable[[torch.Tensor], torch.Tensor], skip_first: bool = True):
    """Inside the block, the activation at ``hook_name`` is replaced by ``fn(activation)``.

    ``fn`` receives [batch, seq, d] in the model's dtype, on its device; what it returns is brought back to both
    (an SAE on the CPU may return its reconstruction there). With ``skip_first`` position 0 (the attention sink,
    never in an SAE's training data) keeps its original value.
    """
    site = loaded.arch.site(hook_name)

    def apply(t: torch.Tensor) -> torch.Tensor:
        new = fn(t).to(device=t.device, dtype=t.dtype)
        if skip_first:
            new = torch.cat([t[:, :1], new[:, 1:]], dim=1)
        return new

    handle = register_replacement(site, apply)
    try:
        yield
    finally:
        handle.remove()
