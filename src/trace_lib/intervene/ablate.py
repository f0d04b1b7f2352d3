"""Directional ablation: remove the span of some directions from the activation at one hook point.

    x' = x - U (U^T x),   U = orthonormal basis of the given directions (QR)

Arditi et al. 2024 ablate the refusal direction this way to switch refusal off. trace uses it to build a
variant with a *known* injury (for example the decoder directions of the top refusal SAE features), so an
audit can be checked against a ground truth: those features must come out degraded.

The ablation hook stays on the variant's model; it is listed by
:func:`trace_lib.capture.registry.installed_hooks` (kind ``ablation``) and ``remove_hooks(variant,
kind="ablation")`` takes it off.
"""

from __future__ import annotations

import copy
import hashlib

import torch

from trace_lib.cache import stable_hash
from trace_lib.capture.splice import register_replacement
from trace_lib.errors import HookError
from trace_lib.models.arch import adapt
from trace_lib.models.load import Loaded


def directions_digest(directions: torch.Tensor) -> str:
    """sha256 of a direction tensor's shape and all of its float32 values: the ablation's cache identity.

    Every value counts, so two ablations that differ anywhere (also past the first 512 values) never share a
    ``content_hash`` (which keys the red team's generation cache)."""
    t = torch.as_tensor(directions).detach().to(device="cpu", dtype=torch.float32).contiguous()
    h = hashlib.sha256(repr(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def ablate_directions(loaded: Loaded, hook_name: str, directions: torch.Tensor, name: str | None = None) -> Loaded:
    """A copy of ``loaded`` whose activation at ``hook_name`` has ``directions`` ([k, d]) projected out."""
    directions = torch.as_tensor(directions, dtype=torch.float32)
    if directions.dim() == 1:
        directions = directions[None]
    if directions.shape[1] != loaded.d_model:
        raise HookError(f"directions have width {directions.shape[1]} but {hook_name} has {loaded.d_model}")
    q, _ = torch.linalg.qr(directions.T)  # [d, k] orthonormal
    model = copy.deepcopy(loaded.model)
    arch = adapt(model)

    def project_out(x: torch.Tensor) -> torch.Tensor:
        basis = q.to(device=x.device, dtype=x.dtype)
        return x - (x @ basis) @ basis.T

    register_replacement(arch.site(hook_name), project_out, kind="ablation", owner="ablate_directions",
                         permanent=True)
    label = name or f"ablate-{directions.shape[0]}dirs@{hook_name}"
    return Loaded(model=model, tokenizer=loaded.tokenizer, arch=arch,
                  content_hash=stable_hash({"ref": loaded.content_hash, "ablate": hook_name,
                                            "dirs": directions_digest(directions)}),
                  name=label, spec=f"{loaded.spec}@{label}", source=loaded.source, quant=None,
                  quant_info={"path": f"directional ablation of {directions.shape[0]} direction(s) at {hook_name}"})
