"""SAE codes and encoder readouts of activations, and the per-prompt activation a variant keeps.

An SAE's code of an activation ``x`` is ``f(x) = sigma(W_enc x + b_enc)`` with ``sigma`` its activation
function (ReLU, TopK, JumpReLU). The **encoder readout** of latent ``i`` is the code before any selection::

    readout_i(x) = max(0, (W_enc x + b_enc)_i)

It is continuous in ``x``, whereas a TopK or JumpReLU code can switch a latent off when a neighbour crosses
the selection boundary. The **readout CPFR** is the CPFR (:class:`~trace_lib.metrics.CPFR`) of the readouts
of the reference and the variant on the same tokens: it tells a changed detector (readout CPFR low) from a
code switched at the TopK boundary (code CPFR low, readout CPFR high). For a ReLU SAE the code is the readout
and the two CPFRs are equal (:func:`readout_differs` is then False).

**Prompt activation kept** of a feature over a set of prompts ``P``, with ``a_p`` the feature's per-prompt
activation (its code reduced over the prompt's fingerprint positions, the maximum by default)::

    kept = mean_{p in P} a_p(variant) / mean_{p in P} a_p(reference)

a ratio of means, NaN when the reference mean is not positive or ``P`` is empty.
"""

from __future__ import annotations

import math

import torch

__all__ = ["encode_codes", "encoder_readout", "prompt_activation_kept", "readout_differs"]


def encode_codes(sae, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The SAE's codes of activations ``x`` ``[n, d_in]`` -> ``[n, d_sae]`` float32, ``chunk`` rows at a time."""
    with torch.no_grad():
        return torch.cat([sae.encode(x[i:i + chunk]).float() for i in range(0, len(x), chunk)])


def encoder_readout(sae, x: torch.Tensor, ids: list[int], chunk: int = 4096) -> torch.Tensor:
    """Encoder readouts ``max(0, W_enc x + b_enc)`` of latents ``ids``: the SAE's code before TopK / threshold."""
    with torch.no_grad():
        return torch.cat([sae.encode_pre(x[i:i + chunk])[:, ids].relu().float() for i in range(0, len(x), chunk)])


def readout_differs(readout: float, cpfr: float) -> bool:
    """Whether a readout CPFR says more than the code CPFR beside it: for a ReLU SAE the code is the readout,
    so the two are equal and a summary prints one."""
    return not (math.isnan(readout) or math.isnan(cpfr)) and abs(readout - cpfr) > 1e-9


def prompt_activation_kept(feats_ref: torch.Tensor, feats_var: torch.Tensor, rows: torch.Tensor,
                           feature: int) -> float:
    """Mean per-prompt activation of ``feature`` over prompts ``rows``, variant / reference (formula above).

    ``feats_ref`` / ``feats_var``: per-prompt reduced codes ``[n_prompts, d_sae]`` of the same prompts."""
    ref_act = float(feats_ref[rows, feature].mean()) if len(rows) else float("nan")
    var_act = float(feats_var[rows, feature].mean()) if len(rows) else float("nan")
    return var_act / ref_act if ref_act > 0 else float("nan")
