"""Readable damage (metrics/damage.py) on planted codes: each label, its ratios by hand, and the summary words."""

from __future__ import annotations

import pytest
import torch

from trace_lib.metrics import CPFR
from trace_lib.metrics.damage import DamageRules, damage_phrase, feature_damage


def _planted() -> tuple[torch.Tensor, torch.Tensor]:
    """Four features over 8 tokens: identical, scaled by 0.1, scaled by 3, shifted to the other tokens."""
    torch.manual_seed(0)
    a = torch.zeros(8, 4)
    a[:4] = torch.rand(4, 4) + 0.5  # every feature fires on tokens 0-3 in the reference
    b = a.clone()
    b[:, 1] *= 0.1
    b[:, 2] *= 3.0
    b[:, 3] = torch.roll(a[:, 3], 4)  # the same values on tokens 4-7
    return a, b


def test_planted_labels_and_ratios():
    a, b = _planted()
    d = feature_damage(a, b)
    assert d.label == ["kept", "silenced", "over-fired", "moved"]
    assert d.kept == pytest.approx([1.0, 0.1, 3.0, 0.0])
    assert d.mass_ratio == pytest.approx([1.0, 0.1, 3.0, 1.0])
    assert d.on_target == pytest.approx([1.0, 1.0, 1.0, 0.0])
    assert d.jaccard == pytest.approx([1.0, 1.0, 1.0, 0.0])
    assert damage_phrase("silenced", d.mass_ratio[1], d.kept[1], d.on_target[1]) == "kept 10% of its activation"
    assert damage_phrase("over-fired", d.mass_ratio[2], d.kept[2], d.on_target[2]) == "3.0x its reference activation"
    # the labels sit beside the CPFR: 1 for identical, 0.1 and -1 for the rescales (1 - |1 - c|)
    cpfr = CPFR().compute(a, b).per_feature
    assert cpfr[:3].tolist() == pytest.approx([1.0, 0.1, -1.0], abs=1e-6)


def test_rescale_labels_agree_with_the_cpfr_threshold():
    """For b = c a the label is silenced exactly when c < 0.8 and over-fired exactly when c > 1.2 (CPFR < 0.8)."""
    a = torch.rand(20, 1) + 0.1
    for c, want in [(0.79, "silenced"), (0.81, "kept"), (1.19, "kept"), (1.21, "over-fired"), (0.0, "silenced")]:
        assert feature_damage(a, a * c).label == [want], c


def test_inactive_feature_and_partial_move():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.4, 0.0], [0.0, 1.0], [0.6, 0.0], [1.0, 0.0]])
    d = feature_damage(a, b)
    assert d.label == ["moved", ""]  # mass 2.0 -> 2.0, 0.4 of it on the reference's tokens (share 0.2 < 0.5)
    assert d.on_target[0] == pytest.approx(0.2) and d.kept[0] == pytest.approx(0.2)
    assert d.jaccard[0] == pytest.approx(1 / 4)  # {0, 1} vs {0, 2, 3}
    assert d.mass_ratio[1] != d.mass_ratio[1]  # NaN
    # stricter rules change the verdict, as documented
    assert feature_damage(a, b, DamageRules(moved_share_below=0.1)).label[0] == "silenced"
