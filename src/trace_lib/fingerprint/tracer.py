"""Feature discovery: :class:`CircuitTracer` reads prompts through a model and its SAEs
(:func:`reduce_prompt_acts`) and contrasts safety with baseline prompts into a
:class:`~trace_lib.fingerprint.fingerprint.SafetyFingerprint` (statistics in :mod:`trace_lib.fingerprint`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from trace_lib.errors import DatasetError, SAEError, TraceError
from trace_lib.fingerprint.fingerprint import SafetyFingerprint, _unit_or_zero
from trace_lib.fingerprint.groups import _check_groups, _unique_prompts
from trace_lib.fingerprint.identity import _sae_identity
from trace_lib.fingerprint.records import DirectionRecord, FeatureRecord
from trace_lib.metrics.stats import auroc, bh_adjust, contrast_statistics

__all__ = ["CircuitTracer", "reduce_prompt_acts"]

POSITIONS = ("post_instruction", "last", "all")
REDUCTIONS = ("max", "mean")
_CHUNK_ELEMENTS = 1 << 24  # SAE codes computed at once (64 MiB of float32)


def reduce_prompt_acts(acts, saes: Mapping[str, Any], positions: str = "post_instruction", reduce: str = "max",
                       residuals: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """From token activations (:class:`~trace_lib.capture.prompts.PromptActs`) to per-prompt SAE codes reduced
    over ``positions`` ([n_prompts, d_sae] per hook in ``saes``) and last-token residuals ([n_prompts, d])."""
    n = acts.n_prompts
    feats: dict[str, torch.Tensor] = {}
    resid: dict[str, torch.Tensor] = {}
    if residuals:
        last = acts.select("last")
        order = acts.prompt[last]
        for hook, a in acts.acts.items():
            r = torch.zeros(n, a.shape[1])
            r[order] = a[last].float()
            resid[hook] = r
    if saes:
        mask = acts.select(positions)
        idx = acts.prompt[mask]
        counts = torch.bincount(idx, minlength=n).clamp(min=1)
        for hook, sae in saes.items():
            x = acts.acts[hook][mask]
            d_sae = sae.cfg.d_sae
            out = torch.full((n, d_sae), float("-inf")) if reduce == "max" else torch.zeros(n, d_sae)
            step = max(1, _CHUNK_ELEMENTS // d_sae)
            with torch.no_grad():
                for i in range(0, x.shape[0], step):
                    codes = sae.encode(x[i:i + step]).detach().to("cpu", torch.float32)
                    if not torch.isfinite(codes).all():
                        raise TraceError(f"the SAE at {hook} gives NaN/Inf codes; check its weights "
                                         "(and the model's activations there)")
                    j = idx[i:i + step]
                    if reduce == "max":
                        out.scatter_reduce_(0, j[:, None].expand_as(codes), codes, reduce="amax")
                    else:
                        out.index_add_(0, j, codes)
            if reduce == "mean":
                out /= counts[:, None].float()
            else:
                out[torch.isinf(out)] = 0.0  # a prompt with no token at the selected positions
            feats[hook] = out
    return feats, resid


class CircuitTracer:
    """Map safety behaviours to SAE features and residual directions (see the module docstring).

    ``model`` is a trace :class:`~trace_lib.models.Loaded` or a Hugging Face ``nn.Module`` (then ``tokenizer``
    is required). ``sae_dict`` maps hook names (``"blocks.5.hook_resid_post"``) to SAEs; each SAE is checked
    against the model up front. ``positions`` (``post_instruction``, ``last`` or ``all``) and ``reduce``
    (``max`` or ``mean``) say how a prompt's token codes become one value per feature.
    """

    def __init__(self, model, sae_dict: Mapping[str, Any], tokenizer=None, positions: str = "post_instruction",
                 reduce: str = "max", batch_size: int = 16, max_length: int = 256):
        from trace_lib.models.load import Loaded, from_model
        from trace_lib.sae.io import check_sae_fits

        if isinstance(model, Loaded):
            loaded = model
            if tokenizer is not None and tokenizer is not loaded.tokenizer:
                loaded = dataclasses.replace(loaded, tokenizer=tokenizer)
        elif isinstance(model, nn.Module):
            if tokenizer is None:
                raise TraceError("a bare nn.Module needs its tokenizer: CircuitTracer(model, saes, tokenizer=tok)")
            loaded = from_model(model, tokenizer)
        else:
            raise TraceError(f"model must be a trace Loaded or a torch nn.Module, got {type(model).__name__}")
        if loaded.tokenizer is None:
            raise TraceError("the model has no tokenizer: pass tokenizer=... to CircuitTracer")
        if positions not in POSITIONS:
            raise TraceError(f"unknown positions {positions!r}: use one of {', '.join(POSITIONS)}")
        if reduce not in REDUCTIONS:
            raise TraceError(f"unknown reduce {reduce!r}: use one of {', '.join(REDUCTIONS)}")
        if not isinstance(sae_dict, Mapping) or not sae_dict:
            raise SAEError("sae_dict must map at least one hook name to an SAE")
        self.loaded = loaded
        self.saes: dict[str, Any] = {}
        for name, sae in sae_dict.items():
            hook = loaded.arch.resolve(name)
            if hook in self.saes:
                raise SAEError(f"two SAEs given for {hook}")
            if not hasattr(sae, "encode") or not hasattr(sae, "cfg"):
                raise SAEError(f"the SAE for {hook} is a {type(sae).__name__}, not a trace SAE")
            check_sae_fits(sae, hook, loaded.arch.d_model)
            self.saes[hook] = sae
        self.positions = positions
        self.reduce = reduce
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)

    @property
    def hooks(self) -> list[str]:
        return list(self.saes)

    # ---- reading prompts -----------------------------------------------------------------------------------
    def _read(self, prompts: Sequence[str], positions: str | None = None, reduce: str | None = None,
              features: bool = True, residuals: bool = True
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One forward pass over ``prompts``: per-prompt reduced SAE codes and last-token activations."""
        from trace_lib.capture.prompts import capture_prompts

        positions = positions or self.positions
        reduce = reduce or self.reduce
        if not prompts:
            raise DatasetError("no prompts given")
        acts = capture_prompts(self.loaded, list(prompts), self.hooks, batch_size=self.batch_size,
                               max_length=self.max_length, description="reading prompts")
        return reduce_prompt_acts(acts, self.saes if features else {}, positions, reduce, residuals=residuals)

    def prompt_features(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per hook ``[n_prompts, d_sae]``: each prompt's SAE codes reduced over the tracer's positions."""
        return self._read(prompts, residuals=False)[0]

    def prompt_residuals(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per hook ``[n_prompts, d]``: the activation at each prompt's last token (for directions)."""
        return self._read(prompts, features=False)[1]

    # ---- fitting -------------------------------------------------------------------------------------------
    def create_fingerprint(self, safety_prompts: Mapping[str, Sequence[str]],
                           baseline_prompts: Sequence[str] | Mapping[str, Sequence[str]],
                           capability_prompts: Mapping[str, Sequence[str]] | None = None, top_k: int = 20,
                           alpha: float = 0.05, min_auroc: float = 0.7, seed: int = 0) -> SafetyFingerprint:
        """Contrast each safety category (and capability category) with baseline prompts.

        ``baseline_prompts`` is one list shared by every category, or a dict with one list per safety
        category (e.g. each behaviour's own matched baselines); capability categories are contrasted with
        all the baseline prompts. Every prompt is read once, whatever the number of groups it belongs to.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise TraceError(f"top_k must be a positive integer, got {top_k!r}")
        if not 0 < float(alpha) < 1:
            raise TraceError(f"alpha must be between 0 and 1, got {alpha!r}")
        if not 0 <= float(min_auroc) <= 1:
            raise TraceError(f"min_auroc must be between 0 and 1, got {min_auroc!r}")
        torch.manual_seed(seed)  # nothing here is random today; seeded so that stays reproducible
        safety, baselines = _check_groups(safety_prompts, baseline_prompts, capability_prompts)
        capability = {str(c): list(p) for c, p in (capability_prompts or {}).items()}
        groups = {**safety, **{f"\0cap:{c}": p for c, p in capability.items()}}
        texts, index = _unique_prompts(list(groups.values()) + list(baselines.values()))
        feats, resid = self._read(texts)

        features: list[FeatureRecord] = []
        cap_features: list[FeatureRecord] = []
        directions: list[DirectionRecord] = []
        candidates: dict[str, dict[str, int]] = {}
        counts: dict[str, dict[str, int]] = {}
        for key, prompts in groups.items():
            is_cap = key.startswith("\0cap:")
            cat = key[len("\0cap:"):] if is_cap else key
            si = torch.tensor([index[t] for t in prompts])
            bi = torch.tensor([index[t] for t in baselines[key]])
            counts[cat] = {"safety": len(si), "baseline": len(bi)}
            recs, cand = _select(cat, self.hooks, feats, si, bi, top_k, alpha, min_auroc)
            candidates[cat] = cand
            (cap_features if is_cap else features).extend(recs)
            if is_cap:
                continue
            for hook in self.hooks:
                pos, neg = resid[hook][si].to(torch.float64), resid[hook][bi].to(torch.float64)
                d = pos.mean(0) - neg.mean(0)
                r_hat = _unit_or_zero(d)
                directions.append(DirectionRecord(cat, hook, d.tolist(), float(d.norm()),
                                                  auroc(pos @ r_hat, neg @ r_hat)))

        prompt_blob = json.dumps({"safety": safety, "baseline": {c: baselines[c] for c in safety},
                                  "capability": capability}, sort_keys=True, ensure_ascii=False)
        lo = self.loaded
        metadata = {
            "model": {"name": lo.name, "content_hash": lo.content_hash},
            "hooks": self.hooks,
            "saes": {h: _sae_identity(s) for h, s in self.saes.items()},
            "positions": self.positions,
            "reduce": self.reduce,
            "n_post_instruction_tokens": _n_post(lo.tokenizer),
            "max_length": self.max_length,
            "prompt_counts": counts,
            "candidates": candidates,
            "top_k": top_k,
            "alpha": float(alpha),
            "min_auroc": float(min_auroc),
            "seed": seed,
            "prompts_sha256": hashlib.sha256(prompt_blob.encode("utf-8")).hexdigest(),
            "statistics": "Mann-Whitney U (scipy, two-sided, method=auto), BH over features x hooks per "
                          "category, Cohen's d with pooled SD",
        }
        return SafetyFingerprint(list(safety), features, cap_features, directions, metadata, list(capability))


def _n_post(tokenizer) -> int:
    from trace_lib.capture.prompts import post_instruction_length

    try:
        return post_instruction_length(tokenizer)
    except Exception:  # noqa: BLE001 - metadata only
        return -1


def _select(cat: str, hooks: Sequence[str], feats: Mapping[str, torch.Tensor], si: torch.Tensor, bi: torch.Tensor,
            top_k: int, alpha: float, min_auroc: float) -> tuple[list[FeatureRecord], dict[str, int]]:
    """Statistics of every feature of every hook for one category, BH over all of them, then selection."""
    stats = [contrast_statistics(feats[h][si], feats[h][bi]) for h in hooks]
    p_adj_all = bh_adjust(np.concatenate([s["p_value"] for s in stats]))
    rows: list[tuple[float, float, int, int, FeatureRecord]] = []
    candidates: dict[str, int] = {}
    start = 0
    for hi, (hook, s) in enumerate(zip(hooks, stats, strict=True)):
        k = len(s["p_value"])
        p_adj = p_adj_all[start:start + k]
        start += k
        chosen = np.flatnonzero((p_adj < alpha) & (s["auroc"] >= min_auroc))
        candidates[hook] = len(chosen)
        for f in chosen.tolist():
            rec = FeatureRecord(cat, hook, int(f), float(s["auroc"][f]), float(s["effect_size"][f]),
                                float(s["u_statistic"][f]), float(s["p_value"][f]), float(p_adj[f]),
                                float(s["mean_safety"][f]), float(s["mean_baseline"][f]),
                                float(s["fire_rate_safety"][f]), float(s["fire_rate_baseline"][f]), cat)
            rows.append((-rec.auroc, -rec.effect_size, hi, rec.feature, rec))
    rows.sort(key=lambda r: r[:4])
    return [r[4] for r in rows[:top_k]], candidates
