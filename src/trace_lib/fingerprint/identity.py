"""What identifies an SAE in fingerprint metadata and in the fingerprint and sweep cache keys."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def _sae_identity(sae) -> dict[str, Any]:
    """What identifies an SAE in fingerprint metadata and in the fingerprint and sweep cache keys: its hook and
    shape, :meth:`~trace_lib.sae.SAE.content_hash` (every weight, biases and thresholds included) as
    ``content_sha256``, and the sha256 of ``W_enc`` alone, which fingerprints written before the content
    hash carry and are checked by."""
    w = sae.W_enc.detach().to("cpu", torch.float32).contiguous()
    return {"hook_name": sae.cfg.hook_name, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
            "architecture": sae.cfg.architecture, "k": sae.cfg.k,
            "w_enc_sha256": hashlib.sha256(w.numpy().tobytes()).hexdigest(),
            "content_sha256": sae.content_hash()}
