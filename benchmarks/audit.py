"""Audit wall time: first run and cached run, and the audit's time against its forward passes.

Usage: python benchmarks/audit.py [--model default-safety] [--cache DIR] [--dataset NAME]
Runs the default `trace audit` (safety_comprehensive_v1, the SAEs shipped with default-safety at six hooks)
twice in one process against a fresh cache folder (the converted model is copied in, so conversion is not
counted), and prints one JSON line: first-run seconds (goal < 180: no SAE training), cached-run seconds
(goal < 90), the per-part reference-side timings, and audit time / forward-pass time of the cached run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import emit, machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default-safety")
    ap.add_argument("--cache", default=None, help="cache folder to use (default: a fresh temporary one)")
    ap.add_argument("--dataset", default=None, help="prompt dataset (default: the audit's, safety_comprehensive_v1)")
    args = ap.parse_args()
    cache = Path(args.cache or tempfile.mkdtemp(prefix="trace-bench-"))
    src = Path(os.environ.get("TRACE_CACHE", Path.home() / ".cache" / "trace-lib")) / "models"
    if src.is_dir() and not (cache / "models").exists():
        shutil.copytree(src, cache / "models")  # model conversion is a one-off, not part of the audit
        for f in ("file-hashes.json",):
            if (src.parent / f).is_file():
                shutil.copy(src.parent / f, cache / f)
    os.environ["TRACE_CACHE"] = str(cache)
    import trace_lib as trace

    runs = []
    for label in ("first", "cached"):
        t = time.perf_counter()
        audit = trace.Audit(args.model)
        result = audit.trace_features(args.dataset) if args.dataset else audit.trace_features()
        runs.append((label, time.perf_counter() - t, result))
    first, cached = runs[0][1], runs[1][1]
    timing = runs[1][2].timing
    emit({"benchmark": "audit", "model": args.model, "variants": [v.name for v in runs[1][2].variants],
          "first_run_s": round(first, 1), "cached_run_s": round(cached, 1),
          "cached_forward_s": timing["forward_s"], "cached_audit_s": timing["audit_s"],
          "audit_over_forward": timing["audit_over_forward"],
          "first_timing": {k: v for k, v in runs[0][2].timing.items() if k.endswith("_s")},
          "cached_timing": {k: v for k, v in timing.items() if k.endswith("_s")},
          "dataset": runs[1][2].dataset["name"], "hooks": runs[1][2].settings["hooks"],
          "held_out_auroc": {c: e.get("score_auroc") for c, e in runs[1][2].fingerprint["reference_eval"].items()},
          "safety_cpfr": {v.name: round(v.safety_cpfr, 4) for v in runs[1][2].variants},
          "capability_cpfr": {v.name: round(v.capability_cpfr, 4) for v in runs[1][2].variants},
          "cache": str(cache), **machine()})


if __name__ == "__main__":
    main()
