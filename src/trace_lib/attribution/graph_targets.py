"""What an attribution graph explains: its logit nodes.

As circuit-tracer's ``attribution/targets.py`` (Ameisen et al. 2025, §2.3), a logit node is a direction ``u`` in
the unembedding's input space (the final norm's output h at the last position) and its value is ``u . h + beta``:

* a token t: the **demeaned** logit ``logit_t - mean_v logit_v``, i.e. ``u = W_U[t] - mean_v W_U[v]`` and
  ``beta = b_U[t] - mean_v b_U[v]`` (0 without an unembedding bias); its weight is ``softmax(logits)_t``;
* a custom target (:class:`CustomTarget`): any ``u``, e.g. a logit difference ``W_U[a] - W_U[b]``
  (:func:`logit_difference`), with a weight the caller chooses. circuit-tracer gives such a node the virtual
  vocabulary index ``vocab_size + i`` (i its position in the target list); so does trace.

With no targets given, the *salient* logits are taken: the most probable tokens until their cumulative
probability reaches ``desired_logit_prob`` (0.95), at most ``max_n_logits`` (10).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trace_lib.errors import GraphError


@dataclass(frozen=True)
class LogitTarget:
    """One logit node: its label, vocabulary index (``>= vocab_size`` for a custom target) and weight."""

    label: str
    vocab_idx: int
    weight: float


@dataclass
class CustomTarget:
    """A logit node along any direction ``vector`` [d_model] of the final norm's output, plus ``bias``."""

    label: str
    weight: float
    vector: torch.Tensor
    bias: float = 0.0


@dataclass
class Targets:
    """The resolved logit nodes: ``vectors`` [k, d_model], ``biases`` [k], ``weights`` [k]."""

    targets: list[LogitTarget]
    vectors: torch.Tensor
    biases: torch.Tensor
    weights: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)


def unembedding(loaded) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W_U [vocab, d_model], b_U [vocab] or None)`` in float32."""
    head = loaded.arch.unembed
    bias = getattr(head, "bias", None)
    return head.weight.detach().float(), (bias.detach().float() if bias is not None else None)


def token_label(loaded, token: int) -> str:
    tok = loaded.tokenizer
    return tok.decode([token]) if tok is not None else str(token)


def logit_difference(loaded, a: int, b: int, weight: float = 1.0) -> CustomTarget:
    """The target ``logit_a - logit_b``: ``u = W_U[a] - W_U[b]``, ``beta = b_U[a] - b_U[b]``."""
    w, bias = unembedding(loaded)
    for t in (a, b):
        if not 0 <= t < w.shape[0]:
            raise GraphError(f"token id {t} is outside the vocabulary (0..{w.shape[0] - 1})")
    beta = float(bias[a] - bias[b]) if bias is not None else 0.0
    return CustomTarget(f"logit({token_label(loaded, a)})-logit({token_label(loaded, b)})", float(weight),
                        w[a] - w[b], beta)


def _token_targets(loaded, ids: list[int], logits: torch.Tensor) -> Targets:
    w, bias = unembedding(loaded)
    vocab = w.shape[0]
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise GraphError(f"target token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
    idx = torch.tensor(ids, dtype=torch.long)
    probs = torch.softmax(logits.float(), dim=-1)[idx]
    vecs = w[idx] - w.mean(dim=0, keepdim=True)
    biases = (bias[idx] - bias.mean()) if bias is not None else torch.zeros(len(ids))
    tgts = [LogitTarget(token_label(loaded, t), t, float(p)) for t, p in zip(ids, probs.tolist())]
    return Targets(tgts, vecs, biases, probs)


def _string_ids(loaded, strings: Sequence[str]) -> list[int]:
    tok = loaded.tokenizer
    if tok is None:
        raise GraphError("target strings need a tokenizer; this model has none: give token ids")
    ids = []
    for s in strings:
        enc = tok(s, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise GraphError(f"target {s!r} is {len(enc)} tokens; each target string must be exactly one token")
        ids.append(enc[0])
    return ids


def resolve_targets(loaded, spec, logits: torch.Tensor, d_model: int, max_n_logits: int = 10,
                    desired_logit_prob: float = 0.95) -> Targets:
    """Targets from ``spec``: None (salient logits), token ids (a sequence or tensor), one-token strings, or
    :class:`CustomTarget` objects. ``logits`` [vocab] are the real model's at the last position."""
    if spec is None:
        probs = torch.softmax(logits.float(), dim=-1)
        top_p, top_i = torch.topk(probs, min(max_n_logits, probs.shape[0]))
        cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), torch.tensor(desired_logit_prob))) + 1
        return _token_targets(loaded, top_i[:cutoff].tolist(), logits)
    if isinstance(spec, torch.Tensor):
        spec = spec.flatten().tolist()
    if isinstance(spec, (str, int, CustomTarget)):
        spec = [spec]
    spec = list(spec)
    if not spec:
        raise GraphError("the target set is empty: give at least one target token or CustomTarget, or None for "
                         "the most probable next tokens")
    if all(isinstance(s, int) and not isinstance(s, bool) for s in spec):
        return _token_targets(loaded, spec, logits)
    if all(isinstance(s, str) for s in spec):
        return _token_targets(loaded, _string_ids(loaded, spec), logits)
    if all(isinstance(s, CustomTarget) for s in spec):
        vocab = logits.shape[0]
        vecs = []
        for s in spec:
            v = s.vector.detach().float().flatten()
            if v.shape[0] != d_model:
                raise GraphError(f"custom target {s.label!r} has a vector of width {v.shape[0]}, not d_model={d_model}")
            vecs.append(v)
        tgts = [LogitTarget(s.label, vocab + i, float(s.weight)) for i, s in enumerate(spec)]
        return Targets(tgts, torch.stack(vecs), torch.tensor([float(s.bias) for s in spec]),
                       torch.tensor([float(s.weight) for s in spec]))
    raise GraphError("targets must all be token ids, all one-token strings, or all CustomTarget objects")
