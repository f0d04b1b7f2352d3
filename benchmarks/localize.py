"""AtP against activation patching: time for every attn/mlp component of one variant, in one run.

Usage: python benchmarks/localize.py [--model default-safety] [--variant gguf-q4_0] [--prompts 8]
                                     [--batch-size 8] [--components attn mlp] [--modes restore inject]
                                     [--refusal-reply TEXT]

Builds the localize inputs (the reference's refusals to the first N harmful test prompts, teacher-forced
refusal log-prob metric), times one plain forward pass of the reference over them (the unit), then AtP (goal:
at most 3 forward-pass equivalents: 2 forwards + 1 backward) and activation patching (2 + modes x components
forwards). Prints one JSON line with wall and process CPU seconds of each, the AtP/patching ratio, AtP in
forward-pass equivalents, and Spearman(AtP, patching).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, machine  # noqa: E402

from trace_lib.attribution import Metric, activation_patch, attribution_patch, metric_values, spearman  # noqa: E402
from trace_lib.attribution.components import components  # noqa: E402
from trace_lib.attribution.inputs import make_batches, reference_refusals  # noqa: E402
from trace_lib.compare import resolve_variant  # noqa: E402
from trace_lib.datasets.registry import get_dataset  # noqa: E402
from trace_lib.models import load_model  # noqa: E402


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default-safety")
    ap.add_argument("--variant", default="gguf-q4_0")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--components", nargs="+", default=["attn", "mlp"])
    ap.add_argument("--modes", nargs="+", default=["restore", "inject"])
    ap.add_argument("--refusal-reply", default=None, help="teacher-force this reply (models that do not refuse)")
    args = ap.parse_args()
    ref = load_model(args.model)
    var = resolve_variant(ref, args.variant)
    harmful = get_dataset("harmful_refusal_v1").split("test").texts("safety")[: args.prompts]
    refusals = reference_refusals(ref, harmful, args.refusal_reply)
    refusals.check()
    kept, replies = refusals.kept
    batches = make_batches(ref.tokenizer, kept, "refusal-logprob", replies, args.batch_size)
    metric = Metric()
    comps = components(ref, args.components)

    def forward():
        with torch.no_grad():
            return [metric_values(ref, b, metric) for b in batches]

    forward()  # warm-up
    _, fwd_s, fwd_cpu = timed(forward)
    atp, atp_s, atp_cpu = timed(lambda: attribution_patch(ref, var, batches, metric, comps))
    run, patch_s, patch_cpu = timed(lambda: activation_patch(ref, var, batches, metric, comps, modes=args.modes))
    mode = "gap_introduced" if "inject" in args.modes else "gap_restored"
    truth = [getattr(r, mode) for r in run.results]
    emit({"benchmark": "localize", "model": args.model, "variant": args.variant, "prompts": len(kept),
          "components": len(comps), "modes": args.modes, "forward_s": round(fwd_s, 3),
          "atp_s": round(atp_s, 3), "atp_cpu_s": round(atp_cpu, 3), "patch_s": round(patch_s, 3),
          "patch_cpu_s": round(patch_cpu, 3), "patch_forwards": run.n_forward,
          "atp_over_patch": round(atp_s / patch_s, 4), "atp_forward_equivalents": round(atp_s / fwd_s, 2),
          "spearman": round(spearman(atp.fraction, truth), 4), "gap": run.gap, **machine()})


if __name__ == "__main__":
    main()
