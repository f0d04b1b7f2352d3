"""Shared helpers for the benchmarks: a fixed input batch and interleaved, repeated timings."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable

import torch


def fixed_batch(tokenizer, batch: int = 8, seq: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` x ``seq`` tokens of real English text (the built-in corpus), no padding."""
    from trace_lib.capture.inputs import pack_texts
    from trace_lib.datasets.corpus import english_corpus

    ids = pack_texts(tokenizer, english_corpus(include_system_texts=False, seed=seed), seq, max_sequences=batch)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, the functions run in turn so drift in machine load hits all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}


def emit(record: dict) -> None:
    print(json.dumps(record))
