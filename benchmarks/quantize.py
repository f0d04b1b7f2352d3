"""Quantization cost: time to build each variant and its forward time relative to the FP32 reference.

Usage: python benchmarks/quantize.py [--model default] [--configs fp16,int8-dynamic,...] [--repeats 3]
Prints one JSON line per config; forward times are medians over repeats, interleaved with the reference's.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from _common import emit, fixed_batch, interleaved, machine

from trace_lib import load_model
from trace_lib.quant import quantize

DEFAULT_CONFIGS = ("fp16,bf16,int8-dynamic,int8-dyn-tok,int8-weight,int8-rtn-g32,int4-rtn-g32,int4-rtn-g32-kernel,"
                   "int2-rtn-g32,gguf-q8_0,gguf-q5_1,gguf-q5_0,gguf-q4_1,gguf-q4_0,w4a8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ref = load_model(args.model)
    batch = fixed_batch(ref.tokenizer, args.batch, args.seq)
    for name in args.configs.split(","):
        t0 = time.perf_counter()
        var = quantize(ref, name)
        build = time.perf_counter() - t0

        def run(m):
            def f():
                with torch.no_grad():
                    m(**batch, use_cache=False)
            return f

        t = interleaved({"ref": run(ref.model), "var": run(var.model)}, repeats=args.repeats)
        emit({"benchmark": "quantize", "model": ref.name, "config": var.quant.name, "build_s": round(build, 2),
              "forward_s": round(t["var"], 3), "reference_forward_s": round(t["ref"], 3),
              "forward_ratio": round(t["var"] / t["ref"], 3), "path": var.quant_info["path"],
              "bits_per_weight": var.quant_info["bits_per_weight"], "model_size_mb": var.quant_info["model_size_mb"],
              **machine()})
        del var
        gc.collect()


if __name__ == "__main__":
    main()
