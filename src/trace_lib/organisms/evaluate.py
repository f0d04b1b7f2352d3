"""How well the safety organism refuses, and how close to its base it stays.

:func:`evaluate_organism` measures, on held-out data only:

* **Refusal** -- greedy replies (chat template, ``max_new_tokens`` new tokens, batches of ``batch_size`` as
  :func:`trace_lib.redteam.generate`) to the TEST split of ``harmful_refusal_v1``: the refusal rate on the
  harmful prompts and the over-refusal rate on their paired harmless prompts, each ``k/n`` with a Wilson 95%
  interval, and the incoherent counts; labels by :func:`trace_lib.redteam.classify_reply`. The same for the
  base, for comparison. Optionally (``extra_harmless``) the over-refusal rate on the test prompts of other
  benign datasets (``safety_warning_v1``: requests that only need a warning).
* **Neutral text** -- llama.cpp's KL statistics of the organism against the base on the built-in English
  corpus (:func:`trace_lib.compare.compare_outputs`, ``kl_ctx`` tokens x ``kl_chunks`` chunks, second halves
  scored): mean KLD ± its uncertainty, 99th percentile, same-top-token rate, PPL ratio.
* **Capability closeness** on the ``capability_v1`` test prompts (code, arithmetic, facts, translation,
  reasoning):

  - ``prefix_match_rate``: share of prompts whose greedy answer (``capability_new_tokens`` new tokens) has the
    same first ``capability_match_tokens`` tokens as the base's (both answers re-tokenized; an answer shorter
    than that must match in full);
  - ``exact_match_rate``: share of prompts with the identical answer text;
  - ``answer_kld_mean``: the mean over the base's own answer tokens (teacher-forced: prompt + the base's
    greedy answer fed to both models) of KL(P_base || P_organism) of the next-token distribution, pooled over
    all answer tokens of all prompts; ``answer_same_top_rate``: the share of those positions where both models'
    top token is the same;
  - ``refusals``: capability prompts the organism refuses (should be none).

* **Sample check** -- a fixed stratified sample of the test split (``sample_n`` prompts: one harmful and one
  harmless per category for 24), generated alone with the cache off; its per-prompt labels go in BUILD.json so
  a test can check that the shipped adapter reproduces them exactly (greedy decoding is deterministic).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from trace_lib.metrics.divergence import kl_from_log_probs
from trace_lib.metrics.stats import wilson_interval
from trace_lib.models.device import to_device
from trace_lib.organisms.data import Example, collate, tokenize_example
from trace_lib.redteam.classify import classify_reply
from trace_lib.redteam.generate import generate


@dataclass
class EvalConfig:
    n: int | None = None              # prompts per side of the test split (None: all; a stratified sample)
    max_new_tokens: int = 64
    batch_size: int = 8
    kl_ctx: int = 256
    kl_chunks: int = 8
    capability_new_tokens: int = 48
    capability_match_tokens: int = 32
    other_n: int | None = None        # first n test prompts of capability_v1 and of each extra dataset (None: all)
    sample_n: int = 24
    extra_harmless: tuple[str, ...] = ("safety_warning_v1",)
    include_base: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["extra_harmless"] = list(self.extra_harmless)
        return d


def rate(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": k / n if n else float("nan"), "ci95": [lo, hi]}


def held_out_prompts(n: int | None = None) -> tuple[list, list]:
    """(harmful, harmless) prompts of the harmful_refusal_v1 test split; ``n`` per side as a stratified sample."""
    from trace_lib.datasets import get_dataset

    test = get_dataset("harmful_refusal_v1").split("test")
    if n is not None:
        test = test.sample(2 * n, seed=0)
    return ([p for p in test.prompts if p.label == "safety"], [p for p in test.prompts if p.label == "baseline"])


def sample_prompts(sample_n: int = 24) -> list:
    """The fixed sample of the sample check: ``test.sample(sample_n, seed=0)`` in dataset order."""
    from trace_lib.datasets import get_dataset

    return list(get_dataset("harmful_refusal_v1").split("test").sample(sample_n, seed=0).prompts)


def refusal_behaviour(loaded, harmful: list, harmless: list, max_new_tokens: int = 64, batch_size: int = 8,
                      cache: bool = True) -> dict:
    """Refusal and over-refusal of ``loaded`` on the given prompts (one generation run over all of them)."""
    prompts = list(harmful) + list(harmless)
    run = generate(loaded, [p.text for p in prompts], max_new_tokens=max_new_tokens, batch_size=batch_size,
                   cache=cache, description="evaluating replies")
    labels = [classify_reply(t) for t in run.replies]
    nh = len(harmful)
    h_lab = [lab.label for lab in labels[:nh]]
    b_lab = [lab.label for lab in labels[nh:]]
    return {
        "refusal_rate": rate(h_lab.count("refusal"), nh),
        "over_refusal_rate": rate(b_lab.count("refusal"), len(harmless)),
        "incoherent": {"harmful": h_lab.count("incoherent"), "harmless": b_lab.count("incoherent")},
        "labels": {p.id: lab.label for p, lab in zip(prompts, labels)},
        "replies": [{"model": loaded.name, "id": p.id, "label_kind": "harmful" if i < nh else "harmless",
                     "category": p.category, "prompt": p.text, "reply": r, "label": lab.label, "reason": lab.reason}
                    for i, (p, r, lab) in enumerate(zip(prompts, run.replies, labels))],
    }


def sample_check(loaded, sample_n: int = 24, max_new_tokens: int = 64, batch_size: int = 8) -> dict:
    """Labels on the fixed sample, generated without the cache (what the slow test recomputes)."""
    prompts = sample_prompts(sample_n)
    harmful = [p for p in prompts if p.label == "safety"]
    harmless = [p for p in prompts if p.label == "baseline"]
    r = refusal_behaviour(loaded, harmful, harmless, max_new_tokens, batch_size, cache=False)
    return {"sample_n": sample_n, "seed": 0, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "refusals_harmful": r["refusal_rate"]["k"], "n_harmful": len(harmful),
            "refusals_harmless": r["over_refusal_rate"]["k"], "n_harmless": len(harmless), "labels": r["labels"]}


def answer_kld(base, organism, prompts: list[str], answers: list[str], ended: list[bool],
               batch_size: int = 8) -> dict:
    """Teacher-forced KL(P_base || P_organism) over the base's answer tokens (see the module docstring)."""
    tok = base.tokenizer
    rows = [tokenize_example(tok, Example(str(i), "", "answer", "", p, a, e), max_len=512)
            for i, (p, a, e) in enumerate(zip(prompts, answers, ended))]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    total, n, same = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i:i + batch_size], pad)
            sel = batch["labels"][:, 1:] != -100
            kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            lb = torch.log_softmax(base.model(**to_device(kw, base.device), use_cache=False).logits[:, :-1]
                                   [sel.to(base.device)].float().cpu(), -1)
            lo = torch.log_softmax(organism.model(**to_device(kw, organism.device), use_cache=False).logits[:, :-1]
                                   [sel.to(organism.device)].float().cpu(), -1)
            total += float(kl_from_log_probs(lb, lo, reduction="sum"))
            n += int(sel.sum())
            same += int((lb.argmax(-1) == lo.argmax(-1)).sum())
    return {"answer_kld_mean": total / n if n else float("nan"), "answer_tokens": n,
            "answer_same_top_rate": same / n if n else float("nan")}


def capability_closeness(organism, base, config: EvalConfig) -> dict:
    from trace_lib.datasets import get_dataset

    prompts = [p.text for p in get_dataset("capability_v1").split("test").prompts][:config.other_n]
    kw = {"max_new_tokens": config.capability_new_tokens, "batch_size": config.batch_size}
    b = generate(base, prompts, description="capability answers", **kw)
    o = generate(organism, prompts, description="capability answers", **kw)
    tok = base.tokenizer
    m = config.capability_match_tokens

    def first(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"][:m]

    prefix = sum(first(x) == first(y) for x, y in zip(b.replies, o.replies))
    exact = sum(x == y for x, y in zip(b.replies, o.replies))
    kld = answer_kld(base, organism, prompts, b.replies,
                     [k < config.capability_new_tokens for k in b.n_new_tokens], config.batch_size)
    o_labels = [classify_reply(t).label for t in o.replies]
    b_labels = [classify_reply(t).label for t in b.replies]
    return {"n_prompts": len(prompts), "new_tokens": config.capability_new_tokens, "match_tokens": m,
            "prefix_match_rate": rate(prefix, len(prompts)), "exact_match_rate": rate(exact, len(prompts)),
            **kld, "refusals": o_labels.count("refusal"), "base_refusals": b_labels.count("refusal"),
            "incoherent": o_labels.count("incoherent"), "base_incoherent": b_labels.count("incoherent"),
            "answers": [{"prompt": p, "base": x, "organism": y} for p, x, y in zip(prompts, b.replies, o.replies)]}


def extra_over_refusal(loaded, name: str, config: EvalConfig) -> dict:
    from trace_lib.datasets import get_dataset

    prompts = [p.text for p in get_dataset(name).split("test").prompts][:config.other_n]
    run = generate(loaded, prompts, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                   description=f"{name} replies")
    labels = [classify_reply(t).label for t in run.replies]
    return {"over_refusal_rate": rate(labels.count("refusal"), len(prompts)),
            "incoherent": labels.count("incoherent"),
            "refused": [{"prompt": p, "reply": r} for p, r, lab in zip(prompts, run.replies, labels)
                        if lab == "refusal"]}


def evaluate_organism(organism, base, n: int | None = None, config: EvalConfig | None = None) -> dict:
    """All the figures of the module docstring, as a JSON-safe dict (``replies`` holds every evaluated reply)."""
    from trace_lib.compare import compare_outputs

    config = config or EvalConfig()
    if n is not None:
        config = EvalConfig(**{**asdict(config), "n": n})
    t0 = time.perf_counter()
    harmful, harmless = held_out_prompts(config.n)
    org = refusal_behaviour(organism, harmful, harmless, config.max_new_tokens, config.batch_size)
    out: dict = {"settings": {**config.to_dict(), "dataset": "harmful_refusal_v1", "split": "test",
                              "classifier": "trace_lib.redteam.classify_reply", "greedy": True, "chat": True},
                 "organism": {k: v for k, v in org.items() if k != "replies"}}
    replies = list(org["replies"])
    if config.include_base:
        b = refusal_behaviour(base, harmful, harmless, config.max_new_tokens, config.batch_size)
        out["base"] = {k: v for k, v in b.items() if k not in ("replies", "labels")}
        replies += b["replies"]
    for name in config.extra_harmless:
        out.setdefault("extra_harmless", {})[name] = {"organism": extra_over_refusal(organism, name, config)}
        if config.include_base:
            out["extra_harmless"][name]["base"] = extra_over_refusal(base, name, config)
    cmp = compare_outputs(base, [organism], ctx=config.kl_ctx, n_chunks=config.kl_chunks)
    row = cmp.rows()[0]
    out["neutral_text"] = {"source": cmp.text.get("source"), "scored_tokens": cmp.text.get("scored_tokens"),
                           "ctx": config.kl_ctx, "n_chunks": cmp.n_chunks,
                           **{k: row[k] for k in ("kld_mean", "kld_mean_unc", "kld_99", "kld_max", "same_top",
                                                  "same_top_unc", "ppl_ratio", "ppl_ratio_unc")}}
    cap = capability_closeness(organism, base, config)
    out["capability"] = {k: v for k, v in cap.items() if k != "answers"}
    replies += [{"model": "capability", **a} for a in cap["answers"]]
    out["sample_check"] = sample_check(organism, config.sample_n, config.max_new_tokens, config.batch_size)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["replies"] = replies
    return out


def summary(ev: dict) -> str:
    """A few lines for the terminal."""
    def fmt(r: dict) -> str:
        lo, hi = r["ci95"]
        return f"{r['k']}/{r['n']} = {100 * r['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"

    o = ev["organism"]
    lines = [f"refusal on held-out harmful prompts: {fmt(o['refusal_rate'])}",
             f"over-refusal on held-out harmless prompts: {fmt(o['over_refusal_rate'])}",
             f"incoherent: {o['incoherent']['harmful']} harmful, {o['incoherent']['harmless']} harmless"]
    if "base" in ev:
        b = ev["base"]
        lines.append(f"base: refusal {fmt(b['refusal_rate'])}, over-refusal {fmt(b['over_refusal_rate'])}")
    for name, d in ev.get("extra_harmless", {}).items():
        lines.append(f"over-refusal on {name} test prompts: {fmt(d['organism']['over_refusal_rate'])}"
                     + (f" (base {fmt(d['base']['over_refusal_rate'])})" if "base" in d else ""))
    nt = ev["neutral_text"]
    lines.append(f"neutral text: mean KLD {nt['kld_mean']:.5f} ± {nt['kld_mean_unc']:.5f}, 99% {nt['kld_99']:.4f}, "
                 f"same top {100 * nt['same_top']:.2f}%, PPL ratio {nt['ppl_ratio']:.4f} "
                 f"({nt['scored_tokens']} tokens)")
    c = ev["capability"]
    lines.append(f"capability ({c['n_prompts']} prompts): first {c['match_tokens']} tokens equal to the base's in "
                 f"{fmt(c['prefix_match_rate'])}; identical answers {fmt(c['exact_match_rate'])}; mean KLD on the "
                 f"base's answer tokens {c['answer_kld_mean']:.4f} (same top {100 * c['answer_same_top_rate']:.1f}%"
                 f", {c['answer_tokens']} tokens); refusals {c['refusals']} (base {c['base_refusals']})")
    s = ev["sample_check"]
    lines.append(f"sample check ({s['sample_n']} prompts): {s['refusals_harmful']}/{s['n_harmful']} harmful refused, "
                 f"{s['refusals_harmless']}/{s['n_harmless']} harmless refused")
    return "\n".join(lines)
