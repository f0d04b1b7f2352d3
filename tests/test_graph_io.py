"""Transcoder files, graph pruning, graph JSON and graph diffs, on tiny random models."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trace_lib.attribution.graph import attribute
from trace_lib.attribution.graph_diff import graph_diff, jaccard
from trace_lib.attribution.graph_json import graph_to_json, validate_graph_json, write_graph_files
from trace_lib.attribution.graph_prune import prune_graph
from trace_lib.attribution.transcoder import load_transcoder_set
from trace_lib.attribution.transcoder_train import train_transcoders
from trace_lib.errors import GraphError, InvalidValueError, TranscoderError

from conftest import tiny_loaded

PROMPT = [3, 17, 42, 99, 5, 64, 23, 81, 11, 7]


@pytest.fixture(scope="module")
def setup():
    loaded = tiny_loaded("llama")
    data = torch.randint(0, 128, (48, 32), generator=torch.Generator().manual_seed(0))
    tcs = train_transcoders(loaded, data, d_transcoder=64, steps=120, skip=True)
    return loaded, tcs, attribute(loaded, tcs, PROMPT)


# ----------------------------------------------------------------------------------------------- transcoder files
def test_trainer_is_seeded_and_fits():
    loaded = tiny_loaded("llama")
    data = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))
    a = train_transcoders(loaded, data, d_transcoder=32, steps=40, activation="jumprelu", sparsity="l0")
    b = train_transcoders(loaded, data, d_transcoder=32, steps=40, activation="jumprelu", sparsity="l0")
    for ta, tb in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(ta.state().values(), tb.state().values()))
    good = train_transcoders(loaded, data, d_transcoder=64, steps=150)
    assert all(v["fvu"] < 0.6 and 0 < v["l0"] < 64 for v in good.info["layers"].values())


@pytest.mark.parametrize("yaml_missing", [False, True])
def test_transcoder_set_round_trip(setup, tmp_path, monkeypatch, yaml_missing):
    _, tcs, _ = setup
    folder = tcs.save(tmp_path / "tcs")
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors",
                                                        "layer_2.safetensors"]
    with safe_open(str(folder / "layer_0.safetensors"), framework="pt") as f:  # circuit-tracer's names and shapes
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
    assert shapes == {"W_enc": (64, 32), "W_dec": (64, 32), "b_enc": (64,), "b_dec": (32,), "W_skip": (32, 32)}
    if yaml_missing:
        monkeypatch.setitem(sys.modules, "yaml", None)  # the flat reader must do without PyYAML
    back = load_transcoder_set(folder)
    assert (back.scan, back.feature_input_hook, back.feature_output_hook) == (tcs.scan, "mlp.hook_in", "mlp.hook_out")
    for a, b in zip(tcs, back):
        sa, sb = a.state(), b.state()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert torch.equal(a.W_enc, b.W_enc)


def test_jumprelu_threshold_round_trip(tmp_path):
    loaded = tiny_loaded("llama")
    data = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))
    tcs = train_transcoders(loaded, data, d_transcoder=32, steps=20, activation="jumprelu", sparsity="l0")
    back = load_transcoder_set(tcs.save(tmp_path / "j"))
    with safe_open(str(tmp_path / "j" / "layer_1.safetensors"), framework="pt") as f:
        assert "activation_function.threshold" in f.keys() and "W_skip" not in f.keys()
    assert all(torch.equal(a.threshold, b.threshold) for a, b in zip(tcs, back))


def test_bad_transcoder_files(setup, tmp_path):
    _, tcs, _ = setup
    with pytest.raises(TranscoderError, match="no config.yaml"):
        load_transcoder_set(tmp_path)
    folder = tcs.save(tmp_path / "tcs")
    (folder / "layer_1.safetensors").unlink()
    with pytest.raises(TranscoderError, match=r"missing \[1\]"):
        load_transcoder_set(folder)
    state = tcs[1].state()
    state["W_dec"] = state["W_dec"][:, :16].contiguous()
    save_file(state, str(folder / "layer_1.safetensors"))
    with pytest.raises(TranscoderError, match="W_dec has shape"):
        load_transcoder_set(folder)
    with pytest.raises(TranscoderError, match="not empty"):
        tcs.save(folder)


# ----------------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.99, 0.99), (0.5, 0.9)])
def test_pruning_keeps_tokens_and_logits_and_no_orphans(setup, thresholds):
    _, _, graph = setup
    pr = prune_graph(graph, *thresholds)
    assert pr.node_mask[graph.token_start:].all()
    kept = pr.node_mask.nonzero().flatten().tolist()
    for i in kept:
        kind = graph.kind(i)
        if kind in ("feature", "error"):
            assert pr.edge_mask[:, i].any(), f"{graph.node_id(i)} has no kept outgoing edge"
        if kind == "feature":
            assert pr.edge_mask[i].any(), f"{graph.node_id(i)} has no kept incoming edge"
    ends = pr.edge_mask.nonzero()
    assert pr.node_mask[ends[:, 0]].all() and pr.node_mask[ends[:, 1]].all()  # no edge to a dropped node
    with pytest.raises(InvalidValueError, match="node_threshold"):
        prune_graph(graph, 1.5)


# ----------------------------------------------------------------------------------------------- JSON
def test_graph_json_validates(setup, tmp_path):
    _, _, graph = setup
    data = graph_to_json(graph, slug="tiny", node_threshold=0.99)
    validate_graph_json(data)
    json.loads(json.dumps(data))  # plain JSON
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert kinds == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    assert data["metadata"]["schema_version"] == 1
    ids = {n["node_id"] for n in data["nodes"]}
    assert {f"E_{t}_{p}" for p, t in enumerate(PROMPT)} <= ids
    top = graph.targets[0].vocab_idx
    assert f"{graph.n_layers + 1}_{top}_{len(PROMPT) - 1}" in ids
    linked = {x for link in data["links"] for x in (link["source"], link["target"])}
    assert all(n["node_id"] in linked for n in data["nodes"] if n["feature_type"] not in ("embedding", "logit"))
    path = write_graph_files(graph, tmp_path, slug="tiny")
    assert json.loads(path.read_text())["metadata"]["slug"] == "tiny"
    assert [g["slug"] for g in json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]] == ["tiny"]


def test_validator_catches_schema_breaks(setup):
    _, _, graph = setup
    good = graph_to_json(graph, node_threshold=0.99)
    feat = next(i for i, n in enumerate(good["nodes"]) if n["feature_type"] == "cross layer transcoder")
    err = next(i for i, n in enumerate(good["nodes"]) if n["feature_type"] == "mlp reconstruction error")
    cases = [
        (lambda d: d["nodes"][feat].update(node_id="0_x_1"), "a feature node id has the form"),
        (lambda d: d["nodes"][err].update(node_id="0_1_1"), r"error node id has the form \{layer\}_-1_\{pos\}"),  # circuit-tracer 0.5.0's form
        (lambda d: d["nodes"][feat].update(feature=7), "do not match its id"),
        (lambda d: d["nodes"][feat].pop("jsNodeId"), "lacks 'jsNodeId'"),
        (lambda d: d["nodes"][feat].update(feature_type="transcoder"), "feature_type"),
        (lambda d: d["nodes"].append(dict(d["nodes"][feat])), "not unique"),
        (lambda d: d["links"].append({"source": "nope", "target": d["nodes"][0]["node_id"], "weight": 1.0}),
         "names no node"),
        (lambda d: d["metadata"].update(schema_version=2), "schema_version"),
        (lambda d: d.update(nodes=[n for n in d["nodes"] if n["feature_type"] != "logit"]), "no logit node"),
    ]
    for mutate, message in cases:
        d = json.loads(json.dumps(good))
        mutate(d)
        with pytest.raises(GraphError, match=message):
            validate_graph_json(d)


# ----------------------------------------------------------------------------------------------- diffs
def test_graph_diffed_with_itself_is_empty(setup):
    _, _, graph = setup
    d = graph_diff(graph, graph)
    assert d.is_empty and d.node_jaccard == 1.0 and d.edge_jaccard == 1.0
    assert not (d.nodes_lost or d.nodes_new or d.edges_lost or d.edges_new) and d.nodes_kept
    assert all(c.delta == 0 for c in d.nodes_kept + d.edges_kept)
    assert d.replacement[0] == d.replacement[1] and d.error_share[0] == d.error_share[1]
    assert jaccard({"a": 1.0, "b": 2.0}, {"b": 1.0, "c": 1.0}) == pytest.approx(1 / 4)


def test_graph_diff_of_a_quantized_variant(setup):
    from trace_lib.quant import quantize

    loaded, tcs, graph = setup
    variant = quantize(loaded, "gguf-q4_0")
    var_graph = attribute(variant, tcs, PROMPT, targets=graph.target_spec())
    assert [t.vocab_idx for t in var_graph.targets] == [t.vocab_idx for t in graph.targets]
    d = graph_diff(graph, var_graph, node_threshold=0.99, edge_threshold=0.99)
    assert 0 < d.node_jaccard < 1 and 0 < d.edge_jaccard < 1
    assert not d.is_empty and d.nodes_kept
    for items in (d.nodes_lost, d.nodes_new, d.nodes_kept, d.edges_kept):
        deltas = [abs(c.delta) for c in items]
        assert deltas == sorted(deltas, reverse=True)
    assert all(c.var == 0 for c in d.nodes_lost) and all(c.ref == 0 for c in d.nodes_new)
    out = d.to_dict(top=3)
    assert set(out["replacement_score"]) == {"ref", "var", "delta"} and len(out["edges_kept"]) <= 3
    with pytest.raises(GraphError, match="different prompts"):
        graph_diff(graph, attribute(loaded, tcs, PROMPT[:-1]))
