"""From prompts to metric inputs: the reference's refusals, teacher-forcing batches and the refusal direction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trace_lib.attribution.metric import COMPLIANCE, MetricBatch, build_batch, pack_batch
from trace_lib.capture.hooks import iter_activations
from trace_lib.capture.inputs import encode_prompts, prompt_batches
from trace_lib.errors import AttributionError, DatasetError, NoGapError
from trace_lib.metrics.directions import cohens_d, diff_in_means, unit


@dataclass
class Refusals:
    """The harmful prompts, the reference's reply to each and whether it is a refusal."""

    prompts: list[str]
    replies: list[str]
    refused: list[bool]
    source: str  # "reference greedy replies" or "given reply"

    @property
    def kept(self) -> tuple[list[str], list[str]]:
        keep = [i for i, r in enumerate(self.refused) if r]
        return [self.prompts[i] for i in keep], [self.replies[i] for i in keep]

    def check(self) -> None:
        if not any(self.refused):
            raise NoGapError(f"the reference refuses none of the {len(self.prompts)} harmful prompts, so there is no "
                             "refusal gap to localise; use a safety-tuned reference (default-safety) or other prompts")


def reference_refusals(reference, prompts: Sequence[str], refusal_reply: str | None = None, max_new_tokens: int = 24,
                       batch_size: int = 8) -> Refusals:
    """The reference's greedy reply to each prompt, labelled by trace's refusal classifier; with
    ``refusal_reply`` that text stands for the reply to every prompt (and every prompt counts as refused)."""
    prompts = list(prompts)
    if not prompts:
        raise DatasetError("no harmful prompts to localise on")
    if refusal_reply is not None:
        if not refusal_reply.strip():
            raise AttributionError("the refusal reply is empty")
        return Refusals(prompts, [refusal_reply] * len(prompts), [True] * len(prompts), "given reply")
    from trace_lib.redteam.classify import classify_reply
    from trace_lib.redteam.generate import generate_replies

    replies = generate_replies(reference, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return Refusals(prompts, replies, [classify_reply(r).label == "refusal" for r in replies],
                    "reference greedy replies")


def _tokens(tokenizer, text: str, k: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:k]
    if not ids:
        raise AttributionError(f"{text!r} gives no tokens")
    return ids


def make_batches(tokenizer, prompts: Sequence[str], kind: str, replies: Sequence[str] = (), batch_size: int = 8,
                 reply_tokens: int = 4, compliance: str = COMPLIANCE, max_length: int = 256, pack: bool = True,
                 share_prefix: bool = True, window: int | None = None) -> list[MetricBatch]:
    """Chat-formatted prompts (cut to ``max_length`` tokens inside the user message) as :class:`MetricBatch`es;
    the refusal metric teacher-forces the first ``reply_tokens`` tokens of each reply and of ``compliance``.

    With ``pack`` each batch is one packed row (:func:`~trace_lib.attribution.metric.pack_batch`; the shared
    chat-template prefix once when ``share_prefix``), unless that row would be longer than ``window`` (a
    sliding-attention window, which a custom mask would override): then it is one padded row per continuation."""
    if tokenizer is None:
        raise AttributionError("the reference has no tokenizer; build MetricBatch inputs from token ids instead")
    ids, _ = encode_prompts(tokenizer, list(prompts), max_length, why=f"to fit {max_length} tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    comp = _tokens(tokenizer, compliance, reply_tokens) if kind == "refusal-logprob" else []
    reps = [_tokens(tokenizer, r, reply_tokens) for r in replies] if kind == "refusal-logprob" else []
    out = []
    for i in range(0, len(ids), batch_size):
        args = (ids[i:i + batch_size], kind, reps[i:i + batch_size], comp, pad)
        b = pack_batch(*args, per_row=batch_size, share_prefix=share_prefix) if pack else None
        out.append(b if b is not None and (window is None or b.input_ids.shape[1] <= window) else build_batch(*args))
    return out


def last_token_residuals(loaded, prompts: Sequence[str], layers: Sequence[int],
                         batch_size: int = 16) -> dict[int, torch.Tensor]:
    """The residual after each block of ``layers`` at the last token of each chat-formatted prompt."""
    names = [f"blocks.{i}.hook_resid_post" for i in layers]
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for cb in iter_activations(loaded, prompt_batches(loaded.tokenizer, list(prompts), batch_size), names=names):
        last = cb.attention_mask.sum(1) - 1
        rows = torch.arange(len(last))
        for i, n in zip(layers, names):
            out[i].append(cb.acts[n][rows, last])
    return {i: torch.cat(v) for i, v in out.items()}


@dataclass
class Direction:
    """The reference's unit refusal direction after block ``layer``, and how well it separates the prompts."""

    r_hat: torch.Tensor
    layer: int
    cohens_d: float
    n_harmful: int
    n_harmless: int
    chosen_by: str

    def to_dict(self) -> dict:
        return {"layer": self.layer, "hook": f"blocks.{self.layer}.hook_resid_post", "cohens_d": self.cohens_d,
                "n_harmful": self.n_harmful, "n_harmless": self.n_harmless, "chosen_by": self.chosen_by}


def fit_direction(reference, harmful: Sequence[str], harmless: Sequence[str], layer: int | None = None,
                  batch_size: int = 16) -> Direction:
    """Difference-in-means of the reference's last-token residual (harmful - harmless), Arditi et al. 2024.
    Without ``layer``, the block (among the first 80%) whose direction separates the two sets best (Cohen's d
    of the projections) is chosen."""
    if not harmful or not harmless:
        raise DatasetError("the refusal direction needs harmful and harmless prompts (labels safety and baseline)")
    n = reference.n_layers
    if layer is not None and not -n <= layer < n:
        raise AttributionError(f"direction layer {layer} is out of range: this model has {n} blocks")
    layers = [layer % n] if layer is not None else list(range(max(1, int(0.8 * n))))
    pos = last_token_residuals(reference, harmful, layers, batch_size)
    neg = last_token_residuals(reference, harmless, layers, batch_size)
    best = None
    for i in layers:
        r = unit(diff_in_means(pos[i], neg[i])).float()
        d = cohens_d(pos[i] @ r, neg[i] @ r)
        if best is None or d > best[2]:
            best = (i, r, d)
    i, r, d = best
    return Direction(r, i, float(d), len(harmful), len(harmless),
                     "given" if layer is not None else "largest Cohen's d among the first 80% of blocks")
