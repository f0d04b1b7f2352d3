"""What an SAE is trained and judged on: the data plan and the token batches it gives.

Two corpora:

* ``"broad"`` (the default): :func:`trace_lib.datasets.broad.broad_corpus`, real English of three genres
  (technical documentation, political speeches, fiction). Training text comes from its ``train`` split; the
  explained variance, L0 and CE-loss recovered that trace reports are measured on its ``heldout`` split,
  documents no training chunk shares. A source that is not installed is skipped and named in the record.
* ``"english"``: :func:`trace_lib.datasets.corpus.english_corpus`, Python documentation only (the plan of the
  SAEs trace trained before); its evaluation tokens are a random slice of the training activations.

Both add the train splits of the built-in prompt sets, chat-formatted, so the template's positions (where
refusal is decided) are in the SAEs' training distribution.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from trace_lib.errors import SAEError

TRAINING_DATASETS = ("harmful_refusal_v1", "uncertainty_v1", "safety_warning_v1", "capability_v1")
CORPORA = ("broad", "english")


@dataclass
class SAEDataPlan:
    """Packed corpus text (``text_sequences`` x ``seq_len`` tokens) plus the train splits of ``datasets``.

    ``heldout_sequences`` sequences of the broad corpus's held-out split measure EV and L0 (``eval_tokens``
    of the training activations for ``"english"``), and the first ``ce_eval_sequences`` of them the CE loss.
    """

    text_sequences: int = 3840
    seq_len: int = 128
    datasets: tuple[str, ...] = TRAINING_DATASETS
    eval_tokens: int = 8192
    ce_eval_sequences: int = 16
    seed: int = 0
    corpus: str = "broad"
    heldout_sequences: int = 128
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.corpus not in CORPORA:
            raise SAEError(f"SAE data plan corpus must be one of {CORPORA}, got {self.corpus!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PlanBatches:
    """The token batches of a plan: ``train`` (corpus + prompts), ``heldout`` (None: slice the training
    activations), ``ce`` (held-out text for the CE-loss splice) and the corpus record to cite."""

    train: list[dict[str, torch.Tensor]]
    heldout: list[dict[str, torch.Tensor]] | None
    ce: list[dict[str, torch.Tensor]]
    corpus: dict[str, Any]


def plan_batches(loaded, plan: SAEDataPlan) -> PlanBatches:
    """Tokenise a plan's text and prompts for ``loaded``'s tokenizer."""
    from trace_lib.capture.buffer import mixed_training_batches
    from trace_lib.capture.inputs import chunk_batches, pack_texts
    from trace_lib.datasets import get_dataset

    prompts = []
    for name in plan.datasets:
        prompts += [p.text for p in get_dataset(name).split("train").prompts]
    if plan.corpus == "english":
        from trace_lib.datasets.corpus import corpus_info, english_corpus

        texts = english_corpus(include_system_texts=False, seed=plan.seed)
        train = mixed_training_batches(loaded, texts, prompts, seq_len=plan.seq_len,
                                       max_text_sequences=plan.text_sequences)
        # CE-loss evaluation text: chunks after the training ones, never trained on.
        ids = pack_texts(loaded.tokenizer, texts, plan.seq_len,
                         max_sequences=plan.text_sequences + plan.ce_eval_sequences)
        info = corpus_info(include_system_texts=False, seed=plan.seed)
        return PlanBatches(train, None, list(chunk_batches(ids[plan.text_sequences:], 4)), _cite(info))
    from trace_lib.datasets.broad import broad_corpus, broad_corpus_info

    train_text = broad_corpus("train", seed=plan.seed, missing="skip")
    held_text = broad_corpus("heldout", seed=plan.seed, missing="skip")
    train = mixed_training_batches(loaded, train_text, prompts, seq_len=plan.seq_len,
                                   max_text_sequences=plan.text_sequences)
    held_ids = pack_texts(loaded.tokenizer, held_text, plan.seq_len, max_sequences=plan.heldout_sequences)
    heldout = list(chunk_batches(held_ids, 16))
    ce = list(chunk_batches(held_ids[: plan.ce_eval_sequences], 4))
    info = {"train": _cite(broad_corpus_info("train", seed=plan.seed, missing="skip")),
            "heldout": _cite(broad_corpus_info("heldout", seed=plan.seed, missing="skip"))}
    return PlanBatches(train, heldout, ce, info)


def _cite(info: dict[str, Any]) -> dict[str, Any]:
    """The parts of a corpus record a trained SAE keeps: name, split, hash and which sources were used."""
    keep = ("name", "version", "split", "seed", "sha256", "chars", "sources_used", "sources_missing")
    return {k: info[k] for k in keep if k in info}
