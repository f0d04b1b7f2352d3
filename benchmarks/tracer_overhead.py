"""Tracer overhead: a bare forward vs a forward traced by ModelTracer (goal for lightweight(): at most 10% more).

Usage: python benchmarks/tracer_overhead.py [--model default] [--batch 8] [--seq 128] [--repeats 7]
                                           [--preset lightweight|full]
Prints one JSON line: median seconds of each (interleaved, measured in this one run) and their ratio, plus
``in_hooks_s``: the median time per traced pass spent inside the tracer's hooks (statistics and anomaly
inputs), which machine load does not blur the way it blurs the difference of two ~2 s timings.
``lightweight()`` records statistics of ``resid_post`` at every layer (and of the final logits) with anomaly
checks; its KV cache tracing applies to generation only, so a single forward pass does not exercise it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import emit, fixed_batch, interleaved, machine

from trace_lib import load_model
from trace_lib.tracer import ModelTracer, ModelTracerConfig
from trace_lib.tracer.recorder import ActivationReducer

_hook_seconds: list[float] = []


def _timed(record):
    def wrapper(self, *args):
        t = time.perf_counter()
        try:
            return record(self, *args)
        finally:
            _hook_seconds.append(time.perf_counter() - t)
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--preset", choices=["lightweight", "full"], default="lightweight")
    args = ap.parse_args()
    loaded = load_model(args.model)
    batch = fixed_batch(loaded.tokenizer, args.batch, args.seq)
    config = getattr(ModelTracerConfig, args.preset)()
    tracer = ModelTracer(config).attach(loaded)

    def bare():
        with torch.no_grad():
            loaded.model(**batch, use_cache=False)

    per_pass: list[float] = []

    def traced():
        _hook_seconds.clear()
        tracer.trace(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        per_pass.append(sum(_hook_seconds))
        tracer.clear()

    ActivationReducer.__call__ = _timed(ActivationReducer.__call__)
    t = interleaved({"bare": bare, "traced": traced}, repeats=args.repeats)
    in_hooks = statistics.median(per_pass)
    tracer.trace(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    fwd = tracer.forwards[-1]
    emit({"benchmark": "tracer_overhead", "model": loaded.name, "preset": args.preset, "batch": args.batch,
          "seq": args.seq, "repeats": args.repeats, "records_per_forward": len(fwd.activations.records)
          if fwd.activations else 0, "bare_s": round(t["bare"], 4), "traced_s": round(t["traced"], 4),
          "ratio": round(t["traced"] / t["bare"], 4), "in_hooks_s": round(in_hooks, 4),
          "in_hooks_ratio": round(in_hooks / t["bare"], 4), "anomaly": fwd.anomaly, **machine()})


if __name__ == "__main__":
    main()
