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

Inputs are token-level (:class:`MetricBatch`), so every model sees exactly the same tokens. :func:`build_batch`
gives one right-padded row per teacher-forced continuation; :func:`pack_batch` packs several prompts into one
row as a tree (their shared chat-template prefix once, each prompt once, each continuation as a branch) with
explicit position ids and a 4-D attention mask, so every token sees exactly the context it has in its own
unpacked row and M is the same to float rounding, for about a third of the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from trace_lib.capture.splice import register_replacement
from trace_lib.errors import AttributionError, NoGapError
from trace_lib.models.device import model_device, to_device

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
    offsets: torch.Tensor | None = None  # [rows, seq] position minus the post-instruction position; NO_OFFSET: shared
    position_ids: torch.Tensor | None = None  # packed batches: each token's position in its unpacked row
    visible: torch.Tensor | None = None  # packed batches: [rows, seq, seq] bool, query t may attend to key s
    owner: torch.Tensor | None = None  # [rows, seq] the prompt each token's score belongs to (-1: none)
    read: torch.Tensor | None = None  # [rows, seq] bool, where the direction metric reads

    def __post_init__(self) -> None:
        idx = torch.arange(self.input_ids.shape[1])
        if self.offsets is None:
            self.offsets = idx[None, :] - (self.prompt_len - 1)[:, None]
        if self.owner is None:
            self.owner = torch.where(self.attention_mask.bool(), self.row_prompt[:, None], -1)
        if self.read is None:
            self.read = idx[None, :] == self.read_pos[:, None]

    def forward_kwargs(self, dtype: torch.dtype = torch.float32) -> dict:
        """The model inputs: ids and the padding mask, or for a packed batch ids, position ids and an additive
        4-D mask (0 where visible, the dtype's minimum elsewhere; used as given by transformers' SDPA and eager
        attention)."""
        if self.visible is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        mask = torch.zeros(self.visible.shape, dtype=dtype).masked_fill(~self.visible, torch.finfo(dtype).min)
        return {"input_ids": self.input_ids, "attention_mask": mask[:, None], "position_ids": self.position_ids}

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
        for off in where:
            mask |= self.offsets == int(off)
        if self.visible is not None:
            self._check_reach(where)
        return mask & real

    def _check_reach(self, where: Sequence[int]) -> None:
        """A packed batch shares its first tokens between prompts, so offsets that reach them cannot be patched
        per prompt."""
        owned = self.offsets != NO_OFFSET
        deepest = max(int(self.offsets[owned & (self.owner == i)].min()) for i in self.owner[owned].unique().tolist())
        if min(int(o) for o in where) < deepest:
            raise AttributionError(f"offset {min(int(o) for o in where)} reaches the chat-template prefix this packed "
                                   f"batch shares between prompts (offsets down to {deepest} are every prompt's own); "
                                   "build the batches with share_prefix=False")


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
        for cont, sign in _continuations(i, reply_ids[i], compliance_ids):
            rows.append((p + cont, cont, sign, -1, i))
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


NO_OFFSET = -(1 << 30)


class _Tok(NamedTuple):
    """One token of a packed row: its id and unpacked position, the prompt (-1: the shared prefix) and
    continuation branch (-1: the prompt's own tokens) it belongs to, its offset from the post-instruction
    position, the token it predicts with the weight of that log-prob, and whether the direction metric reads it."""

    id: int
    pos: int
    owner: int
    branch: int
    offset: int
    target: int = 0
    weight: float = 0.0
    read: bool = False


def _continuations(i: int, reply: Sequence[int], compliance: Sequence[int]) -> list[tuple[list[int], float]]:
    """The refusal metric's two teacher-forced continuations of prompt ``i`` with their signs."""
    r, c = list(reply), list(compliance)
    if not r or not c:
        raise AttributionError(f"prompt {i}: the refusal reply and the compliance opening need at least one token each")
    return [(r, 1.0), (c, -1.0)]


def _lcp(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(x) for x in seqs)
    for i in range(n):
        if any(x[i] != seqs[0][i] for x in seqs):
            return i
    return n


def pack_batch(prompt_ids: Sequence[Sequence[int]], kind: str, reply_ids: Sequence[Sequence[int]] = (),
               compliance_ids: Sequence[int] = (), pad_id: int = 0, per_row: int = 8,
               share_prefix: bool = True) -> MetricBatch:
    """The same teacher-forced continuations as :func:`build_batch`, packed ``per_row`` prompts to a row as a
    tree: the prompts' longest common prefix once (``share_prefix``), then per prompt its remaining tokens but
    the last, then one branch per continuation that starts with its own copy of the prompt's last token. Each
    token gets the position id it has unpacked and sees the prefix, its prompt and its own branch (causally),
    so every logit equals the unpacked row's; a prompt's tokens are run once instead of once per row."""
    groups = [list(range(i, min(i + per_row, len(prompt_ids)))) for i in range(0, len(prompt_ids), per_row)]
    built: list[list[_Tok]] = []
    for g in groups:
        ps = [list(prompt_ids[i]) for i in g]
        if any(not p for p in ps):
            raise AttributionError("a prompt has no tokens")
        s = min(_lcp(ps), min(len(p) for p in ps) - 1) if share_prefix and len(ps) > 1 else 0
        toks = [_Tok(t, j, -1, -1, NO_OFFSET) for j, t in enumerate(ps[0][:s])]
        for i, p in zip(g, ps):
            last = len(p) - 1
            toks += [_Tok(p[j], j, i, -1, j - last) for j in range(s, last)]
            branches = [([], 0.0)] if kind == "direction" else _continuations(i, reply_ids[i], compliance_ids)
            for b, (cont, sign) in enumerate(branches):
                for t, tok in enumerate([p[-1]] + cont):  # position t predicts cont[t]
                    scored = t < len(cont)
                    toks.append(_Tok(tok, last + t, i, b, t, cont[t] if scored else 0,
                                     sign / len(cont) if scored else 0.0, kind == "direction" and t == 0))
        built.append(toks)
    width = max(len(t) for t in built)
    n = len(built)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    offsets = torch.full((n, width), NO_OFFSET, dtype=torch.long)
    targets = torch.zeros((n, width), dtype=torch.long)
    weights = torch.zeros((n, width), dtype=torch.float32)
    visible = torch.eye(width, dtype=torch.bool).repeat(n, 1, 1)  # padding sees itself only
    owner = torch.full((n, width), -1, dtype=torch.long)
    read = torch.zeros((n, width), dtype=torch.bool)
    for r, toks in enumerate(built):
        k = len(toks)
        col = _Tok(*(torch.tensor(c) for c in zip(*toks)))
        ids[r, :k], pos[r, :k], offsets[r, :k], owner[r, :k] = col.id, col.pos, col.offset, col.owner
        targets[r, :k], weights[r, :k], read[r, :k], mask[r, :k] = col.target, col.weight, col.read, 1
        causal = torch.ones(k, k, dtype=torch.bool).tril()
        shared = (col.owner[None, :] == -1) | ((col.owner[None, :] == col.owner[:, None])
                                              & ((col.branch[None, :] == -1) | (col.branch[None, :] == col.branch[:, None])))
        visible[r, :k, :k] = causal & shared
    return MetricBatch(ids, mask, targets, weights, torch.full((n,), -1), torch.zeros(n, dtype=torch.long),
                       torch.full((n,), -1), len(prompt_ids), offsets, pos, visible, owner, read)


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
            model(**to_device(batch.forward_kwargs(_dtype(loaded)), model_device(model)), use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        x = seen["x"][batch.read.to(seen["x"].device)]
        vals = x.float() @ metric.direction.to(x.device, torch.float32)
        out = torch.zeros(batch.n_prompts, dtype=torch.float32, device=vals.device)
        return out.index_add(0, batch.owner[batch.read].to(vals.device), vals)
    used = batch.weights != 0
    keep_pos = torch.nonzero(used.any(0)).squeeze(-1)  # only positions that are scored get logits
    kwargs = to_device(batch.forward_kwargs(_dtype(loaded)), model_device(model))
    try:
        logits = model(**kwargs, use_cache=False, logits_to_keep=keep_pos).logits
    except TypeError:  # a model without logits_to_keep
        logits = model(**kwargs, use_cache=False).logits
        logits = logits[:, keep_pos]
    logp = torch.log_softmax(logits.float(), dim=-1)
    tgt = batch.targets[:, keep_pos].to(logp.device)
    lp = logp.gather(-1, tgt[..., None]).squeeze(-1) * batch.weights[:, keep_pos].to(logp.device)
    scored = used[:, keep_pos]
    out = torch.zeros(batch.n_prompts, dtype=torch.float32, device=lp.device)
    return out.index_add(0, batch.owner[:, keep_pos][scored].to(lp.device), lp[scored.to(lp.device)])


def _dtype(loaded) -> torch.dtype:
    return next(loaded.model.parameters()).dtype


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
