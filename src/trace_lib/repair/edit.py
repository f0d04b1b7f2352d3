"""Weight orthogonalisation: remove a direction from everything that writes to the residual stream, for good.

Arditi et al. 2024 ("Refusal in Language Models Is Mediated by a Single Direction", arXiv:2406.11717, sec. 4.1)
edit every matrix ``W_out`` whose output is added to the residual stream (the token embeddings, positional
embeddings, each attention output projection, each MLP down projection, and their biases)::

    W_out' = (I - r r^T) W_out        b' = (I - r r^T) b        r = direction / ||direction||

so no component ever writes along ``r``. The residual stream is the sum of those writes, so this equals
directional ablation (:mod:`trace_lib.intervene.ablate`, ``x' = x - r r^T x``) of every write, and of the
residual stream at every point, with no hook: the edited model is an ordinary model.

:func:`restore_direction` is the inverse edit: it sets each writer's component along ``r`` to that of a
``source`` model's matching writer::

    W' = (I - r r^T) W + r r^T W_source

With ``source`` the model that was edited (the reference), ``restore_direction(remove_direction(ref, r), r, ref)``
gives back ``ref``'s weights exactly (up to float rounding). With a quantized variant and its reference, it
compensates the loss along ``r``: the variant keeps its own weights off ``r`` and gets the reference's exact
weights along ``r`` (a rank-one float term per matrix).

Which modules write, per family (``arch.model_type``): Llama / Mistral / Qwen2 / Qwen3 / Phi-3
``self_attn.o_proj``, ``mlp.down_proj``; GPT-2 ``attn.c_proj``, ``mlp.c_proj`` and ``wpe``; GPT-NeoX
``attention.dense``, ``mlp.dense_4h_to_h``. Gemma 2/3 are refused: their residual writes pass a post-norm
(``post_attention_layernorm`` / ``post_feedforward_layernorm``, ``(1 + w) * x / rms(x)``) after the output
projection, so no linear edit of ``o_proj`` / ``down_proj`` keeps the write orthogonal to ``r`` without changing
its length (the norm is not linear).

Tied embeddings: when the unembedding shares the embedding matrix (SmolLM2, GPT-2, Gemma), the unembedding
gets its own copy before the embedding is edited, so the logits' read-out is unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from trace_lib.cache import stable_hash
from trace_lib.errors import HookError, TraceError, UnsupportedArchitectureError
from trace_lib.intervene.ablate import directions_digest
from trace_lib.metrics.directions import unit
from trace_lib.models.arch import adapt
from trace_lib.models.load import Loaded

__all__ = ["EditError", "EditUnsupportedError", "Writer", "remove_direction", "residual_writers",
           "restore_direction"]


class EditError(TraceError):
    """A weight edit that cannot run: models that do not match, or weights stored in a quantized format."""


class EditUnsupportedError(UnsupportedArchitectureError, NotImplementedError):
    """A family whose residual writes no weight edit can orthogonalise (Gemma's post-norms)."""


_PRE_NORM = (("self_attn", "o_proj"), ("mlp", "down_proj"))
# model_type -> ((attention module, its output projection), (MLP module, its down projection))
_WRITERS: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "llama": _PRE_NORM, "mistral": _PRE_NORM, "qwen2": _PRE_NORM, "qwen3": _PRE_NORM, "phi3": _PRE_NORM,
    "gpt2": (("attn", "c_proj"), ("mlp", "c_proj")),
    "gpt_neox": (("attention", "dense"), ("mlp", "dense_4h_to_h")),
}
_POSITIONAL = {"gpt2": "wpe"}  # learned positional embeddings beside the blocks
_QUANTIZED = ("weights stored quantized cannot be edited; edit the reference before quantizing, or use a "
              "weight-only variant (its weights are de-quantized floats)")
_POST_NORM = {"gemma2": "Gemma 2", "gemma3": "Gemma 3", "gemma3_text": "Gemma 3"}


@dataclass(frozen=True)
class Writer:
    """One parameter whose output is added to the residual stream.

    ``role`` is ``embed``, ``pos_embed``, ``attn_out`` or ``mlp_out``; ``layer`` the block (None for
    embeddings); ``out_dim`` the axis of the parameter that indexes the residual stream (0 for a Linear's
    weight [out, in] and any bias, 1 for an Embedding [vocab, d] or a GPT-2 Conv1D [in, out])."""

    name: str
    role: str
    layer: int | None
    out_dim: int
    param: nn.Parameter

    @property
    def key(self) -> tuple[str, int | None, bool]:
        """What matches a writer across two models (a Conv1D and the Linear it became are the same writer)."""
        return self.role, self.layer, self.name.endswith("bias")


def _module_path(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _params(model: nn.Module, path: str, module: nn.Module, role: str, layer: int | None, d: int) -> list[Writer]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()  # noqa: N806
    out_dim = 1 if isinstance(module, nn.Embedding | Conv1D) else 0
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise EditError(f"{path} ({type(module).__module__}.{type(module).__name__}) holds no plain weight "
                        f"tensor: {_QUANTIZED}")
    if not isinstance(module, nn.Linear | nn.Embedding | Conv1D) or module.weight.shape[out_dim] != d:
        raise UnsupportedArchitectureError(f"{path} ({type(module).__name__}) is not a layer that writes "
                                           f"d_model={d} values; this model differs from its family")
    found = [Writer(f"{path}.weight", role, layer, out_dim, module.weight)]
    bias = getattr(module, "bias", None)
    if isinstance(bias, nn.Parameter):
        found.append(Writer(f"{path}.bias", role, layer, 0, bias))
    return found


def _layers(loaded: Loaded, layers: Sequence[int] | None) -> list[int]:
    n = loaded.n_layers
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise HookError(f"layer {i!r} is out of range: this {loaded.arch.family} model has {n} blocks "
                            f"(0..{n - 1})")
        if i % n not in out:
            out.append(i % n)
    return sorted(out)


def residual_writers(loaded: Loaded, layers: Sequence[int] | None = None,
                     embeddings: bool | None = None) -> list[Writer]:
    """The parameters that write to the residual stream in blocks ``layers`` (all when None), plus the token
    (and positional) embeddings when ``embeddings`` (default: only when ``layers`` is None)."""
    arch, model = loaded.arch, loaded.model
    if arch.model_type in _POST_NORM:
        raise EditUnsupportedError(
            f"{_POST_NORM[arch.model_type]} writes to the residual stream through post-norms after o_proj and "
            "down_proj, so orthogonalising weights does not remove the direction; use hook-based ablation "
            "(trace_lib.intervene.ablate_directions) instead")
    if arch.model_type not in _WRITERS:
        raise EditUnsupportedError(f"no weight-edit table for {arch.family} (model_type {arch.model_type})")
    blocks = _layers(loaded, layers)
    embeddings = layers is None if embeddings is None else bool(embeddings)
    d = arch.d_model
    found: list[Writer] = []
    if embeddings:
        found += _params(model, _module_path(model, arch.embed), arch.embed, "embed", None, d)
        if arch.model_type in _POSITIONAL:
            parent = arch.layers_path.rsplit(".", 1)[0]
            path = f"{parent}.{_POSITIONAL[arch.model_type]}"
            found += _params(model, path, model.get_submodule(path), "pos_embed", None, d)
    (attn, attn_proj), (mlp, mlp_proj) = _WRITERS[arch.model_type]
    for i in blocks:
        block_path = f"{arch.layers_path}.{i}"
        for role, (child, proj) in (("attn_out", (attn, attn_proj)), ("mlp_out", (mlp, mlp_proj))):
            path = f"{block_path}.{child}.{proj}"
            try:
                module = model.get_submodule(path)
            except AttributeError as e:
                raise UnsupportedArchitectureError(f"expected {path} in this {arch.family} model") from e
            found += _params(model, path, module, role, i, d)
    return found


def _check_plain(w: Writer) -> None:
    t = w.param.data
    if type(t) is not torch.Tensor or not t.is_floating_point():
        raise EditError(f"{w.name} is stored as {type(t).__name__} ({t.dtype}), not plain float weights: "
                        f"{_QUANTIZED}")


def _unit_direction(loaded: Loaded, direction: torch.Tensor) -> torch.Tensor:
    r = torch.as_tensor(direction).detach().to("cpu", torch.float64)
    if r.dim() == 2 and r.shape[0] == 1:
        r = r[0]
    if r.dim() != 1:
        raise HookError(f"the direction must be one vector [d_model], got shape {tuple(r.shape)}")
    if r.shape[0] != loaded.d_model:
        raise HookError(f"the direction has width {r.shape[0]} but {loaded.name} has d_model {loaded.d_model}")
    return unit(r)


def _along(t: torch.Tensor, r: torch.Tensor, out_dim: int) -> torch.Tensor:
    """``r^T W`` with the residual axis of ``t`` first: the coefficients of ``t``'s component along ``r``."""
    m = t.detach().to(torch.float64).movedim(out_dim, 0)
    return torch.tensordot(r.to(m.device), m, dims=([0], [0]))


def _set_component(w: Writer, r: torch.Tensor, coeff: torch.Tensor | None) -> None:
    """``W <- W - r (r^T W) + r coeff`` (coeff None: 0) on the residual axis, computed in float64."""
    p = w.param
    m = p.data.to(torch.float64).movedim(w.out_dim, 0)
    r_ = r.to(m.device).reshape(-1, *([1] * (m.dim() - 1)))
    delta = -_along(p.data, r, w.out_dim)
    if coeff is not None:
        delta = delta + coeff.to(m.device)
    m = m + r_ * delta.unsqueeze(0)
    with torch.no_grad():
        p.data.copy_(m.movedim(0, w.out_dim).to(p.dtype))


def _untie_unembedding(model: nn.Module, arch) -> bool:
    """Give a tied unembedding its own copy of the embedding matrix (before the embedding is edited)."""
    if arch.unembed.weight is not arch.embed.weight and arch.unembed.weight.data_ptr() != arch.embed.weight.data_ptr():
        return False
    arch.unembed.weight = nn.Parameter(arch.embed.weight.detach().clone(), requires_grad=False)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    return True


def _edited(loaded: Loaded, r: torch.Tensor, layers: Sequence[int] | None, embeddings: bool | None, op: str,
            source: Loaded | None) -> Loaded:
    probe = residual_writers(loaded, layers, embeddings)  # checks the family and the layers before copying
    for w in probe:
        _check_plain(w)
    coeffs = None
    if source is not None:
        if (source.arch.model_type, source.n_layers, source.d_model) != (
                loaded.arch.model_type, loaded.n_layers, loaded.d_model):
            raise EditError(f"{source.name} ({source.arch.family}, {source.n_layers} blocks, d_model "
                            f"{source.d_model}) does not match {loaded.name} ({loaded.arch.family}, "
                            f"{loaded.n_layers} blocks, d_model {loaded.d_model})")
        src = {w.key: w for w in residual_writers(source, layers, embeddings)}
        coeffs = {}
        for w in probe:
            s = src[w.key]
            _check_plain(s)
            c = _along(s.param.data, r, s.out_dim)
            if c.shape != _along(w.param.data, r, w.out_dim).shape:
                raise EditError(f"{s.name} in {source.name} has shape {tuple(s.param.shape)}, {w.name} in "
                                f"{loaded.name} {tuple(w.param.shape)}: not the same model")
            coeffs[w.key] = c
    model = copy.deepcopy(loaded.model)
    arch = adapt(model)
    copy_ = Loaded(model=model, tokenizer=loaded.tokenizer, arch=arch, content_hash="", name=loaded.name)
    writers = residual_writers(copy_, layers, embeddings)
    untied = any(w.role == "embed" for w in writers) and _untie_unembedding(model, arch)
    for w in writers:
        _set_component(w, r, None if coeffs is None else coeffs[w.key])
    blocks = [w.layer for w in writers if w.role == "mlp_out" and w.name.endswith("weight")]
    has_embed = any(w.layer is None for w in writers)
    where = "all" if layers is None and has_embed else "+".join(
        [",".join(f"L{i}" for i in blocks)] * bool(blocks) + ["emb"] * has_embed)
    label = f"{loaded.name}+{op}({where})"
    record = {"edit": op, "blocks": blocks, "embeddings": has_embed,
              "direction": directions_digest(r.float()), "parameters": [w.name for w in writers],
              "unembedding_untied": untied, **({"source": source.content_hash} if source is not None else {})}
    return Loaded(model=model, tokenizer=loaded.tokenizer, arch=adapt(model),
                  content_hash=stable_hash({"ref": loaded.content_hash, **{k: v for k, v in record.items()
                                                                          if k != "parameters"}}),
                  name=label, spec=f"{loaded.spec}+{op}({where})", source=loaded.source, quant=loaded.quant,
                  quant_info={**loaded.quant_info, "weight_edits": [*loaded.quant_info.get("weight_edits", []),
                                                                     record]})


def remove_direction(loaded: Loaded, direction: torch.Tensor, layers: Sequence[int] | None = None,
                     embeddings: bool | None = None) -> Loaded:
    """A copy of ``loaded`` whose residual writers are orthogonalised against ``direction`` ([d_model], any
    norm): ``W' = (I - r r^T) W`` (module docstring). ``layers`` restricts the edit to those blocks; the
    embeddings are edited when ``embeddings`` is true (default: only when ``layers`` is None)."""
    return _edited(loaded, _unit_direction(loaded, direction), layers, embeddings, "orth", None)


def restore_direction(loaded: Loaded, direction: torch.Tensor, source: Loaded, layers: Sequence[int] | None = None,
                      embeddings: bool | None = None) -> Loaded:
    """A copy of ``loaded`` whose residual writers' component along ``direction`` is ``source``'s:
    ``W' = (I - r r^T) W + r r^T W_source``. It inverts :func:`remove_direction` when ``source`` is the model
    that was edited, and compensates a variant's loss along ``r`` when ``source`` is its reference."""
    return _edited(loaded, _unit_direction(loaded, direction), layers, embeddings, "restore", source)
