"""The refusal metric M(model, prompt) and the gap a variant opens in it.

Two definitions, chosen with ``kind``:

``refusal-logprob`` (teacher-forced refusal log-probability). With the chat-formatted prompt x ending at its
post-instruction position, r the first k tokens of the *reference's* refusal reply to x and c the first k'
tokens of a compliance opening ("Sure, here")::

    M(x) = 1/k sum_{t<k} log p(r_t | x, r_<t)  -  1/k' sum_{t<k'} log p(c_t | x, c_<t)

i.e. how much more the model expects the reference's refusal than compliance, both read off teacher-forced
continuations that start at the post-instruction position.

``direction`` (projection on the refusal direction, Arditi et al. 2024, "Refusal in Language Models Is
Mediated by a Single Direction", arXiv:2406.11717). With ``r_hat`` the unit difference-in-means direction of
the reference's residual stream after block l at the last prompt token (harmful minus harmless prompts,
:func:`trace_lib.metrics.directions.diff_in_means`)::

    M(x) = < resid_post_l(x)[last prompt token], r_hat >

The *gap* of a variant is ``mean_x (M_ref(x) - M_var(x))`` over the harmful prompts the reference refuses;
:func:`gap_interval` gives its seeded percentile-bootstrap interval and :func:`check_gap` refuses to attribute
a gap whose interval contains 0.

Inputs are token-level (:class:`MetricBatch`), so every model sees exactly the same tokens; each row is
right-padded, so a row's real tokens keep the positions they have unpadded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trace_lib.capture.splice import register_replacement
from trace_lib.errors import AttributionError, NoGapError

KINDS = ("refusal-logprob", "direction")
COMPLIANCE = "Sure, here"


@dataclass
class MetricBatch:
    """Teacher-forcing rows of some prompts. Per row r: ``weights[r, t]`` weighs ``log p(targets[r, t])``
    predicted at position t; ``read_pos[r]`` is where the direction metric reads (-1: not read);
    ``prompt_len[r]`` the prompt's length (its post-instruction position is ``prompt_len - 1``);
    ``row_prompt[r]`` the prompt (0..n_prompts-1 within the batch) the row belongs to."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    read_pos: torch.Tensor
    prompt_len: torch.Tensor
    row_prompt: torch.Tensor
    n_prompts: int

    def positions(self, where: str | Sequence[int] = "all") -> torch.Tensor:
        """[rows, seq] bool mask: ``"all"`` real tokens, ``"last"`` the post-instruction position, or offsets
        from it (0 = last prompt token, -1 the one before, 1 the first teacher-forced token)."""
        real = self.attention_mask.bool()
        if isinstance(where, str):
            if where == "all":
                return real
            if where != "last":
                raise AttributionError(f"positions must be 'all', 'last' or offsets from the last prompt token, "
                                       f"not {where!r}")
            where = [0]
        mask = torch.zeros_like(real)
        idx = torch.arange(real.shape[1])
        for off in where:
            mask |= idx[None, :] == (self.prompt_len - 1 + int(off))[:, None]
        return mask & real


@dataclass
class Metric:
    """Which M: ``kind`` and, for the direction metric, the unit direction and the block it is read after."""

    kind: str = "refusal-logprob"
    direction: torch.Tensor | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AttributionError(f"metric must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.kind == "direction" and (self.direction is None or self.layer is None):
            raise AttributionError("the direction metric needs a direction and the layer it was fitted at")

    def describe(self) -> dict:
        return {"kind": self.kind, "layer": self.layer,
                "hook": None if self.layer is None else f"blocks.{self.layer}.hook_resid_post"}


def build_batch(prompt_ids: Sequence[Sequence[int]], kind: str, reply_ids: Sequence[Sequence[int]] = (),
                compliance_ids: Sequence[int] = (), pad_id: int = 0) -> MetricBatch:
    """Rows for ``prompt_ids`` (already chat-formatted token ids). ``refusal-logprob``: two rows per prompt,
    prompt + reply (weights +1/k) and prompt + compliance (weights -1/k'); ``direction``: one row per prompt."""
    rows: list[tuple[list[int], list[int], float, int, int]] = []  # ids, continuation, weight sign, read, prompt
    for i, p in enumerate(prompt_ids):
        p = list(p)
        if not p:
            raise AttributionError(f"prompt {i} has no tokens")
        if kind == "direction":
            rows.append((p, [], 0.0, len(p) - 1, i))
            continue
        r, c = list(reply_ids[i]), list(compliance_ids)
        if not r or not c:
            raise AttributionError(f"prompt {i}: the refusal reply and the compliance opening need at least one "
                                   "token each")
        rows.append((p + r, r, 1.0, -1, i))
        rows.append((p + c, c, -1.0, -1, i))
    width = max(len(ids) for ids, *_ in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    targets = torch.zeros((n, width), dtype=torch.long)
    weights = torch.zeros((n, width), dtype=torch.float32)
    for j, (ids, cont, sign, _, i) in enumerate(rows):
        input_ids[j, : len(ids)] = torch.tensor(ids)
        mask[j, : len(ids)] = 1
        start = len(prompt_ids[i]) - 1  # the post-instruction position predicts the first continuation token
        for t, tok in enumerate(cont):
            targets[j, start + t] = tok
            weights[j, start + t] = sign / len(cont)
    return MetricBatch(input_ids, mask, targets, weights,
                       torch.tensor([r[3] for r in rows]), torch.tensor([len(prompt_ids[r[4]]) for r in rows]),
                       torch.tensor([r[4] for r in rows]), len(prompt_ids))


def _direction_site(loaded, metric: Metric):
    return loaded.arch.site(f"blocks.{metric.layer}.hook_resid_post")


class _Stop(Exception):
    pass


def metric_values(loaded, batch: MetricBatch, metric: Metric) -> torch.Tensor:
    """M of every prompt of ``batch`` under ``loaded`` as it is now (with whatever hooks are registered):
    [n_prompts], differentiable when grad is enabled."""
    model = loaded.model
    if metric.kind == "direction":
        seen: dict[str, torch.Tensor] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            seen["x"] = t
            raise _Stop  # nothing after block l matters (a backward pass starts from t): skip the rest

        handle = register_replacement(_direction_site(loaded, metric), keep)
        try:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        rows = torch.nonzero(batch.read_pos >= 0).squeeze(-1)
        x = seen["x"][rows, batch.read_pos[rows]]
        vals = x.float() @ metric.direction.to(x.device, torch.float32)
        out = torch.zeros(batch.n_prompts, dtype=torch.float32, device=vals.device)
        return out.index_add(0, batch.row_prompt[rows].to(vals.device), vals)
    used = batch.weights != 0
    keep_pos = torch.nonzero(used.any(0)).squeeze(-1)  # only positions that are scored get logits
    try:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                       logits_to_keep=keep_pos).logits
    except TypeError:  # a model without logits_to_keep
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logits = logits[:, keep_pos]
    logp = torch.log_softmax(logits.float(), dim=-1)
    tgt = batch.targets[:, keep_pos].to(logp.device)
    lp = logp.gather(-1, tgt[..., None]).squeeze(-1)
    per_row = (lp * batch.weights[:, keep_pos].to(lp.device)).sum(-1)
    out = torch.zeros(batch.n_prompts, dtype=torch.float32, device=per_row.device)
    return out.index_add(0, batch.row_prompt.to(per_row.device), per_row)


@dataclass
class Gap:
    """``mean(M_ref - M_var)`` over n prompts, with its percentile-bootstrap interval."""

    value: float
    lo: float
    hi: float
    n: int
    m_ref: float
    m_var: float
    level: float = 0.95
    n_boot: int = 1000
    seed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def text(self) -> str:
        return (f"gap {self.value:.4g} ({100 * self.level:.0f}% bootstrap interval {self.lo:.4g} .. {self.hi:.4g}, "
                f"{self.n} prompts; M ref {self.m_ref:.4g}, variant {self.m_var:.4g})")


def gap_interval(m_ref: torch.Tensor, m_var: torch.Tensor, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> Gap:
    """The gap and its percentile bootstrap interval over prompts (``n_boot`` resamples, numpy seed ``seed``)."""
    d = (m_ref.double() - m_var.double()).cpu().numpy()
    if d.size == 0:
        raise NoGapError("no prompts to measure a gap on")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    a = (1 - level) / 2
    return Gap(float(d.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a)), int(d.size),
               float(m_ref.double().mean()), float(m_var.double().mean()), level, n_boot, seed)


def check_gap(gap: Gap, variant: str = "the variant") -> Gap:
    """Raise :class:`NoGapError` when the gap's interval includes 0 (nothing distinguishable to attribute)."""
    if gap.lo <= 0 <= gap.hi:
        raise NoGapError(f"{variant}: the {gap.text()} includes 0, too small to attribute; use more prompts or "
                         "a stronger variant")
    return gap
