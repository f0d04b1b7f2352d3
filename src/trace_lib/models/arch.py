"""Hook points per architecture: TransformerLens names mapped onto Hugging Face module trees.

Every supported model exposes the same names, whatever its family:

``blocks.{i}.hook_resid_pre``   the residual stream entering block i (pre-forward hook on the block)
``blocks.{i}.hook_attn_out``    what the attention sub-layer adds to the residual stream
``blocks.{i}.hook_resid_mid``   the residual stream between attention and MLP (sequential blocks only)
``blocks.{i}.hook_mlp_out``     what the MLP sub-layer adds to the residual stream
``blocks.{i}.hook_resid_post``  the residual stream leaving block i (forward hook on the block)
``ln_final.hook_normalized``    the output of the final norm, the input of the unembedding

As in TransformerLens, ``attn_out`` and ``mlp_out`` are what is *added* to the residual stream, so for
sequential blocks ``resid_mid = resid_pre + attn_out`` and ``resid_post = resid_mid + mlp_out``; for
Gemma 2/3 this means after the post-attention / post-feed-forward norms.

The adapter finds the decoder blocks, embedding, final norm and unembedding by inspecting the module
tree (the ``nn.ModuleList`` as long as the config's layer count, the input/output embeddings); a small
per-family table says which sub-module inside a block carries each sub-layer hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from trace_lib.errors import HookError, UnsupportedArchitectureError

BLOCK_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
FINAL_POINT = "ln_final.hook_normalized"


@dataclass(frozen=True)
class BlockLayout:
    """Which sub-module of a decoder block carries each sub-layer hook.

    Each entry is ``(child_name, kind)`` where kind is ``"out"`` (the module's output, first element if
    a tuple) or ``"in"`` (the module's first input). ``None`` means the point does not exist.
    """

    attn_out: tuple[str, str]
    mlp_out: tuple[str, str]
    resid_mid: tuple[str, str] | None
    parallel: bool = False


_PRE_NORM = BlockLayout(attn_out=("self_attn", "out"), mlp_out=("mlp", "out"),
                        resid_mid=("post_attention_layernorm", "in"))
_GEMMA = BlockLayout(attn_out=("post_attention_layernorm", "out"), mlp_out=("post_feedforward_layernorm", "out"),
                     resid_mid=("pre_feedforward_layernorm", "in"))

# model_type -> (family shown to users, block layout)
_FAMILIES: dict[str, tuple[str, BlockLayout]] = {
    "llama": ("Llama/SmolLM", _PRE_NORM),
    "mistral": ("Mistral", _PRE_NORM),
    "qwen2": ("Qwen2", _PRE_NORM),
    "qwen3": ("Qwen3", _PRE_NORM),
    "phi3": ("Phi-3", _PRE_NORM),
    "gemma2": ("Gemma 2", _GEMMA),
    "gemma3_text": ("Gemma 3", _GEMMA),
    "gemma3": ("Gemma 3", _GEMMA),
    "gpt2": ("GPT-2", BlockLayout(attn_out=("attn", "out"), mlp_out=("mlp", "out"), resid_mid=("ln_2", "in"))),
    "gpt_neox": ("GPT-NeoX/Pythia", BlockLayout(attn_out=("attention", "out"), mlp_out=("mlp", "out"),
                                                resid_mid=("post_attention_layernorm", "in"))),
}

_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f")


def supported_architectures() -> list[str]:
    """Model types trace has a hook adapter for (Hugging Face ``config.model_type`` values)."""
    return sorted(_FAMILIES)


@dataclass(frozen=True)
class HookSite:
    """Where one hook point lives: a module, and whether its input (pre-hook) or output is taken."""

    name: str
    module: nn.Module
    module_path: str
    kind: str  # "in" | "out"


@dataclass
class ArchAdapter:
    """Hook-point map of one loaded model."""

    model_type: str
    family: str
    n_layers: int
    d_model: int
    layers_path: str
    layers: nn.ModuleList
    embed: nn.Module
    final_norm: nn.Module
    final_norm_path: str
    unembed: nn.Module
    layout: BlockLayout
    _sites: dict[str, HookSite] = field(default_factory=dict, repr=False)

    def hook_names(self) -> list[str]:
        """Every hook name this model has, in forward order."""
        names = []
        for i in range(self.n_layers):
            for p in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
                if p == "resid_mid" and self.layout.resid_mid is None:
                    continue
                names.append(f"blocks.{i}.hook_{p}")
        names.append(FINAL_POINT)
        return names

    def resolve(self, point: str, layer: int | None = None) -> str:
        """Normalise ``("resid_post", 5)``, ``"blocks.5.hook_resid_post"`` or ``"ln_final"`` to a full name."""
        if point in (FINAL_POINT, "ln_final", "ln_final.hook_normalized", "final_norm"):
            return FINAL_POINT
        if point.startswith("blocks."):
            parts = point.split(".")
            if len(parts) != 3 or not parts[1].isdigit() or not parts[2].startswith("hook_"):
                raise HookError(f"malformed hook name {point!r}: use e.g. 'blocks.5.hook_resid_post'")
            layer_i, short = int(parts[1]), parts[2][len("hook_"):]
            if layer is not None and layer != layer_i:
                raise HookError(f"hook name {point!r} names layer {layer_i} but layer={layer} was given")
        else:
            short = point[len("hook_"):] if point.startswith("hook_") else point
            if layer is None:
                raise HookError(f"hook point {point!r} needs a layer: get_activations({point!r}, layer=5)")
            layer_i = layer
        if short not in BLOCK_POINTS:
            raise HookError(f"unknown hook point {point!r}: valid points are {', '.join(BLOCK_POINTS)} "
                            f"and {FINAL_POINT}")
        if not -self.n_layers <= layer_i < self.n_layers:
            raise HookError(f"layer {layer_i} is out of range: this {self.family} model has {self.n_layers} "
                            f"blocks (0..{self.n_layers - 1})")
        layer_i %= self.n_layers
        if short == "resid_mid" and self.layout.resid_mid is None:
            raise HookError(f"{self.family} blocks with parallel attention and MLP have no resid_mid; "
                            "use resid_pre, attn_out, mlp_out or resid_post")
        return f"blocks.{layer_i}.hook_{short}"

    def site(self, name: str) -> HookSite:
        """The module and hook kind behind a full hook name."""
        name = self.resolve(name)
        if name in self._sites:
            return self._sites[name]
        if name == FINAL_POINT:
            site = HookSite(name, self.final_norm, self.final_norm_path, "out")
        else:
            _, layer_s, hook = name.split(".")
            i, short = int(layer_s), hook[len("hook_"):]
            block = self.layers[i]
            block_path = f"{self.layers_path}.{i}"
            if short == "resid_pre":
                site = HookSite(name, block, block_path, "in")
            elif short == "resid_post":
                site = HookSite(name, block, block_path, "out")
            else:
                child, kind = getattr(self.layout, short)
                site = HookSite(name, _child(block, child, block_path), f"{block_path}.{child}", kind)
        self._sites[name] = site
        return site

    def layer_of(self, name: str) -> int | None:
        name = self.resolve(name)
        return None if name == FINAL_POINT else int(name.split(".")[1])


def _child(block: nn.Module, child: str, block_path: str) -> nn.Module:
    mod = getattr(block, child, None)
    if not isinstance(mod, nn.Module):
        raise UnsupportedArchitectureError(f"expected a sub-module {child!r} in {block_path} "
                                           f"({type(block).__name__}); this model's block differs from its family")
    return mod


def _find_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    candidates = [(name, mod) for name, mod in model.named_modules()
                  if isinstance(mod, nn.ModuleList) and len(mod) == n_layers]
    if not candidates:
        raise UnsupportedArchitectureError(f"found no list of {n_layers} decoder blocks in {type(model).__name__}")
    # The decoder blocks are the shallowest such list (vision towers etc. sit deeper).
    return min(candidates, key=lambda c: c[0].count("."))


def _find_final_norm(model: nn.Module, layers_path: str) -> tuple[str, nn.Module]:
    parent_path = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    parent = model.get_submodule(parent_path) if parent_path else model
    for name in _FINAL_NORM_NAMES:
        mod = getattr(parent, name, None)
        if isinstance(mod, nn.Module):
            return (f"{parent_path}.{name}" if parent_path else name), mod
    raise UnsupportedArchitectureError(f"found no final norm beside {layers_path} (looked for {_FINAL_NORM_NAMES})")


def _config_value(config, *names: str) -> int:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int):
            return v
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config is not config:
        return _config_value(text_config, *names)
    raise UnsupportedArchitectureError(f"config has none of {names}")


def adapt(model: nn.Module) -> ArchAdapter:
    """Build the hook-point adapter for a Hugging Face causal LM."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        families = sorted({f for f, _ in _FAMILIES.values()})
        raise UnsupportedArchitectureError(
            f"architecture {model_type or type(model).__name__!r} is not supported; trace supports "
            f"{', '.join(families)} (model_type {', '.join(supported_architectures())})")
    family, layout = _FAMILIES[model_type]
    if model_type == "gpt_neox" and getattr(config, "use_parallel_residual", True):
        layout = BlockLayout(attn_out=layout.attn_out, mlp_out=layout.mlp_out, resid_mid=None, parallel=True)
    n_layers = _config_value(config, "num_hidden_layers", "n_layer")
    d_model = _config_value(config, "hidden_size", "n_embd")
    layers_path, layers = _find_layers(model, n_layers)
    norm_path, final_norm = _find_final_norm(model, layers_path)
    embed = model.get_input_embeddings()
    unembed = model.get_output_embeddings()
    if unembed is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no output embedding (unembedding)")
    return ArchAdapter(model_type=model_type, family=family, n_layers=n_layers, d_model=d_model,
                       layers_path=layers_path, layers=layers, embed=embed, final_norm=final_norm,
                       final_norm_path=norm_path, unembed=unembed, layout=layout)


def first_tensor(x) -> torch.Tensor:
    """The hidden-state tensor in a module's output (or input): the tensor itself or its first element."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    raise HookError(f"cannot find a hidden-state tensor in a {type(x).__name__}")
