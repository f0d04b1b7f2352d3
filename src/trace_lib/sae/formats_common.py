"""What the SAELens and sparsify folder readers share: the ``cfg.json`` name, required-field and integer checks,
reading safetensors weights (never pickle), checking their names, shapes and finiteness, building the SAE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from trace_lib.errors import SAEError
from trace_lib.sae.model import SAE, SAEConfig

CFG_FILENAME = "cfg.json"
_SUPPORTED_TEXT = "standard/relu, topk, jumprelu (SAELens) and topk (sparsify)"


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



def _build(cfg: SAEConfig, tensors: dict[str, torch.Tensor]) -> SAE:
    sae = SAE(cfg)
    with torch.no_grad():
        for name, t in tensors.items():
            getattr(sae, name).copy_(t.to(cfg.torch_dtype))
    return sae
