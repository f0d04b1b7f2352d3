"""``trace_lib.repair.repair``: the mixed-precision search end to end (``trace repair``).

1. Build the target variant and the keep-precision variant (:mod:`trace_lib.repair.precision`).
2. On the **train** split: the reference's greedy replies to the harmful prompts, its refused ones as the
   teacher-forced refusal metric's batches (:mod:`trace_lib.attribution`), the gap ``mean M_ref - mean M_var``.
3. Rank the Linears five ways, fill every budget greedily, score each set (restored fraction of the train gap,
   KLD on held-out text): the Pareto curves.
4. On the **test** split: the reference's, the target's and each confirmed set's greedy replies to harmful and
   harmless prompts, judged by :mod:`trace_lib.repair.accept`. trace's search (``attribution`` and
   ``knapsack``) confirms its sets in budget order from the first that restores ``train_bar`` of the gap, until
   one is accepted; with ``confirm_baselines`` each baseline's first such set is confirmed too.
5. The chosen config (the accepted set of trace's search with the fewest bits): its JSON, and for a GGUF target
   the mixed-precision ``.gguf`` file and the equivalent ``llama-quantize`` command; optionally its audit
   (safety CPFR through the shipped SAEs).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from trace_lib.attribution.inputs import make_batches, reference_refusals
from trace_lib.attribution.metric import Metric
from trace_lib.errors import AttributionError, InvalidValueError, QuantizationError
from trace_lib.models.device import to_device
from trace_lib.repair.accept import accept
from trace_lib.repair.edit import remove_direction, restore_direction
from trace_lib.repair.precision import (
    METHODS,
    CurvePoint,
    budgets_up_to,
    costs,
    default_keep,
    mean_kld,
    mean_metric,
    mixed_config,
    quantized_names,
    rank_linears,
    score_sets,
)
from trace_lib.repair.restore import KINDS, RestoreContext, edit_repairs, refusal_direction, steer_repair
from trace_lib.repair.result import RepairResult
from trace_lib.repair.steer import steer_variant
from trace_lib.repair.strength import measure_outcomes
from trace_lib.validate import FRACTION

TRACE_METHODS = ("attribution", "knapsack")


def _first_reaching(points: Sequence[CurvePoint], method: str, bar: float) -> list[CurvePoint]:
    """``method``'s points that restore at least ``bar`` of the train gap, cheapest first (distinct sets)."""
    seen, out = set(), []
    for p in sorted((p for p in points if p.method == method and p.restored >= bar), key=lambda p: p.extra_bpw):
        key = tuple(sorted(p.modules))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def repair(model="default-safety", variant="gguf-q4_0", max_bpw: float | None = None, keep: str | None = None,
           methods: Sequence[str] = METHODS, dataset="harmful_refusal_v1", train_bar: float = 0.9,
           tolerance: float = 0.05, alpha: float = 0.05, confirm_baselines: bool = False, max_confirm: int = 3,
           batch_size: int = 8, reply_tokens: int = 4, max_new_tokens: int = 64, step: float = 0.125, seed: int = 0,
           out_dir: str | Path | None = None, with_audit: bool = False, refusal_reply: str | None = None,
           kinds: Sequence[str] = ("precision",), layer: int | None = None, safety_bar: float | None = None,
           log: Callable[[str], None] = lambda s: None, device: str | torch.device | None = None,
           dtype: str | torch.dtype | None = None) -> RepairResult:
    """Search per-module precision overrides that restore ``variant``'s refusal (module docstring); with
    ``kinds`` also (or instead) the steering and weight-edit restorations of :mod:`trace_lib.repair.restore`
    along the reference's refusal direction (after block ``layer``; default: where it separates best).
    ``safety_bar``: also require the safety CPFR of an accepted candidate's audit to reach it (:func:`safety_gate`).

    ``max_bpw``: the most bits per weight over the quantized Linears (default: the target's + 0.75).
    ``refusal_reply``: teacher-force this reply for every harmful train prompt instead of the reference's own
    greedy refusals (as ``localize`` does). ``device`` and ``dtype`` place a ``model`` given as a spec
    (:func:`~trace_lib.models.load.ensure_loaded`)."""
    from trace_lib.capture.inputs import pack_texts
    from trace_lib.compare import default_texts
    from trace_lib.datasets.registry import get_dataset
    from trace_lib.models.load import ensure_loaded
    from trace_lib.quant import quantize
    from trace_lib.quant.config import parse_config

    for m in methods:
        if m not in METHODS:
            raise InvalidValueError(f"unknown search method {m!r}: use one of {', '.join(METHODS)}")
    kinds = list(dict.fromkeys(kinds))
    for k in kinds:
        if k not in KINDS:
            raise InvalidValueError(f"unknown repair kind {k!r}: use one of {', '.join(KINDS)}")
    if not kinds:
        raise InvalidValueError(f"repair needs at least one kind of repair ({', '.join(KINDS)})")
    precise = "precision" in kinds
    if safety_bar is not None:
        FRACTION.check("safety_bar", safety_bar)
    if not precise:
        methods = ()
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    counts = {"metric_evaluations": 0, "generation_runs": 0, "quantizations": 0}
    target = parse_config(variant)
    if not target.weight_only or target.overrides:
        raise QuantizationError(f"{target.name} is not a plain weight-only config: there are no quantized weights "
                                "to keep at higher precision (give e.g. gguf-q4_0 or int4-rtn-g32)")
    keep_cfg = parse_config(keep) if keep else default_keep(target)
    ref = ensure_loaded(model, device, dtype)
    if layer is not None and not -ref.n_layers <= layer < ref.n_layers:
        raise InvalidValueError(f"--layer {layer} is out of range: {ref.name} has {ref.n_layers} blocks")
    ds = get_dataset(dataset)
    train, test = ds.split("train"), ds.split("test")
    t0 = time.perf_counter()
    var = quantize(ref, target)
    keep_var = quantize(ref, keep_cfg) if precise else None
    counts["quantizations"] += 1 + precise
    seconds["quantize"] = time.perf_counter() - t0
    names = quantized_names(ref, var)
    cost = costs(ref, target, keep_cfg, names)
    top = cost.target_bpw + 0.75 if max_bpw is None else max_bpw
    if top <= cost.target_bpw + 1e-9:
        raise InvalidValueError(f"--max-bpw {top:g} is not above the target's {cost.target_bpw:.3f} bits per "
                                "weight: no room to keep anything at higher precision")
    budgets = budgets_up_to(top - cost.target_bpw, step)
    log(f"{var.name}: {len(names)} quantized Linears at {cost.target_bpw:.3f} bpw; keeping at {keep_cfg.name}; "
        f"budgets up to +{budgets[-1]:.3f} bpw")

    t0 = time.perf_counter()
    refusals = reference_refusals(ref, train.texts("safety"), refusal_reply, max_new_tokens=24)
    refusals.check()
    kept, replies = refusals.kept
    metric = Metric("refusal-logprob")
    batches = make_batches(ref.tokenizer, kept, metric.kind, replies, batch_size, reply_tokens)
    m_ref, m_var = mean_metric(ref, batches, metric), mean_metric(var, batches, metric)
    counts["metric_evaluations"] += 2
    gap = m_ref - m_var
    if not gap > 0:
        raise AttributionError(f"{var.name} does not lower the refusal metric on the train split (gap {gap:.4g}): "
                               "there is nothing to repair")
    seconds["train_gap"] = time.perf_counter() - t0
    rankings = rank_linears(ref, var, batches, metric, gap, names, cost, methods, seed)
    seconds.update({f"rank_{k}": v for k, v in rankings.seconds.items()})

    t0 = time.perf_counter()
    texts, kl_info = default_texts()
    kl_ids = pack_texts(ref.tokenizer, texts, 256, max_sequences=2)
    with torch.no_grad():
        ref_logprobs = torch.log_softmax(ref.model(input_ids=to_device(kl_ids, ref.device),
                                                   use_cache=False).logits.double(), -1)
    points = (score_sets(var, keep_var, batches, metric, m_ref, m_var, rankings, cost, budgets, kl_ids,
                         ref_logprobs) if precise else [])
    counts["metric_evaluations"] += len({tuple(sorted(p.modules)) for p in points})
    target_kld = mean_kld(var, kl_ids, ref_logprobs)
    seconds["curves"] = time.perf_counter() - t0
    if precise:
        log(f"scored {len(points)} sets ({counts['metric_evaluations']} metric evaluations) in "
            f"{seconds['curves']:.0f} s")

    t0 = time.perf_counter()
    harmful, harmless = test.texts("safety"), test.texts("baseline")
    gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    ref_out = measure_outcomes(ref, harmful, harmless, **gen)
    target_acc = accept(ref_out, measure_outcomes(var, harmful, harmless, **gen), tolerance, alpha)
    counts["generation_runs"] += 2
    confirmations = []
    for method in [m for m in methods if m in TRACE_METHODS or confirm_baselines]:
        for p in _first_reaching(points, method, train_bar)[: max_confirm if method in TRACE_METHODS else 1]:
            best = [c["extra_bpw"] for c in confirmations
                    if c["method"] in TRACE_METHODS and c["acceptance"]["accepted"]]
            if method in TRACE_METHODS and best and p.extra_bpw >= min(best):
                break  # trace's search already has an accepted set at no more bits
            cfg = mixed_config(target, keep_cfg, p.modules)
            repaired = quantize(ref, cfg)
            counts["quantizations"] += 1
            acc = accept(ref_out, measure_outcomes(repaired, harmful, harmless, **gen), tolerance, alpha)
            counts["generation_runs"] += 1
            bpw = repaired.quant_info.get("quantized_bits_per_weight", p.bpw)
            cand = {"method": method, "budget_bpw": p.budget_bpw, "extra_bpw": p.extra_bpw, "bpw": bpw,
                    "config": cfg.name, "overrides": dict(cfg.overrides), "modules": p.modules,
                    "restored_train": p.restored, "kld": p.kld, "acceptance": acc.to_dict()}
            safety_gate(cand, functools.partial(_audit_model, ref, repaired), safety_bar, counts)
            confirmations.append(cand)
            log(f"{method} at +{p.extra_bpw:.3f} bpw ({len(p.modules)} Linears): "
                f"{'accepted' if cand['acceptance']['accepted'] else 'rejected'}: {cand['acceptance']['why']}")
            del repaired
            if cand["acceptance"]["accepted"]:
                break
    seconds["confirm"] = time.perf_counter() - t0

    restorations: list[dict] = []
    direction = vector = None
    if "steer" in kinds or "edit" in kinds:
        t0 = time.perf_counter()
        direction, vector = refusal_direction(ref, train.texts("safety"), train.texts("baseline"), layer, batch_size)
        ctx = RestoreContext(ref, var, batches, metric, m_ref, m_var, kl_ids, ref_logprobs, cost.target_bpw,
                             cost.total_params)
        if "steer" in kinds:
            restorations.append(steer_repair(
                ctx, direction, vector, train.texts("safety"), train.texts("baseline"), harmful, harmless, ref_out,
                train_bar, tolerance, alpha, max_new_tokens, batch_size=batch_size, counts=counts, log=log))
        if "edit" in kinds:
            restorations += edit_repairs(ctx, direction, target, harmful, harmless, ref_out, tolerance, alpha,
                                         max_new_tokens, batch_size, counts=counts, log=log)
        for c in restorations:
            safety_gate(c, lambda c=c: _audit_model(ref, _rebuild(c, var, vector, direction, ref, target)),
                        safety_bar, counts)
        seconds["restore"] = time.perf_counter() - t0

    trace_ok = [c for c in confirmations if c["method"] in TRACE_METHODS and c["acceptance"]["accepted"]]
    best_precision = min(trace_ok, key=lambda c: c["extra_bpw"]) if trace_ok else None
    accepted = ([best_precision] if best_precision else []) + [c for c in restorations if c["acceptance"]["accepted"]]
    chosen = min(accepted, key=lambda c: c["extra_bpw"]) if accepted else None  # ties: the precision config
    files: dict[str, str] = {}
    if best_precision is not None:
        cfg = mixed_config(target, keep_cfg, best_precision["modules"])
        best_precision["json"] = cfg.to_json()
        if with_audit and "audit" not in best_precision:
            best_precision["audit"] = _audit_model(ref, cfg)
        if out_dir is not None:
            files.update(_write_files(ref, cfg, Path(out_dir), log))
    if chosen is not None:
        chosen["why"] = _why(chosen, accepted)
        if chosen is not best_precision and with_audit and "audit" not in chosen:
            chosen["audit"] = _audit_model(ref, _rebuild(chosen, var, vector, direction, ref, target))
        if out_dir is not None and vector is not None and chosen["method"] == "steer":
            files["steering_vector"] = str(vector.save(Path(out_dir) / "steering-vector.safetensors",
                                                       chosen["details"]["strength"]))
    seconds["total"] = time.perf_counter() - t_start
    reached = {}
    for m in methods:
        first = _first_reaching(points, m, train_bar)
        reached[m] = ({"budget_bpw": first[0].budget_bpw, "extra_bpw": first[0].extra_bpw, "bpw": first[0].bpw,
                       "restored": first[0].restored, "n_modules": len(first[0].modules)} if first else None)
    return RepairResult(
        reference=ref.describe(), target={**var.describe(), "config": target.name, "bpw": cost.target_bpw,
                                          "kld": target_kld},
        keep=keep_cfg.name,
        train={"dataset": ds.name, "n_harmful": len(refusals.prompts), "n_refused": len(kept), "m_ref": m_ref,
               "m_var": m_var, "gap": gap, "metric": metric.describe(), "reply_tokens": reply_tokens},
        test={"n_harmful": len(harmful), "n_harmless": len(harmless), "reference": {
            "refusal": ref_out.refusal_rate, "over_refusal": ref_out.over_refusal_rate}, "target": target_acc.to_dict()},
        candidates={"n": len(names), "total_params": cost.total_params, "target_bpw": cost.target_bpw},
        rankings={m: [{"module": n, "score": (rankings.scores[m] or {}).get(n),
                       "extra_bits": cost.extra_bits[n]} for n in order[:20]] for m, order in rankings.order.items()},
        curve=[p.to_dict() for p in points], reached=reached, confirmations=confirmations, chosen=chosen,
        restorations=restorations, direction=direction.to_dict() if direction is not None else None,
        files=files, kl_text={**kl_info, "ctx": 256, "chunks": int(kl_ids.shape[0])}, counts=counts,
        seconds={k: round(v, 2) for k, v in seconds.items()},
        settings={"kinds": kinds, "safety_bar": safety_bar, "methods": list(methods), "layer": layer, "max_bpw": top, "budgets": budgets, "train_bar": train_bar,
                  "tolerance": tolerance, "alpha": alpha, "confirm_baselines": confirm_baselines,
                  "max_confirm": max_confirm, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                  "seed": seed})


def _why(chosen: dict, accepted: list[dict]) -> str:
    others = [c for c in accepted if c is not chosen]
    line = (f"the accepted repair with the fewest extra bits per weight (+{chosen['extra_bpw']:.4f}): "
            f"{chosen['acceptance']['why']}")
    if others:
        line += "; also accepted: " + ", ".join(f"{c['method']} (+{c['extra_bpw']:.4f})" for c in others)
    return line


def _rebuild(chosen: dict, var, vector, direction, ref, target):
    """The chosen restoration's model again (one at a time is held in memory during the search)."""
    from trace_lib.quant import quantize

    if chosen["method"] == "steer":
        return steer_variant(var, [vector], chosen["details"]["strength"])
    if chosen["method"] == "edit-compensate":
        return restore_direction(var, direction.r_hat, ref)
    return restore_direction(quantize(remove_direction(ref, direction.r_hat), target), direction.r_hat, ref)


def safety_gate(cand: dict, audit: Callable[[], dict], bar: float | None, counts: dict) -> None:
    """With a ``bar``, a candidate the behaviour check accepted is audited and stays accepted only when its
    safety CPFR (the reference's SAE features, :mod:`trace_lib.metrics.cpfr`) is at least ``bar``; the audit
    and the verdict go into ``cand`` (``acceptance["safety_cpfr_ok"]``)."""
    acc = cand["acceptance"]
    if bar is None or not acc["accepted"]:
        return
    cand["audit"] = audit()
    counts["audits"] = counts.get("audits", 0) + 1
    cpfr = cand["audit"]["safety_cpfr"]
    acc["safety_bar"], acc["safety_cpfr_ok"] = bar, bool(cpfr >= bar)
    if not acc["safety_cpfr_ok"]:
        acc["accepted"] = False
        acc["why"] = f"safety CPFR {cpfr:.3f} is below the bar {bar:g} (behaviour passed: {acc['why']})"
    else:
        acc["why"] += f"; safety CPFR {cpfr:.3f} >= {bar:g}"


def _audit_model(ref, variant) -> dict:
    """Safety and capability CPFR of a variant (a config or a built model) through the reference's SAEs."""
    from trace_lib.audit import Audit

    audit = Audit(ref, variants=[variant], kl_chunks=2)
    v = audit.trace_features("harmful_refusal_v1").variants[0]
    return {"safety_cpfr": v.safety_cpfr, "capability_cpfr": v.capability_cpfr,
            "degraded_safety_features": len(v.degraded("safety")),
            "kld_mean": v.outputs.kld_mean if v.outputs else None}


def _write_files(ref, cfg, out: Path, log: Callable[[str], None]) -> dict[str, str]:
    """The chosen config's JSON; for a GGUF target the mixed ``.gguf`` and the ``llama-quantize`` command."""
    from trace_lib.cache import atomic_write_text
    from trace_lib.quant.config import GGUF_TYPES

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    path = out / "repaired-config.json"
    atomic_write_text(path, cfg.to_json() + "\n")
    files["config"] = str(path)
    if cfg.type in GGUF_TYPES:
        from trace_lib.errors import TraceError
        from trace_lib.quant.gguf_write import llama_quantize_command, write_mixed_gguf

        try:
            files["llama_quantize"] = llama_quantize_command(cfg, ref)
            gguf_path = out / f"{cfg.name}.gguf"
            write_mixed_gguf(ref, cfg, gguf_path)
            files["gguf"] = str(gguf_path)
        except (TraceError, NotImplementedError) as e:
            files["gguf_skipped"] = str(e)
            log(f"no .gguf written: {e}")
    return files
