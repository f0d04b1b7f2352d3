"""Hook overhead: a bare forward vs a forward capturing resid_post at every layer (goal: at most 5% more).

Usage: python benchmarks/hook_overhead.py [--model default] [--batch 8] [--seq 128] [--repeats 7]
Prints one JSON line: median seconds of each, their ratio and tokens/s, all measured in this one run.
"""

from __future__ import annotations

import argparse

import torch
from _common import emit, fixed_batch, interleaved, machine

from trace_lib import HookConfig, HookManager, load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    loaded = load_model(args.model)
    batch = fixed_batch(loaded.tokenizer, args.batch, args.seq)
    hm = HookManager(loaded, HookConfig(hook_points=["resid_post"]))

    def bare():
        with torch.no_grad():
            loaded.model(**batch, use_cache=False)

    def hooked():
        with torch.no_grad(), hm.capture():
            loaded.model(**batch, use_cache=False)
        hm.clear()

    t = interleaved({"bare": bare, "hooked": hooked}, repeats=args.repeats)
    tokens = args.batch * args.seq
    emit({"benchmark": "hook_overhead", "model": loaded.name, "hooks": len(hm.names), "batch": args.batch,
          "seq": args.seq, "bare_s": round(t["bare"], 4), "hooked_s": round(t["hooked"], 4),
          "ratio": round(t["hooked"] / t["bare"], 4), "bare_tokens_per_s": round(tokens / t["bare"], 1),
          **machine()})


if __name__ == "__main__":
    main()
