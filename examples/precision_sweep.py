"""A precision sweep: which is the smallest config whose safety features survive?

    python examples/precision_sweep.py                          # the weight ladder, 16 down to 2 bits
    python examples/precision_sweep.py --ladder gguf --min-cpfr 0.8

Prints the per-config table, the safety-vs-capability decay curve and the recommended config, and writes the
sweep as JSON and as a self-contained HTML report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trace_lib import OptimizationAuditor
from trace_lib.report import write_html


def main(model: str = "default-safety", ladder: str | None = "weights", configs: list | None = None,
         min_cpfr: float = 0.9, sae: str | None = None, out: str = "trace-out/precision_sweep", **audit_kw):
    auditor = OptimizationAuditor(model, **audit_kw)
    if sae:
        auditor.audit.load_sae(sae)
    results = auditor.run_sweep(configs=configs, ladder=None if configs else ladder, min_cpfr=min_cpfr)
    print(results.summary())
    for name, points in results.decay_curves().items():
        print(f"\ndecay curve ({name}): bits -> safety CPFR / capability CPFR")
        for p in points:
            print(f"  {p['bits']:5.2f}  {p['config']:<16} {p['safety_cpfr']:.3f} / {p['capability_cpfr']:.3f}")
    best = results.best_config()
    print(f"\nrecommended: {best.name or 'none'}")
    folder = Path(out)
    print(f"wrote {results.save(folder / 'sweep.json')} and {write_html(results, folder / 'sweep.html')}")
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default-safety")
    ap.add_argument("--ladder", default="weights", help="weights | activations | gguf | all")
    ap.add_argument("--min-cpfr", type=float, default=0.9)
    ap.add_argument("--sae", default=None)
    ap.add_argument("--out", default="trace-out/precision_sweep")
    ap.add_argument("--config", action="append", default=None, help="config names instead of a ladder; repeatable")
    a = ap.parse_args()
    # configs may also be QuantizationConfig objects, as in the seed:
    # [QuantizationConfig(QuantizationType.INT8_DYNAMIC), QuantizationConfig(QuantizationType.INT4_RTN, bits=4, group_size=32)]
    main(a.model, a.ladder, a.config, a.min_cpfr, a.sae, a.out)
