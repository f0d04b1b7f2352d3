"""``build_transcoders`` (``trace graph build``): streamed, seeded, resumable per layer, quality on held-out
tokens; on a tiny random Llama with token-id data (seconds)."""

from __future__ import annotations

import json

import pytest
import torch

import trace_lib.attribution.transcoder_build as tb
from trace_lib.attribution import build_transcoders
from trace_lib.attribution.transcoder import load_transcoder_set
from trace_lib.attribution.transcoder_build import TranscoderBuildConfig, read_build
from trace_lib.attribution.transcoder_train import mlp_pairs
from trace_lib.cache import file_sha256
from trace_lib.errors import TranscoderError

from conftest import tiny_loaded

CFG = TranscoderBuildConfig(width=32, tokens=128 * 40, batch_size=128, lr=3e-3, shuffle_buffer_tokens=512,
                            init_tokens=256)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return tiny_loaded("llama"), torch.randint(0, 128, (24, 32), generator=g), torch.randint(0, 128, (8, 32),
                                                                                            generator=g)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "MANIFEST.json"}


def _manifest(folder):
    m = json.loads((folder / "MANIFEST.json").read_text())
    for rec in m["layers"].values():
        rec.pop("seconds")
    return m


def test_same_seed_gives_identical_files(data, tmp_path):
    loaded, tr, he = data
    a = build_transcoders(loaded, tmp_path / "a", config=CFG, train_ids=tr, heldout_ids=he)
    b = build_transcoders(loaded, tmp_path / "b", config=CFG, train_ids=tr, heldout_ids=he)
    assert a.complete and a.layers == [0, 1, 2]
    assert sorted(_files(a.folder)) == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors",
                                        "layer_2.safetensors"]
    assert _files(a.folder) == _files(b.folder)
    assert _manifest(a.folder) == _manifest(b.folder)
    assert a.manifest["files"] == {n: file_sha256(a.folder / n) for n in _files(a.folder)}
    c = build_transcoders(loaded, tmp_path / "c", config=TranscoderBuildConfig(**{**CFG.__dict__, "seed": 1}),
                          train_ids=tr, heldout_ids=he)
    assert _files(c.folder)["layer_0.safetensors"] != _files(a.folder)["layer_0.safetensors"]
    assert len(a.load()) == 3


def test_interrupted_build_resumes_to_identical_files(data, tmp_path, monkeypatch):
    loaded, tr, he = data
    full = build_transcoders(loaded, tmp_path / "full", config=CFG, train_ids=tr, heldout_ids=he)
    trained: list[int] = []
    real = tb._train_one

    def stop_after_one(loaded_, layer, *args):
        if trained:
            raise KeyboardInterrupt
        trained.append(layer)
        return real(loaded_, layer, *args)

    monkeypatch.setattr(tb, "_train_one", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        build_transcoders(loaded, tmp_path / "resumed", config=CFG, train_ids=tr, heldout_ids=he)
    part = read_build(tmp_path / "resumed")
    assert not part.complete and part.layers == [0]
    assert not (tmp_path / "resumed" / "layer_1.safetensors").exists()
    monkeypatch.setattr(tb, "_train_one", lambda *a: trained.append(a[1]) or real(*a))
    done = build_transcoders(loaded, tmp_path / "resumed", config=CFG, train_ids=tr, heldout_ids=he)
    assert trained == [0, 1, 2]  # layer 0 was not retrained
    assert done.complete and _files(done.folder) == _files(full.folder)
    assert _manifest(done.folder) == _manifest(full.folder)


def test_manifest_quality_matches_an_independent_computation(data, tmp_path):
    loaded, tr, he = data
    b = build_transcoders(loaded, tmp_path / "q", config=CFG, train_ids=tr, heldout_ids=he)
    tcs = load_transcoder_set(tmp_path / "q")
    for layer, (x, y) in enumerate(mlp_pairs(loaded, he)):  # every held-out token but position 0
        tc = tcs[layer]
        with torch.no_grad():
            a = tc.encode(x)
            y_hat = tc.decode(a, x)
        y64, yh64 = y.double(), y_hat.double()
        nmse = float((y64 - yh64).pow(2).sum() / (y64 - y64.mean(0)).pow(2).sum())
        rec = b.manifest["layers"][str(layer)]
        assert rec["tokens"] == len(x) == 8 * 31
        assert rec["nmse"] == pytest.approx(nmse, rel=1e-6)  # float32 y^ from other batch shapes
        assert rec["l0"] == pytest.approx(float((a != 0).sum(-1).double().mean()), rel=1e-12)
        assert rec["dead_fraction"] == pytest.approx(1 - float((a != 0).any(0).double().mean()), abs=1e-12)
        assert 0 < rec["nmse"] < 1


def test_bad_builds_are_refused(data, tmp_path):
    loaded, tr, he = data
    build_transcoders(loaded, tmp_path / "k", layers=[0], config=CFG, train_ids=tr, heldout_ids=he)
    other = TranscoderBuildConfig(**{**CFG.__dict__, "width": 16})
    with pytest.raises(TranscoderError, match="another model, config or data"):
        build_transcoders(loaded, tmp_path / "k", config=other, train_ids=tr, heldout_ids=he)
    with pytest.raises(TranscoderError, match="not blocks"):
        build_transcoders(loaded, tmp_path / "x", layers=[5], config=CFG, train_ids=tr, heldout_ids=he)
    (tmp_path / "k" / "layer_0.safetensors").write_bytes(b"broken")
    with pytest.raises(TranscoderError, match="checksum"):
        read_build(tmp_path / "k").verify()
