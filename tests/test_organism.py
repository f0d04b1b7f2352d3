"""The safety organism: refusal templates, the training mix, an end-to-end build on a tiny model, resuming,
adapter checks, and (slow) the shipped ``default-safety`` adapter reproducing its recorded figures."""

from __future__ import annotations

import json

import pytest
import torch

from trace_lib.errors import ModelFormatError
from trace_lib.organisms import (
    DEFAULT_SAFETY_DIR,
    EvalConfig,
    MixConfig,
    TrainConfig,
    build_mix,
    build_organism,
    check_adapter,
    check_all_refusals,
    load_organism,
    read_build,
    refusal_for,
)
from trace_lib.organisms.refusals import CATEGORIES, PLAIN_OPENERS, STRUCTURES, TOPIC_OPENERS
from trace_lib.organisms.train import ADAPTER_FILE, BUILD_FILE, CONFIG_FILE, BuildInterrupted

# The tiny random model's answers are gibberish: keep them (drop only refusals) so the distillation path runs.
TINY_MIX = MixConfig(n_harmful=6, harmless={"harmful_refusal_v1": 4, "capability_v1": 2}, answer_tokens=4,
                     drop=("refusal",))
TINY_EVAL = EvalConfig(n=2, max_new_tokens=4, kl_ctx=32, kl_chunks=2, capability_new_tokens=4,
                       capability_match_tokens=4, other_n=2, sample_n=4, extra_harmless=("safety_warning_v1",))


def tiny_config(epochs: int = 1, **kw) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=2, lr=1e-2, mix=TINY_MIX, **kw)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------------------ refusals
def test_every_refusal_is_classified_as_refusal():
    assert check_all_refusals() == []


def test_refusals_are_varied_and_cover_every_harm_category():
    from trace_lib.datasets import get_dataset

    ds = get_dataset("harmful_refusal_v1")
    assert set(ds.categories) <= set(CATEGORIES)
    assert len(TOPIC_OPENERS) + len(PLAIN_OPENERS) >= 20 and len(STRUCTURES) >= 4
    train = [p for p in ds.split("train").prompts if p.label == "safety"]
    texts = [refusal_for(p.id, p.category, seed=0) for p in train]
    assert len(set(texts)) >= 0.9 * len(texts) >= 30
    assert texts == [refusal_for(p.id, p.category, seed=0) for p in train]  # deterministic
    assert texts != [refusal_for(p.id, p.category, seed=1) for p in train]  # seeded


# ------------------------------------------------------------------------------------------------ data mix
def test_training_mix_is_deterministic(tiny_folder, own_cache):
    from trace_lib.models import load_model

    base = load_model(str(tiny_folder))
    a = build_mix(base, TINY_MIX, seed=0)
    b = build_mix(base, TINY_MIX, seed=0)
    c = build_mix(base, TINY_MIX, seed=1)
    assert a.sha256 == b.sha256 and a.examples == b.examples
    assert c.sha256 != a.sha256
    assert a.counts["refusal/harmful_refusal_v1"] == 6 and a.counts["harmless_considered"] == 6
    kept = a.counts["total"] - 6
    dropped = sum(sum(d.values()) for d in a.dropped.values())
    assert kept + dropped == 6 and kept > 0  # every harmless prompt is either trained on or counted as dropped


def test_loss_masks_the_prompt(default_tokenizer):
    from trace_lib.organisms.data import Example, tokenize_example

    ex = Example("x", "s", "refusal", "weapons", "How do I build a bomb?", "I can't help with that.", True)
    ids, labels = tokenize_example(default_tokenizer, ex)
    n_prompt = sum(x == -100 for x in labels)
    assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
    assert default_tokenizer.decode(ids[n_prompt:]) == "I can't help with that.<|im_end|>"
    assert default_tokenizer.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------------ build
def test_build_end_to_end_on_a_tiny_model(tiny_folder, tmp_path, own_cache):
    out = tmp_path / "organism"
    # the tiny model's answers are a token or two of newlines: distil every answer position to run the KL part
    rec = build_organism(str(tiny_folder), out, tiny_config(answer_decision_ce=False), eval_config=TINY_EVAL)
    for name in (ADAPTER_FILE, CONFIG_FILE, BUILD_FILE, "README.md", "replies.jsonl"):
        assert (out / name).is_file(), name
    saved = read_build(out)
    assert saved["adapter"]["sha256"] == rec["adapter"]["sha256"] == check_adapter(out)
    assert saved["data"]["sha256"] and saved["seed"] == 0 and saved["command"].startswith("trace organism build")
    assert saved["base"]["content_hash"] and saved["timing"]["total_s"] > 0
    ev = saved["evaluation"]
    for key in ("organism", "base", "neutral_text", "capability", "sample_check", "extra_harmless"):
        assert key in ev
    assert ev["organism"]["refusal_rate"]["n"] == 2 and len(ev["organism"]["refusal_rate"]["ci95"]) == 2
    assert ev["sample_check"]["n_harmful"] + ev["sample_check"]["n_harmless"] == 4
    assert ev["neutral_text"]["kld_mean"] >= 0
    hist = saved["training"]["history"][0]
    assert hist["mean_ce"] > 0 and hist["mean_kl"] >= 0  # both parts of the loss ran
    # the adapter is a real change: base + merged adapter gives other logits than the base
    from trace_lib.models import load_model

    base = load_model(str(tiny_folder))
    org = load_organism(str(tiny_folder), out, cache=False)
    assert org.content_hash != base.content_hash
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        diff = (base.model(x).logits - org.model(x).logits).abs().max().item()
    assert diff > 1e-4
    # the cached load gives the same model and hash
    cached = load_organism(str(tiny_folder), out)
    assert cached.content_hash == org.content_hash
    with torch.no_grad():
        assert torch.equal(cached.model(x).logits, org.model(x).logits)


def test_resume_after_an_interrupted_epoch_gives_the_same_adapter(tiny_folder, tmp_path, own_cache):
    cfg = tiny_config(epochs=2)
    full = build_organism(str(tiny_folder), tmp_path / "full", cfg, evaluate=False)
    steps = full["training"]["steps_per_epoch"]
    with pytest.raises(BuildInterrupted):
        build_organism(str(tiny_folder), tmp_path / "resumed", cfg, evaluate=False, stop_after_steps=steps + 1)
    assert not (tmp_path / "resumed" / ADAPTER_FILE).exists()
    resumed = build_organism(str(tiny_folder), tmp_path / "resumed", cfg, evaluate=False)
    assert resumed["training"]["resumed_from_epoch"] == 1
    assert resumed["adapter"]["sha256"] == full["adapter"]["sha256"]
    assert [h["mean_loss"] for h in resumed["training"]["history"]] == \
        [h["mean_loss"] for h in full["training"]["history"]]


def test_cli_build_command_runs(tiny_folder, tmp_path, own_cache):
    from typer.testing import CliRunner

    from trace_lib.cli.organism import organism_app

    out = tmp_path / "cli-out"
    res = CliRunner().invoke(organism_app, ["build", "--base", str(tiny_folder), "--out", str(out), "--epochs", "1",
                                            "--max-harmful", "4", "--max-harmless", "2", "--answer-tokens", "4",
                                            "--no-evaluate"])
    assert res.exit_code == 0, res.output
    assert (out / ADAPTER_FILE).is_file() and "wrote" in res.output
    rec = read_build(out)
    assert rec["command"] == (f"trace organism build --base {tiny_folder} --out {out} --epochs 1 --max-harmful 4 "
                              "--max-harmless 2 --answer-tokens 4")
    assert rec["data"]["counts"]["refusal/harmful_refusal_v1"] == 4


# ------------------------------------------------------------------------------------------------ adapter checks
def test_missing_or_corrupt_adapter_is_a_model_format_error(tmp_path):
    with pytest.raises(ModelFormatError, match="missing adapter_model.safetensors"):
        check_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00not a safetensors file")
    with pytest.raises(ModelFormatError, match="corrupt or truncated"):
        check_adapter(tmp_path)


def test_packaged_adapter_is_small_and_recorded():
    assert (DEFAULT_SAFETY_DIR / ADAPTER_FILE).stat().st_size < 12_000_000
    rec = read_build(DEFAULT_SAFETY_DIR)
    assert rec["adapter"]["sha256"] == check_adapter(DEFAULT_SAFETY_DIR)
    ev = rec["evaluation"]
    assert ev["organism"]["refusal_rate"]["rate"] >= 0.8
    assert ev["organism"]["over_refusal_rate"]["rate"] <= 0.1


# ------------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_default_safety_reproduces_the_recorded_sample_figures(default_loaded):
    from trace_lib.models import load_model
    from trace_lib.organisms.evaluate import sample_check
    from trace_lib.organisms.load import organism_hash

    org = load_model("default-safety")
    assert org.name == "SmolLM2-135M-Instruct+safety-LoRA" and org.spec == "default-safety"
    rec = read_build(DEFAULT_SAFETY_DIR)
    assert org.content_hash == organism_hash(default_loaded.content_hash, rec["adapter"]["sha256"])
    assert rec["base"]["content_hash"] == default_loaded.content_hash
    want = rec["evaluation"]["sample_check"]
    got = sample_check(org, want["sample_n"], want["max_new_tokens"], want["batch_size"])  # cache off
    assert got["labels"] == want["labels"]
    assert (got["refusals_harmful"], got["refusals_harmless"]) == (want["refusals_harmful"],
                                                                    want["refusals_harmless"])
    assert got["refusals_harmful"] >= 0.75 * got["n_harmful"]
