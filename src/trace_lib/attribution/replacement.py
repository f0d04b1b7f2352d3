"""The local replacement model of one prompt: attention patterns and norm scales frozen, MLPs swapped out.

Ameisen et al. 2025 ("Circuit Tracing", §2.2) and circuit-tracer's ``replacement_model``: on a fixed prompt,
freeze every attention pattern and every normalisation denominator at the values of the real forward pass.
What remains between the token embeddings, the MLP outputs and any later read-out is linear (affine, with the
model's biases), so direct effects between nodes are exact gradients.

How trace freezes a Hugging Face Llama-style block (no TransformerLens), with the real pass's values cached:

* **norms** (each block's two RMSNorms and the final one): ``y = w * (x * s)`` with the real pass's
  ``s = rsqrt(mean(x^2) + eps)`` per position, a constant;
* **attention patterns**: the outputs of ``q_proj`` and ``k_proj`` are replaced by the real pass's (so RoPE,
  q/k norms and the softmax see constants); values and the output projection stay live and linear;
* **MLPs**: the output is ``skip(x) + N_l`` where ``skip`` is the transcoder's linear skip (zero without one)
  and ``N_l`` a tensor the caller gives: the rest of the real MLP output (a leaf to differentiate through, in
  :mod:`trace_lib.attribution.graph`), or constants (the bias pass).

With ``N_l`` the real ``mlp_out - skip(x)`` the frozen forward reproduces the real one. Only the families in
:data:`FAMILIES` (pre-norm blocks with ``input_layernorm``, ``post_attention_layernorm``, RMSNorm, separate
``q_proj``/``k_proj``) are supported; others are refused with :class:`~trace_lib.errors.UnsupportedArchitectureError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from trace_lib.attribution.transcoder import TranscoderSet
from trace_lib.capture.registry import register_hook
from trace_lib.errors import UnsupportedArchitectureError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_OWNER = "attribution graph"


def check_family(loaded) -> None:
    """UnsupportedArchitectureError unless ``loaded`` is a Llama-style model the replacement model handles."""
    arch = loaded.arch
    if arch.model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"attribution graphs support Llama-style models (model_type {', '.join(FAMILIES)}; SmolLM2 is Llama), "
            f"not {arch.family} ({arch.model_type}): its norms and attention are frozen differently")
    block = arch.layers[0]
    for path in ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn.q_proj", "self_attn.k_proj"):
        try:
            block.get_submodule(path)
        except AttributeError as e:
            raise UnsupportedArchitectureError(f"{loaded.name}'s blocks have no {path}; they differ from the "
                                               f"{arch.family} layout attribution graphs need") from e
    for norm in (block.input_layernorm, arch.final_norm):
        if not hasattr(norm, "variance_epsilon") or getattr(norm, "weight", None) is None:
            raise UnsupportedArchitectureError(f"{type(norm).__name__} is not an RMSNorm with a weight; "
                                               "attribution graphs freeze RMSNorm scales only")


def _norms(loaded) -> list[tuple[str, nn.Module]]:
    out = []
    for i, block in enumerate(loaded.arch.layers):
        out += [(f"{i}.ln1", block.input_layernorm), (f"{i}.ln2", block.post_attention_layernorm)]
    return out + [("final", loaded.arch.final_norm)]


def _rms_scale(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``rsqrt(mean(x^2) + eps)`` in float32, exactly as the Hugging Face RMSNorms compute it."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def _frozen_norm(norm: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return norm.weight * (x.float() * scale).to(x.dtype)


@dataclass
class RealPass:
    """What the frozen passes need from the real forward pass on one prompt ([n_pos, ...], batch dim dropped)."""

    ids: torch.Tensor  # [n_pos]
    embeds: torch.Tensor  # [n_pos, d] the token embeddings (the embedding layer's output)
    mlp_in: list[torch.Tensor]  # per layer [n_pos, d]: the MLP's input (post-attention norm output)
    mlp_out: list[torch.Tensor]  # per layer [n_pos, d]
    final: torch.Tensor  # [n_pos, d] the final norm's output (the unembedding's input)
    logits: torch.Tensor  # [n_pos, vocab]
    scales: dict[str, torch.Tensor]  # norm name -> [n_pos, 1]
    q: list[torch.Tensor]  # per layer, q_proj output [n_pos, h*d_head]
    k: list[torch.Tensor]


@contextmanager
def _params_frozen(model: nn.Module) -> Iterator[None]:
    """No parameter gradients inside the block: only the node tensors are differentiated."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def real_pass(loaded, ids: torch.Tensor) -> RealPass:
    """One ordinary forward pass on ``ids`` [n_pos], recording the activations the frozen passes reuse."""
    arch, model = loaded.arch, loaded.model
    store: dict[str, torch.Tensor] = {}
    handles = []
    tag = {"kind": "capture", "owner": _OWNER}

    def keep(name: str, take_input: bool = False, fn: Callable | None = None):
        def hook(module, args, output):
            t = args[0] if take_input else output
            t = t[0] if isinstance(t, tuple) else t
            store[name] = (fn(module, t) if fn else t).detach()[0]
        return hook

    handles.append(register_hook(arch.embed, keep("embeds"), hook_name="embed", **tag))
    for i, block in enumerate(arch.layers):
        mlp = block.mlp
        handles.append(register_hook(mlp, keep(f"in{i}", True), hook_name=f"blocks.{i}.mlp.hook_in", **tag))
        handles.append(register_hook(mlp, keep(f"out{i}"), hook_name=f"blocks.{i}.hook_mlp_out", **tag))
        handles.append(register_hook(block.self_attn.q_proj, keep(f"q{i}"), hook_name=f"blocks.{i}.q_proj", **tag))
        handles.append(register_hook(block.self_attn.k_proj, keep(f"k{i}"), hook_name=f"blocks.{i}.k_proj", **tag))
    for name, norm in _norms(loaded):
        handles.append(register_hook(norm, keep(f"scale.{name}", True, _rms_scale), hook_name=f"norm.{name}", **tag))
    handles.append(register_hook(arch.final_norm, keep("final"), hook_name="ln_final.hook_normalized", **tag))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids.view(1, -1).to(arch.embed.weight.device), use_cache=False).logits[0].detach()
    finally:
        for h in handles:
            h.remove()
    n = loaded.n_layers
    return RealPass(ids=ids, embeds=store["embeds"], mlp_in=[store[f"in{i}"] for i in range(n)],
                    mlp_out=[store[f"out{i}"] for i in range(n)], final=store["final"], logits=logits,
                    scales={k[len("scale."):]: v for k, v in store.items() if k.startswith("scale.")},
                    q=[store[f"q{i}"] for i in range(n)], k=[store[f"k{i}"] for i in range(n)])


@dataclass
class FrozenRun:
    """Tensors recorded in a frozen pass, still attached to its autograd graph: ``mlp_in[l]`` and ``final``,
    [batch, n_pos, d]."""

    mlp_in: list[torch.Tensor]
    final: torch.Tensor | None = None


MlpFn = Callable[[int, torch.Tensor], torch.Tensor]


@contextmanager
def frozen(loaded, rp: RealPass, mlp_fn: MlpFn) -> Iterator[FrozenRun]:
    """Inside the block, forward passes of ``loaded.model`` (any batch size, the prompt's length) run the local
    replacement model: frozen norms and attention patterns from ``rp``, and block l's MLP output replaced by
    ``mlp_fn(l, x)`` with x the MLP's (live) input. Yields the :class:`FrozenRun` the next pass fills."""
    arch = loaded.arch
    run = FrozenRun(mlp_in=[None] * loaded.n_layers)  # type: ignore[list-item]
    handles = []
    tag = {"kind": "replacement", "owner": _OWNER}

    def norm_hook(name: str):
        scale = rp.scales[name]

        def hook(module, args, output):
            return _frozen_norm(module, args[0], scale)
        return hook

    def const_hook(value: torch.Tensor):
        def hook(module, args, output):
            return value.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return hook

    def mlp_hook(layer: int):
        def hook(module, args, output):
            x = args[0]
            run.mlp_in[layer] = x
            return mlp_fn(layer, x).to(output.dtype)
        return hook

    def final_hook(module, args, output):
        run.final = output
        return output

    for name, norm in _norms(loaded):
        handles.append(register_hook(norm, norm_hook(name), hook_name=f"norm.{name}", **tag))
    handles.append(register_hook(arch.final_norm, final_hook, hook_name="ln_final.hook_normalized", **tag))
    for i, block in enumerate(arch.layers):
        handles.append(register_hook(block.self_attn.q_proj, const_hook(rp.q[i]), hook_name=f"blocks.{i}.q_proj", **tag))
        handles.append(register_hook(block.self_attn.k_proj, const_hook(rp.k[i]), hook_name=f"blocks.{i}.k_proj", **tag))
        handles.append(register_hook(block.mlp, mlp_hook(i), hook_name=f"blocks.{i}.hook_mlp_out", **tag))
    try:
        with _params_frozen(loaded.model):
            yield run
    finally:
        for h in handles:
            h.remove()


def run_embeds(loaded, embeds: torch.Tensor) -> torch.Tensor:
    """The model on ``inputs_embeds`` [batch, n_pos, d]: its logits [batch, n_pos, vocab]."""
    return loaded.model(inputs_embeds=embeds, use_cache=False).logits


def replacement_logits(loaded, transcoders: TranscoderSet, ids: torch.Tensor,
                       errors: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Logits [n_pos, vocab] of the model with every MLP replaced by its transcoder (attention and norms live,
    not frozen), plus ``errors[l]`` [n_pos, d] added to layer l's output when given. With the error terms of
    :func:`reconstruction_errors` this reproduces the real forward pass (the replacement model is exact)."""
    check_family(loaded)
    transcoders.check_fits(loaded)
    handles = []

    def mlp_hook(layer: int):
        tc = transcoders[layer]

        def hook(module, args, output):
            y = tc(args[0].float())
            if errors is not None:
                y = y + errors[layer].to(y.device)
            return y.to(output.dtype)
        return hook

    for i, block in enumerate(loaded.arch.layers):
        handles.append(register_hook(block.mlp, mlp_hook(i), hook_name=f"blocks.{i}.hook_mlp_out",
                                     kind="replacement", owner=_OWNER))
    try:
        with torch.no_grad():
            return loaded.model(input_ids=ids.view(1, -1).to(loaded.arch.embed.weight.device), use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()


def reconstruction_errors(rp: RealPass, transcoders: TranscoderSet) -> list[torch.Tensor]:
    """Per layer ``mlp_out - transcoder(mlp_in)`` [n_pos, d] on the real pass: what the transcoders miss."""
    with torch.no_grad():
        return [rp.mlp_out[i].float() - tc(rp.mlp_in[i].float()) for i, tc in enumerate(transcoders)]
