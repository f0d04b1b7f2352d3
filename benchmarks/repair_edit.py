"""Weight editing on the refusal direction: a sanity check, and edit-before-quantize against quantizing plainly.

Usage: python benchmarks/repair_edit.py [--model default-safety] [--variants gguf-q4_0 int4-rtn-g32]
                                        [--layer N] [--n-eval 0] [--max-new-tokens 64] [--batch-size 8]

1. The reference's refusal direction ``r``: difference in means of the last-token residual, harmful minus
   harmless prompts of harmful_refusal_v1's *train* split, at ``--layer`` or at the block (first 80%) where it
   separates them best (:func:`trace_lib.attribution.inputs.fit_direction`, Arditi et al. 2024).
2. Arms, each replying greedily to the *test* split's harmful and harmless prompts (labelled by trace's
   classifier; refused = label ``refusal``):

   * ``reference``;
   * ``reference+orth``: ``remove_direction(reference, r)``. Sanity: refusal must drop (Arditi et al.);
   * per variant config ``Q``: ``plain`` = ``Q(reference)``;
     ``edit-before-quantize`` = ``restore_direction(Q(remove_direction(reference, r)), r, reference)``: the
     weights' component along ``r`` is taken out before quantizing and put back exactly afterwards (a rank-one
     float32 term per residual writer), so quantization never touches the writes along ``r``;
     ``compensate-after`` = ``restore_direction(Q(reference), r, reference)``: the plain variant's component
     along ``r`` replaced by the reference's.

Prints, per arm, refusal and over-refusal with Wilson 95% intervals, the paired flips against the reference and
against the plain variant (exact McNemar), the mean projection of the harmful prompts' last-token residual on
``r`` at the direction's block relative to the reference's, and how many float values the rank-one terms
hold (``r^T W`` of every residual writer, embeddings included: an upper bound, since the embeddings are not
quantized); then one JSON line. Nothing is assumed: whether editing before quantizing keeps refusal better is what
the numbers say.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, machine  # noqa: E402

from trace_lib.attribution.inputs import fit_direction  # noqa: E402
from trace_lib.capture.prompts import capture_prompts  # noqa: E402
from trace_lib.datasets.registry import get_dataset  # noqa: E402
from trace_lib.metrics.stats import mcnemar_exact, wilson_interval  # noqa: E402
from trace_lib.models import load_model  # noqa: E402
from trace_lib.quant import quantize  # noqa: E402
from trace_lib.repair import Outcomes, measure_outcomes, remove_direction, residual_writers, restore_direction  # noqa: E402,I001


def _rate(flags) -> dict:
    k, n = sum(flags), len(flags)
    lo, hi = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": round(k / n, 4), "ci95": [round(lo, 4), round(hi, 4)]}


def _paired(a: tuple[bool, ...], b: tuple[bool, ...]) -> dict:
    """Prompts refused by ``a`` and not ``b`` (lost), the reverse (gained), and the exact McNemar p-value."""
    lost = sum(x and not y for x, y in zip(a, b))
    gained = sum(y and not x for x, y in zip(a, b))
    return {"lost": lost, "gained": gained, "p": round(mcnemar_exact(lost, gained), 4)}


def _projection(loaded, prompts, r: torch.Tensor, layer: int, batch_size: int) -> float:
    hook = f"blocks.{layer}.hook_resid_post"
    acts = capture_prompts(loaded, prompts, [hook], batch_size=batch_size, description="projection")
    last = acts.per_prompt(acts.acts[hook], "last", "mean")
    return float((last.double() @ r.double()).mean())


def run(ref, variants, harmful_fit, harmless_fit, harmful, harmless, layer=None, max_new_tokens=64,
        batch_size=8) -> dict:
    t0 = time.perf_counter()
    direction = fit_direction(ref, harmful_fit, harmless_fit, layer, batch_size=batch_size)
    r, layer = direction.r_hat, direction.layer
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    arms: dict[str, dict] = {}
    outcomes: dict[str, Outcomes] = {}
    ref_proj = _projection(ref, harmful, r, layer, batch_size)

    def measure(name: str, model, extra_floats: int = 0) -> None:
        out = measure_outcomes(model, harmful, harmless, **kw)
        outcomes[name] = out
        arms[name] = {"model": model.name, "refusal": _rate(out.harmful_refused),
                      "over_refusal": _rate(out.harmless_refused),
                      "projection_kept": round(_projection(model, harmful, r, layer, batch_size) / ref_proj, 4),
                      "rank_one_float_values": extra_floats}
        if name != "reference":
            arms[name]["vs_reference"] = _paired(outcomes["reference"].harmful_refused, out.harmful_refused)
        print(f"{name:<32} refusal {arms[name]['refusal']['rate']:.3f} {arms[name]['refusal']['ci95']}  "
              f"over-refusal {arms[name]['over_refusal']['rate']:.3f}  projection kept "
              f"{arms[name]['projection_kept']:.3f}", flush=True)

    measure("reference", ref)
    orth = remove_direction(ref, r)
    measure("reference+orth", orth)
    rank_one = sum(w.param.numel() // ref.d_model for w in residual_writers(ref))  # r^T W per writer
    for cfg in variants:
        plain = quantize(ref, cfg)
        measure(f"{cfg} plain", plain)
        measure(f"{cfg} compensate-after", restore_direction(plain, r, ref), rank_one)
        del plain
        gc.collect()
        q_orth = quantize(orth, cfg)
        measure(f"{cfg} edit-before-quantize", restore_direction(q_orth, r, ref), rank_one)
        del q_orth
        gc.collect()
        base = outcomes[f"{cfg} plain"].harmful_refused
        for arm in ("compensate-after", "edit-before-quantize"):
            arms[f"{cfg} {arm}"]["vs_plain"] = _paired(base, outcomes[f"{cfg} {arm}"].harmful_refused)
    return {"direction": direction.to_dict(), "n_harmful": len(harmful), "n_harmless": len(harmless),
            "arms": arms, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default-safety")
    ap.add_argument("--variants", nargs="+", default=["gguf-q4_0", "int4-rtn-g32"])
    ap.add_argument("--layer", type=int, default=None, help="the direction's block (default: best Cohen's d)")
    ap.add_argument("--n-eval", type=int, default=0, help="first N test prompts of each kind (0: all)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    ref = load_model(args.model)
    data = get_dataset("harmful_refusal_v1")
    train, test = data.split("train"), data.split("test")
    n = args.n_eval or None
    result = run(ref, args.variants, train.texts("safety"), train.texts("baseline"), test.texts("safety")[:n],
                 test.texts("baseline")[:n], args.layer, args.max_new_tokens, args.batch_size)
    d = result["direction"]
    print(f"refusal direction: block {d['layer']} (Cohen's d {d['cohens_d']:.2f}, {d['chosen_by']})")
    ref_rate = result["arms"]["reference"]["refusal"]["rate"]
    orth_rate = result["arms"]["reference+orth"]["refusal"]["rate"]
    print(f"sanity: removing the direction {'lowers' if orth_rate < ref_rate else 'does NOT lower'} refusal "
          f"({ref_rate:.3f} -> {orth_rate:.3f})")
    for cfg in args.variants:
        a = result["arms"]
        print(f"{cfg}: plain {a[f'{cfg} plain']['refusal']['rate']:.3f}, edit-before-quantize "
              f"{a[f'{cfg} edit-before-quantize']['refusal']['rate']:.3f} (vs plain "
              f"{a[f'{cfg} edit-before-quantize']['vs_plain']}), compensate-after "
              f"{a[f'{cfg} compensate-after']['refusal']['rate']:.3f} (vs plain {a[f'{cfg} compensate-after']['vs_plain']})")
    emit({"benchmark": "repair_edit", "model": args.model, "variants": args.variants,
          "command": shlex.join(["python", "benchmarks/repair_edit.py", *sys.argv[1:]]), **result, **machine()})


if __name__ == "__main__":
    main()
