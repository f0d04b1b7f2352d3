"""Reading and writing SAEs: SAELens folders (what trace writes) and EleutherAI sparsify folders (read only).

**SAELens format** (one folder per SAE): ``cfg.json`` + ``sae_weights.safetensors`` with tensors ``W_enc
[d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]`` and, for JumpReLU,
``threshold [d_sae]``. trace writes the pre-6.0 flat ``cfg.json`` layout (``architecture``, ``d_in``,
``d_sae``, ``k``, ``dtype``, ``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
``hook_name``, ``hook_layer``, ``model_name`` at top level), which SAELens 6 still loads, plus a ``trace``
object with trace's own metadata. A ReLU SAE is written with SAELens's architecture name ``"standard"``.

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

Weights are read with safetensors only (never pickle).
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trace_lib.cache import atomic_dir, temp_prefix
from trace_lib.errors import SAEError
from trace_lib.jsonutil import to_jsonable
from trace_lib.sae.model import (
    SAE,
    SUPPORTED_NORMALIZATIONS,
    SAEConfig,
    dtype_from_str,
    dtype_to_str,
    hook_layer,
)

CFG_FILENAME = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"

# Architecture names as they appear in cfg.json -> trace's names.
_ARCH_NAMES = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}
_SUPPORTED_TEXT = "standard/relu, topk, jumprelu (SAELens) and topk (sparsify)"


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


# ---------------------------------------------------------------------------------------------- saving
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


def save_sae(sae: SAE, folder: str | Path, *, fold_scaling: bool = True) -> Path:
    """Write ``sae`` to ``folder`` in SAELens format (``cfg.json`` + ``sae_weights.safetensors``), atomically.

    The folder is built in a temporary sibling and renamed into place, so readers never see a half-written
    SAE. An existing SAE folder (or an empty folder) at ``folder`` is replaced; any other existing path
    raises SAEError. ``fold_scaling`` (default) folds an input scaling factor into the weights first (on a
    copy; ``sae`` is untouched) so that SAELens, which ignores a stored factor at inference, gives the same
    result; pass False to keep the factor as ``norm_scaling_factor`` in ``cfg.json`` (bit-exact in trace).
    """
    folder = Path(folder)
    if fold_scaling and sae.cfg.input_scale is not None:
        sae = copy.deepcopy(sae).fold_scaling_factor()
    tensors = sae_state_dict(sae)
    cfg = sae_cfg_dict(sae)
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise SAEError(f"refusing to save SAE: {name} contains NaN/Inf (training diverged); retrain with a lower lr")

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / SAELENS_WEIGHTS))
        (tmp / CFG_FILENAME).write_text(json.dumps(cfg, indent=2, default=to_jsonable) + "\n", encoding="utf-8")

    if not folder.exists():
        atomic_dir(folder, write)
        return folder
    if not folder.is_dir() or (any(folder.iterdir()) and not (folder / CFG_FILENAME).is_file()):
        raise SAEError(
            f"cannot save SAE to {folder}: it exists and is not an SAE folder (no cfg.json); pass a new or empty folder"
        )
    # Replace an existing SAE folder: build the new one beside it, then swap.
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(folder), suffix=".tmp", dir=folder.parent))
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    try:
        write(tmp)
        os.rename(folder, old)
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    return folder


# ---------------------------------------------------------------------------------------------- loading
def load_sae(
    folder: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    hook_name: str | None = None,
) -> SAE:
    """Load one SAE folder, SAELens or sparsify format (detected from the weights file name).

    ``dtype`` converts the weights (default: the dtype in cfg.json / the file). ``hook_name`` overrides the
    hook recorded in the folder (needed when a SAELens cfg.json has none). Raises SAEError with what to do
    for: a missing folder, no cfg.json, a cfg.json missing a required field, an unknown architecture or
    normalisation, weights whose shapes disagree with cfg.json, and NaN/Inf weights.
    """
    folder = Path(folder)
    if not folder.exists():
        raise SAEError(f"SAE folder {folder} does not exist: check the path (an SAE folder holds cfg.json + weights)")
    if not folder.is_dir():
        raise SAEError(f"{folder} is a file, not an SAE folder: pass the folder that holds cfg.json")
    cfg_path = folder / CFG_FILENAME
    if not cfg_path.is_file():
        subs = [p.name for p in _sae_subfolders(folder)]
        if subs:
            shown = ", ".join(subs[:5]) + (", ..." if len(subs) > 5 else "")
            raise SAEError(
                f"{folder} has no cfg.json but holds several SAEs ({shown}): use load_sae_dir() or point at one of them"
            )
        raise SAEError(
            f"no cfg.json in {folder}: an SAE folder needs cfg.json plus {SAELENS_WEIGHTS} (SAELens) "
            f"or {SPARSIFY_WEIGHTS} (sparsify)"
        )
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEError(f"{cfg_path} is not valid JSON ({e}): re-download or re-save the SAE") from e
    if not isinstance(raw, dict):
        raise SAEError(f"{cfg_path} must hold a JSON object, got {type(raw).__name__}")

    if (folder / SAELENS_WEIGHTS).is_file():
        sae = _load_saelens(folder, raw, hook_name)
    elif (folder / SPARSIFY_WEIGHTS).is_file():
        sae = _load_sparsify(folder, raw, hook_name)
    else:
        raise SAEError(
            f"no weights in {folder}: expected {SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_WEIGHTS} (sparsify) "
            "beside cfg.json"
        )
    if dtype is not None:
        sae.cfg.dtype = dtype_to_str(dtype_from_str(dtype))
        sae = sae.to(dtype=sae.cfg.torch_dtype)
    return sae.to(device=device)


def load_sae_dir(
    folder: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> dict[str, SAE]:
    """Load every SAE in ``folder``'s sub-folders (or ``folder`` itself if it is one), keyed by hook name.

    sparsify hookpoint folders (``layers.5``) are keyed by the mapped TransformerLens name
    (``blocks.5.hook_resid_post``, see :func:`hookpoint_to_hook_name`). Hidden sub-folders and sub-folders
    without cfg.json are skipped. SAEError if none is found or two SAEs claim the same hook.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if not folder.exists():
            raise SAEError(f"SAE folder {folder} does not exist: check the path")
        raise SAEError(f"{folder} is a file, not a folder of SAEs")
    if (folder / CFG_FILENAME).is_file():
        sae = load_sae(folder, device=device, dtype=dtype)
        return {sae.cfg.hook_name: sae}
    out: dict[str, SAE] = {}
    where: dict[str, str] = {}
    for sub in _sae_subfolders(folder):
        sae = load_sae(sub, device=device, dtype=dtype)
        name = sae.cfg.hook_name
        if name in out:
            raise SAEError(
                f"two SAEs in {folder} are for {name}: {where[name]} and {sub.name}; keep one of them"
            )
        out[name] = sae
        where[name] = sub.name
    if not out:
        raise SAEError(f"no SAEs in {folder}: expected sub-folders each holding cfg.json and weights")
    return out


def _sae_subfolders(folder: Path) -> list[Path]:
    subs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / CFG_FILENAME).is_file()]
    return sorted(subs, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def _require(raw: dict[str, Any], key: str, cfg_path: Path, what: str) -> Any:
    if key not in raw or raw[key] is None:
        raise SAEError(f"{cfg_path} is missing required field '{key}' ({what}): add it or re-save the SAE")
    return raw[key]


def _as_int(value: Any, key: str, cfg_path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise SAEError(f"{cfg_path}: '{key}' must be a positive integer, got {value!r}")
    return int(value)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise SAEError(f"cannot read {path} ({e}): the file is truncated or not safetensors; re-download it") from e


def _check_weights(
    folder: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], cfg_desc: str
) -> None:
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise SAEError(
            f"{folder} weights lack {', '.join(missing)} (have {', '.join(sorted(tensors)) or 'nothing'}): "
            "the file is incomplete or of another format"
        )
    for name, shape in shapes.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise SAEError(
                f"{folder}: {name} has shape {list(got)} but cfg.json ({cfg_desc}) implies {list(shape)}: "
                "cfg.json and the weights belong to different SAEs"
            )
    for name in shapes:
        t = tensors[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SAEError(
                f"{folder}: {name} contains NaN/Inf: the file is corrupt or training diverged; re-download or retrain"
            )


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


def _build(cfg: SAEConfig, tensors: dict[str, torch.Tensor]) -> SAE:
    sae = SAE(cfg)
    with torch.no_grad():
        for name, t in tensors.items():
            getattr(sae, name).copy_(t.to(cfg.torch_dtype))
    return sae


# ---------------------------------------------------------------------------------------------- fit checks
def check_sae_fits(sae: SAE, hook_name: str, d_model: int) -> None:
    """Raise SAEError unless ``sae`` can read ``hook_name`` of a model whose width there is ``d_model``.

    Checks that ``sae.cfg.d_in == d_model`` and, when the SAE records a hook, that it is the same hook
    (sparsify hookpoint names are mapped first, see :func:`hookpoint_to_hook_name`).
    """
    c = sae.cfg
    if c.d_in != d_model:
        trained = f" (trained on {c.model_name})" if c.model_name else ""
        raise SAEError(
            f"SAE for {hook_name} has d_in={c.d_in} but the model's width there is {d_model}: it was made for "
            f"another model{trained}; use an SAE trained on this model, or train one with trace_lib.sae.train_sae"
        )
    if c.hook_name and hookpoint_to_hook_name(c.hook_name) != hookpoint_to_hook_name(hook_name):
        raise SAEError(
            f"SAE was trained on {c.hook_name} but is applied at {hook_name}: load the SAE for {hook_name} "
            "(load_sae_dir() keys SAEs by hook name)"
        )
