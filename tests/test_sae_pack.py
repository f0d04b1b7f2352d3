"""Shipped SAE packs: written in float16 with checksums, loaded instead of training, refused when tampered."""

from __future__ import annotations

import json

import pytest
import torch

from trace_lib.cache import file_sha256
from trace_lib.errors import SAEError
from trace_lib.sae import SAETrainingConfig, save_sae
from trace_lib.sae.plan import SAEDataPlan
from trace_lib.sae.shipped import MANIFEST, read_pack, shipped_pack, write_pack
from trace_lib.sae.store import default_hooks, get_or_train_saes

TINY_CFG = SAETrainingConfig(architecture="relu", expansion_factor=2, epochs=1, batch_size=256, target_l0=8)
TINY_PLAN = SAEDataPlan(text_sequences=24, seq_len=64, heldout_sequences=8, ce_eval_sequences=2)
SPEC = "tiny-with-pack"


@pytest.fixture(scope="module")
def packed(tiny_folder, tmp_path_factory):
    """A tiny model registered as a named spec whose pack holds SAEs trained on the broad-corpus plan."""
    import os

    from trace_lib.models.load import folder_hash, load_hf_folder
    from trace_lib.models.specs import _SPECS, register_spec

    before = os.environ.get("TRACE_CACHE")
    os.environ["TRACE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    pack_dir = tmp_path_factory.mktemp("pack")
    register_spec(SPEC, lambda dtype: load_hf_folder(tiny_folder, dtype=dtype, spec=SPEC),
                  lambda: folder_hash(tiny_folder), sae_pack=pack_dir)
    try:
        from trace_lib.models import load_model

        loaded = load_model(SPEC)
        hooks = default_hooks(loaded)
        trained = get_or_train_saes(loaded, hooks, cfg=TINY_CFG, plan=TINY_PLAN, progress=False)
        write_pack(trained, pack_dir, model=loaded.name, model_hash=loaded.content_hash,
                   build_command=f"trace sae build --model {SPEC}")
        yield loaded, trained, pack_dir
    finally:
        _SPECS.pop(SPEC, None)
        if before is None:
            os.environ.pop("TRACE_CACHE")
        else:
            os.environ["TRACE_CACHE"] = before


def test_default_hooks_spread_six_blocks_over_the_depth(default_loaded, tiny_folder):
    assert default_hooks(default_loaded) == [f"blocks.{i}.hook_resid_post" for i in (4, 9, 13, 17, 21, 26)]


def test_broad_plan_measures_on_heldout_text_and_records_its_corpus(packed):
    loaded, trained, _ = packed
    meta = next(iter(trained.values())).cfg.metadata
    assert meta["training"]["held_out"] == "corpus heldout split"
    corpus = meta["training"]["corpus"]
    assert corpus["train"]["split"] == "train" and corpus["heldout"]["split"] == "heldout"
    assert corpus["train"]["sha256"] != corpus["heldout"]["sha256"]
    assert meta["training"]["held_out_tokens"] == TINY_PLAN.heldout_sequences * (TINY_PLAN.seq_len - 1)


def test_pack_is_float16_with_every_file_checksummed(packed):
    loaded, trained, pack_dir = packed
    manifest = json.loads((pack_dir / MANIFEST).read_text())
    assert manifest["model_hash"] == loaded.content_hash and manifest["hooks"] == sorted(trained)
    for rel, digest in manifest["files"].items():
        assert file_sha256(pack_dir / rel) == digest
    cfg = json.loads((pack_dir / manifest["hooks"][0] / "cfg.json").read_text())
    assert cfg["dtype"] == "float16"
    shipped = read_pack(pack_dir).load(manifest["hooks"])
    for hook, sae in shipped.items():
        assert sae.W_enc.dtype == torch.float32  # cast back on load
        assert torch.equal(sae.W_enc, trained[hook].W_enc.half().float())
        assert torch.equal(sae.b_dec, trained[hook].b_dec.half().float())


def test_default_call_loads_the_pack_without_training(packed, monkeypatch):
    loaded, trained, _ = packed
    import trace_lib.sae.store as store

    def no_training(*a, **k):
        raise AssertionError("trained although a pack is shipped")

    monkeypatch.setattr(store, "train_sae", no_training)
    saes = get_or_train_saes(loaded)
    assert sorted(saes) == sorted(trained) and all("shipped" in s.cfg.metadata for s in saes.values())
    with pytest.raises(AssertionError, match="trained although"):
        get_or_train_saes(loaded, shipped=False)  # --retrain-saes trains even with a pack


def test_pack_of_other_weights_is_not_used(packed, tmp_path):
    from trace_lib.models import load_model
    from trace_lib.quant import quantize

    loaded, _, _ = packed
    assert shipped_pack(loaded) is not None
    assert shipped_pack(quantize(load_model(SPEC), "int8-rtn-g32")) is None


def test_tampered_pack_is_refused_with_the_rebuild_command(packed, tmp_path, capsys):
    import shutil

    from trace_lib.cli import main
    from trace_lib.models.specs import _SPECS

    loaded, trained, pack_dir = packed
    bad = tmp_path / "bad-pack"
    shutil.copytree(pack_dir, bad)
    hook = sorted(trained)[0]
    weights = bad / hook / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(SAEError, match=f"fails its checksum; rebuild the pack with `trace sae build --model {SPEC}`"):
        read_pack(bad).load([hook])
    original = _SPECS[SPEC]
    import dataclasses

    _SPECS[SPEC] = dataclasses.replace(original, sae_pack=bad)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["audit", "--model", SPEC, "-v", "fp16", "--out", str(tmp_path / "out")])
    finally:
        _SPECS[SPEC] = original
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "fails its checksum" in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("problem, message", [
    ("hook", "layer 7 is out of range"),
    ("width", "has d_in=16 but the model's width there is 32"),
    ("nan", "NaN"),
])
def test_bad_sae_folder_is_one_line_and_exit_2(problem, message, tiny_folder, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from trace_lib.cli import main
    from trace_lib.sae import SAE, SAEConfig

    d_in = 16 if problem == "width" else 32
    hook = "blocks.7.hook_resid_post" if problem == "hook" else "blocks.1.hook_resid_post"
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=64, architecture="relu", hook_name=hook))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    folder = save_sae(sae, tmp_path / "sae")
    if problem == "nan":
        tensors = load_file(folder / "sae_weights.safetensors")
        tensors["W_enc"][0, 0] = float("nan")
        save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "--model", str(tiny_folder), "-v", "fp16", "--sae", str(folder), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message.lower() in err.lower() and len(err.splitlines()) == 1, err
