"""The SAELens folder format (read and write).

**SAELens format** (one folder per SAE): ``cfg.json`` + ``sae_weights.safetensors`` with tensors ``W_enc
[d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]`` and, for JumpReLU,
``threshold [d_sae]``. trace writes the pre-6.0 flat ``cfg.json`` layout (``architecture``, ``d_in``,
``d_sae``, ``k``, ``dtype``, ``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
``hook_name``, ``hook_layer``, ``model_name`` at top level), which SAELens 6 still loads, plus a ``trace``
object with trace's own metadata. A ReLU SAE is written with SAELens's architecture name ``"standard"``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch

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
from trace_lib.sae.model import (
    SAE,
    SUPPORTED_NORMALIZATIONS,
    SAEConfig,
    dtype_from_str,
    dtype_to_str,
    hook_layer,
)

SAELENS_WEIGHTS = "sae_weights.safetensors"

# Architecture names as they appear in cfg.json -> trace's names.
_ARCH_NAMES = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}


def sae_cfg_dict(sae: SAE) -> dict[str, Any]:
    """The SAELens-style ``cfg.json`` content for ``sae``."""
    c = sae.cfg
    arch = "standard" if c.architecture == "relu" else c.architecture
    d: dict[str, Any] = {
        "architecture": arch,
        "d_in": c.d_in,
        "d_sae": c.d_sae,
    }
    if c.architecture == "topk":
        d["k"] = c.k
        d["activation_fn_kwargs"] = {"k": c.k}
    d.update(
        {
            "activation_fn": "relu",
            "dtype": c.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": c.apply_b_dec_to_input,
            "normalize_activations": c.normalize_activations,
            "hook_name": c.hook_name,
            "hook_layer": hook_layer(c.hook_name),
            "hook_head_index": None,
            "model_name": c.model_name,
        }
    )
    if c.norm_scaling_factor is not None:
        d["norm_scaling_factor"] = c.norm_scaling_factor
    d["trace"] = {"format_version": 1, "architecture": c.architecture, "metadata": c.metadata}
    return d


def sae_state_dict(sae: SAE) -> dict[str, torch.Tensor]:
    """The tensors written to ``sae_weights.safetensors`` (contiguous CPU copies, SAELens names)."""
    names = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if sae.cfg.architecture == "jumprelu" else [])
    return {n: getattr(sae, n).detach().to("cpu").contiguous() for n in names}



def _hook_from_raw(raw: dict[str, Any]) -> str | None:
    for key in ("hook_name", "hook_point"):
        if raw.get(key):
            return str(raw[key])
    for meta_key in ("metadata", "meta"):
        meta = raw.get(meta_key)
        if isinstance(meta, dict) and meta.get("hook_name"):
            return str(meta["hook_name"])
    return None


def _load_saelens(folder: Path, raw: dict[str, Any], hook_name: str | None) -> SAE:
    cfg_path = folder / CFG_FILENAME
    d_in = _as_int(_require(raw, "d_in", cfg_path, "the activation width"), "d_in", cfg_path)
    d_sae = _as_int(_require(raw, "d_sae", cfg_path, "the number of latents"), "d_sae", cfg_path)
    arch_raw = str(raw.get("architecture") or "standard")  # SAELens's default
    act_fn = raw.get("activation_fn", raw.get("activation_fn_str", "relu")) or "relu"
    if arch_raw not in _ARCH_NAMES:
        raise SAEError(f"unknown SAE architecture '{arch_raw}' in {cfg_path}: trace supports {_SUPPORTED_TEXT}")
    arch = _ARCH_NAMES[arch_raw]
    if arch == "relu" and act_fn == "topk":  # pre-6.0 SAELens topk: standard + activation_fn_str="topk"
        arch = "topk"
    elif act_fn not in ("relu", "topk"):
        raise SAEError(
            f"unsupported activation_fn '{act_fn}' in {cfg_path}: trace supports relu-based {_SUPPORTED_TEXT}"
        )
    k = None
    if arch == "topk":
        k = raw.get("k")
        if k is None and isinstance(raw.get("activation_fn_kwargs"), dict):
            k = raw["activation_fn_kwargs"].get("k")
        if k is None:
            raise SAEError(f"{cfg_path} is missing required field 'k' (number of active latents) for a topk SAE")
        k = _as_int(k, "k", cfg_path)
    hook = hook_name or _hook_from_raw(raw)
    if not hook:
        raise SAEError(
            f"{cfg_path} has no hook_name: add \"hook_name\" (e.g. \"blocks.5.hook_resid_post\") or pass hook_name="
        )
    trace_meta = raw.get("trace") if isinstance(raw.get("trace"), dict) else {}
    if raw.get("finetuning_scaling_factor"):
        raise SAEError(f"{cfg_path} uses finetuning_scaling_factor, which trace does not support")
    norm = raw.get("normalize_activations", "none")
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    norm = "none" if norm is None else str(norm)
    if norm not in SUPPORTED_NORMALIZATIONS:
        raise SAEError(
            f"unsupported normalize_activations '{norm}' in {cfg_path}: trace supports {', '.join(SUPPORTED_NORMALIZATIONS)}"
        )
    factor = raw.get("norm_scaling_factor")
    if norm == "expected_average_only_in" and factor is None:
        warnings.warn(
            f"{cfg_path}: normalize_activations is expected_average_only_in but no norm_scaling_factor is "
            "recorded; inputs are not scaled (as SAELens does at inference)",
            stacklevel=3,
        )
    if factor is not None and (not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0):
        raise SAEError(f"{cfg_path}: norm_scaling_factor must be a positive number, got {factor!r}")
    try:
        dtype = dtype_to_str(dtype_from_str(raw.get("dtype") or "float32"))
    except SAEError as e:
        raise SAEError(f"{cfg_path}: {e}") from e

    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture=arch,
        k=k,
        hook_name=hook,
        normalize_activations=norm,
        norm_scaling_factor=factor,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        dtype=dtype,
        model_name=raw.get("model_name") or _meta_get(raw, "model_name"),
        metadata=dict(trace_meta.get("metadata") or {}),
    )
    tensors = _read_weights(folder / SAELENS_WEIGHTS)
    if arch == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = torch.exp(tensors.pop("log_threshold"))
    sf = tensors.pop("scaling_factor", None)
    if sf is not None and not torch.allclose(sf.float(), torch.ones_like(sf.float())):
        raise SAEError(f"{folder} has a non-trivial scaling_factor tensor (finetuning scaling), which trace does not support")
    shapes: dict[str, tuple[int, ...]] = {
        "W_enc": (d_in, d_sae),
        "W_dec": (d_sae, d_in),
        "b_enc": (d_sae,),
        "b_dec": (d_in,),
    }
    if arch == "jumprelu":
        shapes["threshold"] = (d_sae,)
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise SAEError(
            f"{folder} weights have unexpected tensors {', '.join(extra)} for a {arch_raw} SAE: "
            f"trace supports {_SUPPORTED_TEXT} without extra parts"
        )
    _check_weights(folder, tensors, shapes, f"d_in={d_in}, d_sae={d_sae}")
    if raw.get("rescale_acts_by_decoder_norm"):
        # SAELens >= 6.x TopK option: encode multiplies pre-activations by ||W_dec,i|| and decode divides the
        # codes by it. Folding the norms into the encoder (SAELens fold_W_dec_norm) gives the same codes.
        if arch != "topk":
            raise SAEError(f"{cfg_path}: rescale_acts_by_decoder_norm is only supported for topk SAEs")
        norms = tensors["W_dec"].double().norm(dim=-1).clamp_min(1e-8)
        dt = tensors["W_dec"].dtype
        tensors["W_dec"] = (tensors["W_dec"].double() / norms[:, None]).to(dt)
        tensors["W_enc"] = (tensors["W_enc"].double() * norms[None, :]).to(dt)
        tensors["b_enc"] = (tensors["b_enc"].double() * norms).to(dt)
        cfg.metadata["rescale_acts_by_decoder_norm_folded"] = True
    return _build(cfg, tensors)


def _meta_get(raw: dict[str, Any], key: str) -> Any:
    for meta_key in ("metadata", "meta"):
        meta = raw.get(meta_key)
        if isinstance(meta, dict) and meta.get(key) is not None:
            return meta[key]
    return None
