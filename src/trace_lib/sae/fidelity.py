"""How well the measurement basis fits the prompts being audited: :class:`BasisFidelity` per hook.

An SAE is trained on generic text; an audit reads it on chat-formatted safety prompts. Its features mean what
they meant in training only where it still reconstructs those activations. Per hook, on the reference's
activations of the audited tokens (the same token set as the feature metrics), with SAELens's definitions
(:mod:`trace_lib.sae.quality`):

* ``explained_variance`` and ``l0`` (:func:`~trace_lib.sae.quality.evaluate_sae`);
* ``ce_loss_recovered`` (:func:`~trace_lib.sae.splice.ce_loss_with_sae`) on the audited prompts' own tokens
  (at most ``ce_prompts`` of them, evenly spaced; NaN where no model or prompt is given).

The basis is **flagged** at a hook when ``explained_variance < ev_min`` (0.8) or ``l0 > l0_factor * training_l0``
(2x; ``training_l0`` is the held-out L0 recorded at training, ``sae.cfg.metadata["quality"]["l0"]``, unknown for
SAEs that do not record it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from trace_lib.jsonutil import json_clean
from trace_lib.sae.quality import evaluate_sae

__all__ = ["EV_MIN", "L0_FACTOR", "BasisFidelity", "measure_fidelity", "fidelity_of_saes"]

EV_MIN = 0.8
L0_FACTOR = 2.0
_NAN = float("nan")


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return _NAN


@dataclass
class BasisFidelity:
    """One SAE's quality on the audited prompts, beside its training quality (module docstring)."""

    hook: str
    tokens: int
    explained_variance: float
    l0: float
    mse: float = _NAN
    training_explained_variance: float = _NAN
    training_l0: float = _NAN
    ce_loss_recovered: float = _NAN
    ce_loss_clean: float = _NAN
    ce_loss_sae: float = _NAN
    ce_prompts: int = 0
    ev_min: float = EV_MIN
    l0_factor: float = L0_FACTOR

    @property
    def warnings(self) -> list[str]:
        """One line per failed check, naming the hook (empty when the basis fits)."""
        out = []
        if not math.isnan(self.explained_variance) and self.explained_variance < self.ev_min:
            out.append(f"basis warning: the SAE at {self.hook} reconstructs the audited prompts poorly (EV "
                       f"{self.explained_variance:.2f} < {self.ev_min:.2f}); its features may not mean what they "
                       "meant in training")
        if not math.isnan(self.training_l0) and self.l0 > self.l0_factor * self.training_l0:
            out.append(f"basis warning: the SAE at {self.hook} fires {self.l0:.0f} latents per audited token, over "
                       f"{self.l0_factor:g}x its training L0 {self.training_l0:.0f}; its features may not mean what "
                       "they meant in training")
        return out

    @property
    def ok(self) -> bool:
        return not self.warnings

    def line(self) -> str:
        """``basis: SAE at <hook>: EV 0.91 (training 0.90), L0 55 (training 55), CE loss recovered 0.95``."""
        def f(x: float, spec: str) -> str:
            return "n/a" if math.isnan(x) else format(x, spec)

        return (f"basis: SAE at {self.hook} on the audited prompts ({self.tokens} tokens): EV "
                f"{f(self.explained_variance, '.3f')} (training {f(self.training_explained_variance, '.3f')}), L0 "
                f"{f(self.l0, '.1f')} (training {f(self.training_l0, '.1f')}), CE loss recovered "
                f"{f(self.ce_loss_recovered, '.3f')}" + (f" ({self.ce_prompts} prompts)" if self.ce_prompts else ""))

    def to_dict(self) -> dict:
        return json_clean({**asdict(self), "ok": self.ok, "warnings": self.warnings})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BasisFidelity:
        names = {f.name: f for f in fields(cls)}
        kw = {k: (_NAN if v is None else v) for k, v in d.items() if k in names}
        return cls(**kw)


def measure_fidelity(sae: Any, hook: str, acts: torch.Tensor, loaded: Any = None,
                     ce_batches: Sequence[dict[str, torch.Tensor]] = (), ce_prompts: int = 0,
                     clean: float | None = None) -> BasisFidelity:
    """:class:`BasisFidelity` of ``sae`` on activations ``acts`` ``[n_tokens, d_in]`` of ``hook`` (the audited
    tokens); CE loss recovered when ``loaded`` and ``ce_batches`` (the audited prompts, tokenised) are given."""
    q = evaluate_sae(sae, acts)
    trained = (sae.cfg.metadata or {}).get("quality") or {}
    out = BasisFidelity(hook=hook, tokens=int(q["tokens"]), explained_variance=float(q["explained_variance"]),
                        l0=float(q["l0"]), mse=float(q["mse"]),
                        training_explained_variance=_num(trained.get("explained_variance")),
                        training_l0=_num(trained.get("l0")))
    if loaded is not None and ce_batches:
        ce = _cached_ce(loaded, sae, hook, ce_batches, clean)
        out.ce_loss_recovered, out.ce_loss_clean, out.ce_loss_sae = (
            ce["ce_loss_recovered"], ce["ce_loss_clean"], ce["ce_loss_sae"])
        out.ce_prompts = ce_prompts
    return out


def fidelity_of_saes(saes: Mapping[str, Any], acts: Mapping[str, torch.Tensor], loaded: Any = None,
                     prompts: Sequence[str] = (), max_ce_prompts: int = 32, batch_size: int = 16
                     ) -> dict[str, BasisFidelity]:
    """:func:`measure_fidelity` for every hook of ``saes``; ``acts[hook]`` holds the audited tokens' reference
    activations. CE loss recovered is measured on at most ``max_ce_prompts`` of ``prompts`` (evenly spaced,
    chat-formatted as the audit reads them; 0 turns it off)."""
    batches: list[dict[str, torch.Tensor]] = []
    chosen: list[str] = []
    if loaded is not None and prompts and max_ce_prompts > 0:
        from trace_lib.capture.inputs import prompt_batches

        step = max(1, math.ceil(len(prompts) / max_ce_prompts))
        chosen = list(prompts)[::step][:max_ce_prompts]
        device = next(loaded.model.parameters()).device
        batches = [{k: v.to(device) for k, v in b.items()}
                   for b in prompt_batches(loaded.tokenizer, chosen, batch_size=batch_size)]
    clean = None
    if batches and len(saes) > 1:  # one clean pass shared by every hook
        from trace_lib.sae.splice import clean_ce_loss

        clean = clean_ce_loss(loaded, batches)
    return {h: measure_fidelity(sae, h, acts[h], loaded, batches, len(chosen), clean) for h, sae in saes.items()}


def _cached_ce(loaded: Any, sae: Any, hook: str, batches: Sequence[dict[str, torch.Tensor]],
               clean: float | None) -> dict[str, float]:
    """:func:`~trace_lib.sae.splice.ce_loss_with_sae`, cached on disk by model, SAE content, hook and tokens:
    the splices are reference-side work that a repeated audit of the same prompts need not redo."""
    from trace_lib.cache import atomic_write_json, cache_dir, stable_hash
    from trace_lib.capture.buffer import token_key
    from trace_lib.sae.splice import ce_loss_with_sae

    key = stable_hash({"model": loaded.content_hash, "sae": sae.content_hash(), "hook": hook,
                       "tokens": token_key(batches), "what": "ce loss recovered v1"})
    path = cache_dir("sae-ce") / f"{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    ce = ce_loss_with_sae(loaded, sae, hook, batches, clean=clean)
    atomic_write_json(path, ce)
    return ce
