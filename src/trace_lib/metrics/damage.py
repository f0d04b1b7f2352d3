"""Readable damage: what happened to a feature in a variant, in words (docs/metrics.md, "Readable damage").

For one feature with non-negative codes ``a`` (reference) and ``b`` (variant) on the same tokens, and
``F_ref = {t : a_t > 0}`` the tokens it fires on in the reference::

    mass_ratio = sum_t b_t / sum_t a_t                      (all tokens: x times the reference's mass)
    kept       = sum_{t in F_ref} b_t / sum_{t in F_ref} a_t (its mass on the tokens it fires on)
    on_target  = sum_{t in F_ref} b_t / sum_t b_t           (share of the variant's mass on those tokens)
    jaccard    = |F_ref & F_q| / |F_ref | F_q|               (overlap of the firing sets; reported only)

and the label, first rule that holds (:class:`DamageRules` holds the thresholds):

1. ``over-fired``  if ``mass_ratio > over_fired_above`` (1.2);
2. ``moved``       if ``on_target < moved_share_below`` (0.5) and ``mass_ratio >= silenced_below`` (0.8):
                   similar mass, most of it on tokens where the reference was silent;
3. ``silenced``    if ``kept < silenced_below`` (0.8);
4. ``kept``        otherwise.

For a pure rescale ``b = c a`` the label is ``silenced`` exactly when ``c < 0.8`` and ``over-fired`` exactly when
``c > 1.2``, i.e. when CPFR ``= 1 - |1 - c|`` falls under the audit's 0.8 degradation threshold. A feature
inactive in the reference (``sum a = 0``) has no label (``""``) and NaN ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DamageRules", "FeatureDamage", "feature_damage", "damage_phrase"]

_NAN = float("nan")


@dataclass(frozen=True)
class DamageRules:
    """The thresholds of the labels (module docstring)."""

    silenced_below: float = 0.8
    over_fired_above: float = 1.2
    moved_share_below: float = 0.5
    activity_threshold: float = 0.0


@dataclass
class FeatureDamage:
    """Per-feature labels and ratios (lists aligned with the input's columns)."""

    label: list[str]
    mass_ratio: list[float]
    kept: list[float]
    on_target: list[float]
    jaccard: list[float]


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, _NAN))


def feature_damage(codes_ref: torch.Tensor, codes_var: torch.Tensor, rules: DamageRules = DamageRules()
                   ) -> FeatureDamage:
    """Labels and ratios of every column of ``codes_ref`` / ``codes_var`` ``[n_tokens, n_features]`` (the SAE codes
    of the same tokens in the reference and the variant)."""
    if codes_ref.shape != codes_var.shape or codes_ref.ndim != 2:
        raise ValueError(f"codes of the same tokens needed, got {tuple(codes_ref.shape)} and {tuple(codes_var.shape)}")
    a, b = codes_ref.double().cpu(), codes_var.double().cpu()
    fr, fq = a > rules.activity_threshold, b > rules.activity_threshold
    mass_ref, mass_var = a.sum(0), b.sum(0)
    on_ref = (b * fr).sum(0)
    mass_ratio = _ratio(mass_var, mass_ref)
    kept = _ratio(on_ref, (a * fr).sum(0))
    on_target = _ratio(on_ref, mass_var)
    jaccard = _ratio((fr & fq).sum(0).double(), (fr | fq).sum(0).double())
    labels = []
    for m, k, o in zip(mass_ratio.tolist(), kept.tolist(), on_target.tolist()):
        if m != m:  # NaN: inactive in the reference
            labels.append("")
        elif m > rules.over_fired_above:
            labels.append("over-fired")
        elif o == o and o < rules.moved_share_below and m >= rules.silenced_below:
            labels.append("moved")
        elif k < rules.silenced_below:
            labels.append("silenced")
        else:
            labels.append("kept")
    return FeatureDamage(labels, mass_ratio.tolist(), kept.tolist(), on_target.tolist(), jaccard.tolist())


def damage_phrase(label: str, mass_ratio: float, kept: float, on_target: float) -> str:
    """The detail that follows a label: ``kept 12% of its activation`` (silenced), ``3.0x its reference
    activation`` (over-fired), where the activation went (moved), or what changed (kept)."""
    if label == "silenced":
        return f"kept {100 * kept:.0f}% of its activation"
    if label == "over-fired":
        return f"{mass_ratio:.1f}x its reference activation"
    if label == "moved":
        return (f"{100 * (1 - on_target):.0f}% of its activation on tokens where the reference was silent, "
                f"{100 * kept:.0f}% kept on its own")
    if label == "kept":
        return f"{100 * kept:.0f}% of its activation on its tokens, in a changed pattern"
    return "no reference activation"
