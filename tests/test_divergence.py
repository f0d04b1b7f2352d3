"""trace_lib.metrics.divergence: the one KL(p || q), against a direct float64 sum and at each caller's dtype."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trace_lib.metrics.divergence import kl_divergence, kl_from_log_probs
from trace_lib.tracer.kv_cache import next_token_kl
from trace_lib.tracer.quant_error import logits_cosine_kl_top1


def _direct_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """sum_v p_v (log p_v - log q_v) per row, in float64 numpy: softmax by hand, no torch."""
    def log_softmax(x):
        m = x.max(axis=-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(1)
    p = 3 * torch.randn(4, 7, 50, generator=g, dtype=torch.float64)
    return p, p + 0.5 * torch.randn(4, 7, 50, generator=g, dtype=torch.float64)


def test_kl_matches_a_direct_float64_sum(logits):
    p, q = logits
    want = _direct_kl(p.numpy(), q.numpy())
    got = kl_divergence(p, q, dtype=torch.float64)
    assert got.shape == (4, 7) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)
    assert (got > 0).all()
    # float32 agrees to float32 precision and stays float32
    got32 = kl_divergence(p.float(), q.float(), dtype=torch.float32)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.double().numpy(), want, rtol=1e-4, atol=1e-5)
    # another axis: the vocabulary first
    np.testing.assert_allclose(kl_divergence(p.transpose(0, 2), q.transpose(0, 2), dim=0, dtype=torch.float64)
                               .transpose(0, 1).numpy(), want, rtol=1e-12, atol=1e-15)
    # the total over all positions
    assert float(kl_divergence(p, q, dtype=torch.float64, reduction="sum")) == pytest.approx(want.sum(), rel=1e-12)


def test_kl_of_identical_logits_is_exactly_zero_and_not_clamped(logits):
    p, _ = logits
    assert torch.equal(kl_divergence(p, p.clone(), dtype=torch.float64), torch.zeros(4, 7, dtype=torch.float64))
    lp = torch.log_softmax(p, -1)
    assert torch.equal(kl_from_log_probs(lp, lp), torch.zeros(4, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="reduction"):
        kl_from_log_probs(lp, lp, reduction="mean")


def test_kl_callers_give_the_direct_sum(logits):
    p, q = logits
    want = _direct_kl(p.numpy(), q.numpy())
    kl, same = next_token_kl(p[:, -1].float(), q[:, -1].float())
    assert kl == pytest.approx(_direct_kl(p[:, -1].float().numpy(), q[:, -1].float().numpy()).mean(), rel=1e-9)
    assert same == bool((p[:, -1].float().argmax(-1) == q[:, -1].float().argmax(-1)).all())
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[1, 5:] = False
    cos, kl, agree = logits_cosine_kl_top1(p, q, mask)
    assert kl == pytest.approx(want[mask.numpy()].mean(), rel=1e-12)
    r, v = p[mask], q[mask]
    assert cos == pytest.approx(float((r * v).sum() / (r.norm() * v.norm())), rel=1e-12)
    assert agree == pytest.approx(float((r.argmax(-1) == v.argmax(-1)).double().mean()))
    assert logits_cosine_kl_top1(p, p, None) == (1.0, 0.0, 1.0)
    assert not math.isnan(kl)
