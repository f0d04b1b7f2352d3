"""The components a gap is attributed to, and where each lives in the module tree.

A :class:`Component` names one activation of the forward pass, in TransformerLens terms:

``L{i}.resid_pre``   the residual stream entering block i; taken where it is made, as the output of block i-1
                     (``blocks.{i-1}.hook_resid_post``, the same tensor as ``blocks.{i}.hook_resid_pre``), so a
                     metric read after block i-1 sees the patch; ``L0.resid_pre`` is ``blocks.0.hook_resid_pre``
                     and ``L{n}.resid_pre`` with n = n_layers the final residual stream
``L{i}.attn``        what block i's attention adds to the residual stream (``blocks.{i}.hook_attn_out``)
``L{i}.mlp``         what block i's MLP adds (``blocks.{i}.hook_mlp_out``)
``L{i}.H{h}``        query head h's output before the output projection (``blocks.{i}.attn.hook_z``): the
                     input of ``o_proj`` split into ``n_heads`` slices of ``head_dim``. With grouped-query
                     attention the slices are the *query* heads (several share one key/value head).

Every site is a :class:`~trace_lib.models.arch.HookSite`, so patching and capture go through the same
``register_replacement`` plumbing as SAE splicing (:mod:`trace_lib.capture.splice`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from trace_lib.errors import AttributionError, HookError
from trace_lib.models.arch import HookSite

KINDS = ("resid", "attn", "mlp", "heads")
# model_type -> path of the attention output projection inside a block (its input is the heads' z)
_O_PROJ = {"gpt2": "attn.c_proj", "gpt_neox": "attention.dense"}
_O_PROJ_DEFAULT = "self_attn.o_proj"
_NAME = re.compile(r"^L(\d+)\.(resid_pre|attn|mlp|H(\d+))$")


@dataclass(frozen=True, order=True)
class Component:
    """One activation site: ``kind`` in resid_pre / attn / mlp / head, a layer, and a head index for heads."""

    layer: int
    kind: str
    head: int | None = None

    @property
    def name(self) -> str:
        return f"L{self.layer}.H{self.head}" if self.kind == "head" else f"L{self.layer}.{self.kind}"

    @classmethod
    def parse(cls, name: str) -> Component:
        m = _NAME.match(name.strip())
        if not m:
            raise AttributionError(f"unknown component {name!r}: use L<layer>.resid_pre, L<layer>.attn, "
                                   "L<layer>.mlp or L<layer>.H<head>")
        layer = int(m.group(1))
        if m.group(3) is not None:
            return cls(layer, "head", int(m.group(3)))
        return cls(layer, m.group(2))


def n_heads(loaded) -> int:
    cfg = loaded.model.config
    for key in ("num_attention_heads", "n_head"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    raise AttributionError(f"{loaded.name}: its config gives no number of attention heads")


def o_proj(loaded, layer: int) -> tuple[str, nn.Module]:
    """The attention output projection of block ``layer`` (path, module)."""
    arch = loaded.arch
    rel = _O_PROJ.get(arch.model_type, _O_PROJ_DEFAULT)
    path = f"{arch.layers_path}.{layer}.{rel}"
    try:
        return path, loaded.model.get_submodule(path)
    except AttributionError:
        raise
    except Exception:  # noqa: BLE001 - torch raises AttributeError with its own wording
        raise AttributionError(f"{arch.family} block {layer} has no attention output projection at {rel}; "
                               "per-head components are not supported for this model") from None


def check_component(loaded, comp: Component) -> None:
    n = loaded.n_layers
    top = n if comp.kind == "resid_pre" else n - 1
    if not 0 <= comp.layer <= top:
        raise AttributionError(f"component {comp.name} does not exist: this model has {n} blocks "
                               f"(layers 0..{n - 1}{', and L' + str(n) + '.resid_pre for the final residual' if comp.kind == 'resid_pre' else ''})")
    if comp.kind == "head" and not 0 <= (comp.head or 0) < n_heads(loaded):
        raise AttributionError(f"component {comp.name} does not exist: this model has {n_heads(loaded)} "
                               "attention heads per block")


def site(loaded, comp: Component) -> tuple[HookSite, slice | None]:
    """The hook site of ``comp`` and, for a head, the slice of the last dimension that is its output."""
    check_component(loaded, comp)
    arch = loaded.arch
    try:
        if comp.kind == "resid_pre":
            if comp.layer == 0:
                return arch.site("blocks.0.hook_resid_pre"), None
            return arch.site(f"blocks.{comp.layer - 1}.hook_resid_post"), None
        if comp.kind in ("attn", "mlp"):
            return arch.site(f"blocks.{comp.layer}.hook_{comp.kind}_out"), None
    except HookError as e:
        raise AttributionError(str(e)) from None
    path, mod = o_proj(loaded, comp.layer)
    # nn.Linear and torch.ao's quantized Linear: in_features; GPT-2 Conv1D: nx (its weight is [in, out])
    width = getattr(mod, "in_features", None) or getattr(mod, "nx", None) or mod.weight.shape[0]
    heads = n_heads(loaded)
    if width % heads:
        raise AttributionError(f"{path} has input width {width}, not a multiple of {heads} heads")
    d = width // heads
    return HookSite(f"blocks.{comp.layer}.attn.hook_z", mod, path, "in"), slice(comp.head * d, (comp.head + 1) * d)


def components(loaded, kinds: Sequence[str] | str = ("attn", "mlp"), layers: Sequence[int] | None = None
               ) -> list[Component]:
    """Every component of the given kinds (``resid``, ``attn``, ``mlp``, ``heads``), in forward order."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for k in kinds:
        if k not in KINDS:
            raise AttributionError(f"unknown component kind {k!r}: choose from {', '.join(KINDS)}")
    n = loaded.n_layers
    chosen = range(n + 1) if layers is None else layers
    out: list[Component] = []
    for i in chosen:
        if "resid" in kinds:
            out.append(Component(i, "resid_pre"))
        if i == n:
            continue
        if "attn" in kinds:
            out.append(Component(i, "attn"))
        if "heads" in kinds:
            out.extend(Component(i, "head", h) for h in range(n_heads(loaded)))
        if "mlp" in kinds:
            out.append(Component(i, "mlp"))
    for c in out:
        check_component(loaded, c)
    return out


def resolve(loaded, spec: Sequence[Component | str] | str | None, default: Sequence[str] = ("attn", "mlp")
            ) -> list[Component]:
    """Components from kinds (``"attn"``), names (``"L3.mlp"``) or :class:`Component` objects."""
    if spec is None:
        return components(loaded, default)
    items = [spec] if isinstance(spec, str | Component) else list(spec)
    if not items:
        raise AttributionError("no components given: name kinds (resid, attn, mlp, heads) or components (L3.mlp)")
    out: list[Component] = []
    for it in items:
        if isinstance(it, Component):
            check_component(loaded, it)
            out.append(it)
        elif it in KINDS:
            out.extend(components(loaded, [it]))
        else:
            c = Component.parse(it)
            check_component(loaded, c)
            out.append(c)
    return list(dict.fromkeys(out))
