"""Training checkpoints: the whole trainer state in one safetensors file, written atomically.

``checkpoint_dir/checkpoint.safetensors`` holds tensors ``param.<name>`` (weights, and ``log_threshold`` for
JumpReLU), ``opt.<i>.<key>`` (Adam's moments and step counts), ``tokens_since_fired`` and ``rng`` (the
resampling generator), with JSON metadata: ``format``, ``step``, ``tokens``, ``scale``, ``l1_log_scale``,
``refit``, ``param_groups``, ``last`` (the latest losses), plus what the caller adds (the training key, the
hook, the data fingerprint, ``done``). No pickle. The data pipeline is not stored: resuming replays it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from trace_lib.cache import atomic_write
from trace_lib.errors import SAEError
from trace_lib.optim_state import load_optimizer, optimizer_tensors

if TYPE_CHECKING:
    from trace_lib.sae.training.trainer import SAETrainer

CHECKPOINT_FILE = "checkpoint.safetensors"
CKPT_FORMAT = "trace-sae-checkpoint-1"


def save_checkpoint(t: SAETrainer, path: Path, meta: dict[str, str]) -> None:
    """Write ``t``'s state to ``path`` (atomically), with ``meta`` added to the metadata."""
    tensors: dict[str, torch.Tensor] = {f"param.{k}": v.detach().cpu().contiguous() for k, v in t.params.items()}
    opt_tensors, param_groups = optimizer_tensors(t.opt)
    tensors.update(opt_tensors)
    tensors["tokens_since_fired"] = t.tokens_since_fired.cpu().contiguous()
    tensors["rng"] = t.gen.get_state().contiguous()
    metadata = {
        **meta,
        "format": CKPT_FORMAT,
        "step": str(t.step),
        "tokens": str(t.tokens),
        "scale": json.dumps(t.scale),
        "l1_log_scale": json.dumps(t.l1.log_scale),
        "refit": json.dumps(t.refit),
        "param_groups": param_groups,
        "last": json.dumps(t.last),
    }
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def load_checkpoint(t: SAETrainer, path: Path) -> dict[str, str]:
    """Restore ``t``'s state from ``path``; return the file's metadata. SAEError if it cannot be read.

    Adam's kernel choice (fused / foreach) stays this run's, so either implementation resumes the other's.
    """
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise SAEError(f"cannot read checkpoint {path} ({e}): delete it to start over") from e
    with torch.no_grad():
        for k, p in t.params.items():
            p.copy_(tensors[f"param.{k}"].to(p.device))
    load_optimizer(t.opt, tensors, metadata["param_groups"])
    t.tokens_since_fired.copy_(tensors["tokens_since_fired"].to(t.device))
    t.gen.set_state(tensors["rng"])
    t.step = int(metadata["step"])
    t.tokens = int(metadata["tokens"])
    t.scale = float(json.loads(metadata["scale"]))
    t.l1.log_scale = float(json.loads(metadata.get("l1_log_scale", "0.0")))
    t.refit = json.loads(metadata.get("refit", "{}"))
    t.last = json.loads(metadata.get("last", "{}"))
    return metadata


def peek_metadata(path: Path) -> dict[str, str]:
    """The metadata of the checkpoint at ``path`` without loading its tensors; SAEError if it is not one."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise SAEError(f"cannot read checkpoint {path} ({e}): delete it to start over") from e
    if meta.get("format") != CKPT_FORMAT:
        raise SAEError(f"{path} is not a trace SAE checkpoint: delete it or pass another checkpoint_dir")
    return meta
