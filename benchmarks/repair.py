"""`trace repair` end to end: its wall time, the forward passes and generation runs it spent, and what it chose.

Usage: python benchmarks/repair.py [--model default-safety] [--variant gguf-q4_0] [--max-bpw X] [--confirm-baselines]
                                  [--method precision|steer|edit|all|steer,edit]
Runs the search once (caches warm or cold as they are: say which in the record) and prints one JSON line: total
seconds (goal < 1200 on 2 cores) split by phase, the counts (metric evaluations, generation runs,
quantizations), the cheapest budget at which each method restores the train bar, and the chosen config with its
test-split refusal and over-refusal against the reference's.
"""

from __future__ import annotations

import argparse
import tempfile

from _common import emit, machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default-safety")
    ap.add_argument("--variant", default="gguf-q4_0")
    ap.add_argument("--max-bpw", type=float, default=None)
    ap.add_argument("--confirm-baselines", action="store_true")
    ap.add_argument("--no-audit", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--method", default="precision", help="precision, steer, edit, all, or a comma list")
    args = ap.parse_args()
    from trace_lib.repair import repair
    from trace_lib.repair.restore import KINDS

    out = args.out or tempfile.mkdtemp(prefix="trace-repair-")
    r = repair(args.model, args.variant, max_bpw=args.max_bpw, confirm_baselines=args.confirm_baselines,
               with_audit=not args.no_audit, out_dir=out, log=print,
               kinds=KINDS if args.method == "all" else tuple(args.method.split(",")))
    r.save(f"{out}/repair.json")
    c = r.chosen or {}
    emit({"benchmark": "repair", "model": args.model, "variant": args.variant, "seconds": r.seconds,
          "counts": r.counts, "reached": r.reached, "target_bpw": r.target["bpw"],
          "reference_refusal": r.test["reference"]["refusal"], "target_refusal": r.test["target"]["refusal"],
          "chosen": {k: c.get(k) for k in ("config", "bpw", "extra_bpw", "method")} | (
              {"refusal": c["acceptance"]["refusal"], "over_refusal": c["acceptance"]["over_refusal"],
               "refusal_p": c["acceptance"]["refusal_p"], "n_modules": len(c["modules"]),
               "audit": c.get("audit")} if c else {}),
          "confirmations": [{k: x[k] for k in ("method", "extra_bpw", "restored_train")}
                            | {"accepted": x["acceptance"]["accepted"], "refusal": x["acceptance"]["refusal"]}
                            for x in r.confirmations],
          "restorations": [{k: x[k] for k in ("method", "extra_bpw", "restored_train", "kld")}
                           | {k: x["acceptance"][k] for k in ("accepted", "refusal", "over_refusal", "refusal_p",
                                                               "over_refusal_p")}
                           | ({"strength": x["details"]["strength"]} if x["method"] == "steer" else {})
                           for x in r.restorations], "direction": r.direction,
          "files": r.files, "out": out, **machine()})


if __name__ == "__main__":
    main()
