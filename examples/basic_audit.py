"""A simple audit of a quantized model: does int4 weight quantization damage the refusal features?

    python examples/basic_audit.py                       # default-safety against int4-rtn-g32
    python examples/basic_audit.py --model default --variant gguf-q4_0 --sae path/to/saes

The first run trains the SAEs (a few minutes on a CPU, then cached under $TRACE_CACHE).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import trace_lib as trace


def main(model: str = "default-safety", variant: str = "int4-rtn-g32", sae: str | None = None,
         out: str = "trace-out/basic_audit.json", **audit_kw) -> trace.AuditResult:
    audit = trace.Audit(base_model=model, quant_model=variant, **audit_kw)
    if sae:
        audit.load_sae(sae)              # SAELens or sparsify folders
    else:
        audit.train_sae()                # trained once on the reference, then read from the cache
    results = audit.trace_features(dataset="harmful_refusal_v1")
    print(results.summary())
    v = results.variants[0]
    print(f"\nsafety CPFR {v.safety_cpfr:.3f} vs capability CPFR {v.capability_cpfr:.3f}; "
          f"{len(v.degraded('safety'))} safety features below CPFR {results.settings['degradation_threshold']}")
    print(f"wrote {results.save(Path(out))}")
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default-safety")
    ap.add_argument("--variant", default="int4-rtn-g32")
    ap.add_argument("--sae", default=None, help="folder of SAEs (default: train or use cached)")
    ap.add_argument("--out", default="trace-out/basic_audit.json")
    a = ap.parse_args()
    main(a.model, a.variant, a.sae, a.out)
