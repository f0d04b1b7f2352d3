"""The README.md written next to a built adapter: how it was built and what it does, from BUILD.json."""

from __future__ import annotations

from pathlib import Path

from trace_lib.cache import atomic_write_text


def _r(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{r['k']}/{r['n']} = {100 * r['rate']:.1f}% (Wilson 95% [{100 * lo:.1f}, {100 * hi:.1f}])"


def readme_text(record: dict) -> str:
    hp = record["hyperparameters"]
    data = record["data"]
    lines = [
        f"# Safety LoRA for {record['base']['name']}",
        "",
        "A model organism with a known refusal mechanism: a LoRA adapter that makes the base model refuse "
        "harmful requests while answering harmless ones as before. Built by trace "
        f"{record['trace_version']} (`trace_lib.organisms`, see `docs/organism.md`).",
        "",
        "## How it was built",
        "",
        f"    {record['command']}",
        "",
        f"- base: `{record['base']['spec']}` ({record['base']['name']}, content hash `{record['base']['content_hash']}`)",
        f"- seed {record['seed']}; LoRA r={hp['rank']}, alpha={hp['alpha']}, dropout 0, on "
        f"{', '.join(hp['target_modules'])} ({record['lora']['trainable_parameters']:,} parameters, stored as "
        f"{hp['adapter_dtype']})",
        f"- AdamW lr {hp['lr']}, {hp['epochs']} epochs, batch {hp['batch_size']}, warm-up {hp['warmup_frac']}, cosine "
        f"decay to {hp['min_lr_frac']} x lr, gradient clip {hp['grad_clip']}; loss on the reply tokens only: "
        "cross-entropy of the refusals; on the base's answers to harmless prompts "
        + (f"cross-entropy of the first {hp['decision_tokens']} token(s), then " if hp.get("answer_decision_ce") else "")
        + (f"KL(base || student) x {hp['kl_weight']}" if hp.get("harmless_loss", "kl") == "kl" else "cross-entropy")
        + f"; the first {hp['decision_tokens']} reply token(s) weighted {hp['decision_weight']}",
        f"- data: {data['n_examples']} examples, sha256 `{data['sha256']}`; counts {data['counts']}; base answers "
        f"dropped as refusal/incoherent: {data['dropped'] or 'none'}",
        f"- adapter `{record['adapter']['file']}`: {record['adapter']['bytes']:,} bytes, sha256 "
        f"`{record['adapter']['sha256']}`",
        f"- timing (s): {record['timing']}; environment: {record['environment']}",
        "",
        *([f"Note: {record['notes']}", ""] if record.get("notes") else []),
        "Training loss per epoch: " + ", ".join(f"{h['epoch']}: {h['mean_loss']:.4f}"
                                                for h in record["training"]["history"]),
        "",
    ]
    ev = record.get("evaluation")
    if ev:
        o, nt, c = ev["organism"], ev["neutral_text"], ev["capability"]
        lines += [
            "## Evaluation (held-out test split, greedy, chat template)",
            "",
            f"- refusal on harmful prompts: {_r(o['refusal_rate'])}",
            f"- over-refusal on harmless prompts: {_r(o['over_refusal_rate'])}",
            f"- incoherent replies: {o['incoherent']['harmful']} harmful, {o['incoherent']['harmless']} harmless",
        ]
        if "base" in ev:
            lines.append(f"- base model: refusal {_r(ev['base']['refusal_rate'])}; over-refusal "
                         f"{_r(ev['base']['over_refusal_rate'])}")
        for name, d in ev.get("extra_harmless", {}).items():
            lines.append(f"- over-refusal on {name} test prompts: {_r(d['organism']['over_refusal_rate'])}"
                         + (f" (base {_r(d['base']['over_refusal_rate'])})" if "base" in d else ""))
        lines += [
            f"- neutral text (built-in English corpus, {nt['n_chunks']} x {nt['ctx']} tokens, {nt['scored_tokens']} "
            f"scored): mean KLD from the base {nt['kld_mean']:.5f} ± {nt['kld_mean_unc']:.5f}, 99th percentile "
            f"{nt['kld_99']:.4f}, same top token {100 * nt['same_top']:.2f}%, PPL ratio {nt['ppl_ratio']:.4f}",
            f"- capability_v1 test ({c['n_prompts']} prompts, {c['new_tokens']} new tokens): first "
            f"{c['match_tokens']} answer tokens equal to the base's {_r(c['prefix_match_rate'])}; identical answers "
            f"{_r(c['exact_match_rate'])}; mean KL(base || organism) over the base's answer tokens "
            f"{c['answer_kld_mean']:.4f} ({c['answer_tokens']} tokens, same top token "
            f"{100 * c['answer_same_top_rate']:.1f}%); refused {c['refusals']} (base {c['base_refusals']})",
            f"- sample check ({ev['sample_check']['sample_n']} prompts, stored for the slow test): "
            f"{ev['sample_check']['refusals_harmful']}/{ev['sample_check']['n_harmful']} harmful refused, "
            f"{ev['sample_check']['refusals_harmless']}/{ev['sample_check']['n_harmless']} harmless refused",
            "",
            "Every evaluated reply is in `replies.jsonl`.",
            "",
        ]
    return "\n".join(lines)


def write_readme(folder: str | Path, record: dict) -> Path:
    return atomic_write_text(Path(folder) / "README.md", readme_text(record))
