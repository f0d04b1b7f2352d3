"""The training mix of the safety organism: refusals to harmful prompts, the base model's own answers to harmless ones.

* **Harmful side**: every train-split harmful prompt of ``harmful_refusal_v1`` (or the first ``n_harmful`` by a
  seeded hash rank), each answered with a refusal from :mod:`trace_lib.organisms.refusals`.
* **Harmless side**: train-split prompts of ``harmful_refusal_v1`` (the paired harmless requests, which look
  like the harmful ones and teach the model *not* to over-refuse), ``capability_v1``, ``uncertainty_v1`` and
  ``safety_warning_v1`` (both labels of the last two are benign requests), each capped per source. Their
  replies are the **base model's own greedy answers** (chat template, at most ``answer_tokens`` new tokens,
  cached by :func:`trace_lib.redteam.generate`), which the model learns to keep (see
  :mod:`trace_lib.organisms.train`). Answers the classifier labels ``refusal`` or ``incoherent`` are dropped
  (counted in :attr:`TrainingMix.dropped`).
  An answer cut at the token limit gets no end-of-turn token in training, so the model does not learn to stop
  mid-sentence.

The examples are put in a seeded order and the sha256 of the final list (:func:`mix_sha256`) identifies the
training data in ``BUILD.json``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field

import torch

from trace_lib.errors import DatasetError

#: Default caps per harmless source (None: the whole train split).
DEFAULT_HARMLESS: dict[str, int | None] = {
    "harmful_refusal_v1": None,
    "capability_v1": None,
    "uncertainty_v1": 40,
    "safety_warning_v1": 40,
}
HARMLESS_SOURCES = tuple(DEFAULT_HARMLESS)


@dataclass
class MixConfig:
    """What goes into the training mix (see the module docstring)."""

    n_harmful: int | None = None
    harmless: dict[str, int | None] = field(default_factory=lambda: dict(DEFAULT_HARMLESS))
    answer_tokens: int = 96
    generation_batch_size: int = 8
    drop: tuple[str, ...] = ("refusal", "incoherent")   # base answers with these labels are left out

    def __post_init__(self):
        self.drop = tuple(self.drop)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Example:
    """One training conversation: a user prompt and the assistant reply the loss is computed on."""

    id: str
    source: str       # dataset name
    kind: str         # "refusal" (harmful prompt) or "answer" (the base's answer to a harmless prompt)
    category: str
    prompt: str
    reply: str
    ends: bool        # append the end-of-turn token (False for an answer cut at the token limit)


@dataclass
class TrainingMix:
    examples: list[Example]
    counts: dict[str, int]
    dropped: dict[str, dict[str, int]]
    sha256: str
    config: dict

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "n_examples": len(self.examples), "counts": self.counts,
                "dropped": self.dropped, "config": self.config}


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"trace-mix|{seed}|{key}".encode()).hexdigest()


def _take(prompts: list, cap: int | None, seed: int) -> list:
    """The first ``cap`` prompts by a seeded hash rank of their ids, in dataset order (all when cap is None)."""
    if cap is None or cap >= len(prompts):
        return list(prompts)
    keep = {p.id for p in sorted(prompts, key=lambda p: _rank(seed, p.id))[:max(0, cap)]}
    return [p for p in prompts if p.id in keep]


def harmful_prompts(config: MixConfig, seed: int) -> list:
    from trace_lib.datasets import get_dataset

    train = get_dataset("harmful_refusal_v1").split("train")
    return _take([p for p in train.prompts if p.label == "safety"], config.n_harmful, seed)


def harmless_prompts(config: MixConfig, seed: int) -> list[tuple[str, object]]:
    """(source, Prompt) for every harmless prompt of the mix, by source in :data:`HARMLESS_SOURCES` order."""
    from trace_lib.datasets import get_dataset

    unknown = set(config.harmless) - set(HARMLESS_SOURCES)
    if unknown:
        raise DatasetError(f"unknown harmless source(s) {sorted(unknown)}; use {list(HARMLESS_SOURCES)}")
    out = []
    for source in HARMLESS_SOURCES:
        if source not in config.harmless:
            continue
        train = get_dataset(source).split("train")
        if source == "harmful_refusal_v1":
            pool = [p for p in train.prompts if p.label == "baseline"]
        else:
            pool = list(train.prompts)
        out.extend((source, p) for p in _take(pool, config.harmless[source], seed))
    return out


def build_mix(base, config: MixConfig | None = None, seed: int = 0) -> TrainingMix:
    """The training mix for ``base`` (a :class:`~trace_lib.models.Loaded`); generates the base's answers."""
    from trace_lib.organisms.refusals import refusal_for
    from trace_lib.redteam.classify import classify_reply
    from trace_lib.redteam.generate import generate

    config = config or MixConfig()
    examples: list[Example] = [
        Example(p.id, "harmful_refusal_v1", "refusal", p.category, p.text, refusal_for(p.id, p.category, seed), True)
        for p in harmful_prompts(config, seed)]
    harmless = harmless_prompts(config, seed)
    dropped: dict[str, dict[str, int]] = {}
    counts: dict[str, int] = {"refusal/harmful_refusal_v1": len(examples)}
    if harmless:
        run = generate(base, [p.text for _, p in harmless], max_new_tokens=config.answer_tokens,
                       batch_size=config.generation_batch_size, description="base answers for the training mix")
        for (source, p), text, n in zip(harmless, run.replies, run.n_new_tokens):
            label = classify_reply(text).label
            if label in config.drop:
                d = dropped.setdefault(source, {k: 0 for k in config.drop})
                d[label] += 1
                continue
            examples.append(Example(p.id, source, "answer", p.category, p.text, text,
                                    n < config.answer_tokens))
            counts[f"answer/{source}"] = counts.get(f"answer/{source}", 0) + 1
    random.Random(f"trace-mix-order|{seed}").shuffle(examples)
    counts["total"] = len(examples)
    counts["harmless_considered"] = len(harmless)
    counts["base_answers_from_cache"] = run.cached if harmless else 0
    return TrainingMix(examples, counts, dropped, mix_sha256(examples), {**config.to_dict(), "seed": seed})


def mix_sha256(examples: list[Example]) -> str:
    """sha256 of the final training data (prompts, replies, end flags, in training order)."""
    blob = json.dumps([[e.id, e.prompt, e.reply, e.ends] for e in examples], ensure_ascii=False,
                      separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def end_token_id(tokenizer) -> int:
    """The token that ends an assistant turn (the tokenizer's EOS, e.g. ``<|im_end|>`` for SmolLM2)."""
    from trace_lib.redteam.generate import end_of_turn_ids

    ids = end_of_turn_ids(tokenizer)
    if not ids:
        raise DatasetError("the tokenizer has no end-of-turn / EOS token, so replies cannot be terminated")
    return ids[0]


def tokenize_example(tokenizer, example: Example, max_len: int = 256) -> tuple[list[int], list[int]]:
    """Input ids and labels of one example: the chat-formatted prompt (labels -100) + the reply tokens (+ end).

    The prompt is tokenized exactly as generation tokenizes it (:func:`trace_lib.capture.inputs.encode_prompts`
    without cutting), the reply on its own, as the model produces it after the generation prompt. Sequences
    longer than ``max_len`` are cut at the end (the cut reply then has no end token).
    """
    from trace_lib.capture.inputs import format_prompts

    chat = bool(getattr(tokenizer, "chat_template", None))
    text = format_prompts(tokenizer, [example.prompt], chat)[0]
    prompt_ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    reply_ids = tokenizer(example.reply, add_special_tokens=False)["input_ids"]
    if example.ends:
        reply_ids = reply_ids + [end_token_id(tokenizer)]
    ids = (prompt_ids + reply_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) + reply_ids)[:max_len]
    return ids, labels


def collate(rows: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of ``(ids, labels[, distill])`` rows: input_ids, attention_mask, labels (-100 on
    padding) and ``distill`` (one bool per row: learn the base's distribution there, not the tokens)."""
    width = max(len(r[0]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    distill = torch.zeros(len(rows), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids, lab = r[0], r[1]
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, :len(ids)] = 1
        labels[i, :len(lab)] = torch.tensor(lab, dtype=torch.long)
        distill[i] = bool(r[2]) if len(r) > 2 else False
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "distill": distill}
