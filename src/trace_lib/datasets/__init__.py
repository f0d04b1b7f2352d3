"""Prompt datasets and a download-free English corpus.

>>> from trace_lib.datasets import get_dataset, list_datasets
>>> ds = get_dataset("harmful_refusal_v1")          # or a path to a user .jsonl / .csv file
>>> ds.safety_prompts[:2], ds.categories, ds.split("train").sha256()

See ``docs/datasets.md`` for the record schema and the built-in datasets.
"""

from __future__ import annotations

from trace_lib.datasets.broad import broad_corpus, broad_corpus_info, unavailable_sources
from trace_lib.datasets.corpus import corpus_info, english_corpus
from trace_lib.datasets.registry import (
    LABELS,
    SPLITS,
    Dataset,
    Prompt,
    get_dataset,
    list_datasets,
    load_dataset_file,
)

__all__ = [
    "LABELS",
    "SPLITS",
    "Dataset",
    "Prompt",
    "broad_corpus",
    "broad_corpus_info",
    "corpus_info",
    "english_corpus",
    "get_dataset",
    "list_datasets",
    "load_dataset_file",
    "unavailable_sources",
]
