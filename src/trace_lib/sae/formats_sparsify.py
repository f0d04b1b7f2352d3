"""The EleutherAI sparsify folder format (read only) and its hookpoint names.

**sparsify format** (EleutherAI ``sparsify``, one folder per hookpoint, e.g. ``layers.5``): ``cfg.json``
with ``d_in``, ``k``, ``num_latents`` (0 means ``d_in * expansion_factor``), ``activation`` ("topk"),
``normalize_decoder`` ...; ``sae.safetensors`` with ``encoder.weight [num_latents, d_in]``, ``encoder.bias``,
``W_dec [num_latents, d_in]``, ``b_dec``. It loads as a topk SAE with ``W_enc = encoder.weight.T`` and
``apply_b_dec_to_input=True`` (sparsify encodes ``x - b_dec``).

Hookpoint folder names map to TransformerLens hook names: ``layers.N`` (also ``model.layers.N``,
``gpt_neox.layers.N``, ``transformer.h.N``) -> ``blocks.N.hook_resid_post`` (the decoder layer's output is
the residual stream after block N), ``layers.N.mlp`` -> ``blocks.N.hook_mlp_out``, ``layers.N.self_attn`` /
``.attn`` / ``.attention`` -> ``blocks.N.hook_attn_out``; names already in ``blocks.N.hook_*`` form are kept
and anything else is used as is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from trace_lib.errors import SAEError
from trace_lib.sae.formats_common import (
    _SUPPORTED_TEXT,
    CFG_FILENAME,
    _as_int,
    _build,
    _check_weights,
    _read_weights,
    _require,
)
from trace_lib.sae.model import SAE, SAEConfig, dtype_to_str

SPARSIFY_WEIGHTS = "sae.safetensors"


# ---------------------------------------------------------------------------------------------- hook names
_HF_LAYER = r"(?:model\.|gpt_neox\.|transformer\.|base_model\.model\.model\.)?(?:layers|h)\.(\d+)"
_HOOK_PATTERNS = [
    (re.compile(rf"^{_HF_LAYER}$"), "blocks.{}.hook_resid_post"),
    (re.compile(rf"^{_HF_LAYER}\.mlp$"), "blocks.{}.hook_mlp_out"),
    (re.compile(rf"^{_HF_LAYER}\.(?:self_attn|attn|attention)$"), "blocks.{}.hook_attn_out"),
]


def hookpoint_to_hook_name(hookpoint: str) -> str:
    """Map a sparsify / Hugging Face module path to a TransformerLens hook name.

    ``layers.5`` -> ``blocks.5.hook_resid_post``; ``layers.5.mlp`` -> ``blocks.5.hook_mlp_out``;
    ``layers.5.self_attn`` -> ``blocks.5.hook_attn_out``; anything else is returned unchanged.
    """
    for pattern, template in _HOOK_PATTERNS:
        m = pattern.match(hookpoint)
        if m:
            return template.format(m.group(1))
    return hookpoint


def _load_sparsify(folder: Path, raw: dict[str, Any], hook_name: str | None) -> SAE:
    cfg_path = folder / CFG_FILENAME
    d_in = _as_int(_require(raw, "d_in", cfg_path, "the activation width"), "d_in", cfg_path)
    k = _as_int(_require(raw, "k", cfg_path, "number of active latents"), "k", cfg_path)
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise SAEError(
            f"unsupported sparsify activation '{activation}' in {cfg_path}: trace supports {_SUPPORTED_TEXT}"
        )
    if raw.get("transcode"):
        raise SAEError(f"{folder} is a sparsify transcoder, not an SAE: trace reads SAEs only")
    num_latents = raw.get("num_latents") or 0
    if not num_latents:
        ef = _require(raw, "expansion_factor", cfg_path, "needed when num_latents is 0")
        num_latents = d_in * _as_int(ef, "expansion_factor", cfg_path)
    d_sae = _as_int(num_latents, "num_latents", cfg_path)

    tensors = _read_weights(folder / SPARSIFY_WEIGHTS)
    if "W_skip" in tensors or raw.get("skip_connection"):
        raise SAEError(f"{folder} has a skip connection (W_skip), which trace does not support")
    shapes = {
        "encoder.weight": (d_sae, d_in),
        "encoder.bias": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
    }
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise SAEError(f"{folder} weights have unexpected tensors {', '.join(extra)} for a sparsify SAE")
    _check_weights(folder, tensors, shapes, f"d_in={d_in}, num_latents={d_sae}")
    dtype = dtype_to_str(tensors["encoder.weight"].dtype)
    hook = hook_name or hookpoint_to_hook_name(folder.name)
    meta = {
        "source_format": "sparsify",
        "hookpoint": folder.name,
        **{key: raw[key] for key in ("expansion_factor", "normalize_decoder", "multi_topk") if key in raw},
    }
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture="topk",
        k=k,
        hook_name=hook,
        apply_b_dec_to_input=True,
        dtype=dtype,
        model_name=raw.get("model_name"),
        metadata=meta,
    )
    mapped = {
        "W_enc": tensors["encoder.weight"].T.contiguous(),
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    return _build(cfg, mapped)
