"""Attribution graphs on tiny random models: the rows are exact, the replacement model is exact, a planted
path is found, and bad input fails with one clear error."""

from __future__ import annotations

import pytest
import torch

from trace_lib.attribution.graph import MAX_GRAPH_TOKENS, attribute
from trace_lib.attribution.graph_targets import CustomTarget, logit_difference
from trace_lib.attribution.replacement import real_pass, reconstruction_errors, replacement_logits
from trace_lib.attribution.transcoder import Transcoder, TranscoderSet
from trace_lib.attribution.transcoder_train import train_transcoders
from trace_lib.errors import GraphError, TranscoderError, UnsupportedArchitectureError

from conftest import tiny_loaded

PROMPT = [3, 17, 42, 99, 5, 64, 23, 81, 11, 7]


def _train(loaded, **kw) -> TranscoderSet:
    data = torch.randint(0, 128, (48, 32), generator=torch.Generator().manual_seed(0))
    return train_transcoders(loaded, data, d_transcoder=64, steps=120, **kw)


@pytest.fixture(scope="module")
def llama():
    return tiny_loaded("llama")


@pytest.fixture(scope="module")
def tcs(llama):
    return _train(llama)


def _independent_values(loaded, transcoders, graph) -> torch.Tensor:
    """Each feature's pre-activation and each logit's demeaned value, from an ordinary forward pass."""
    captured = {}
    hooks = [b.mlp.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, a[0][0].detach()))
             for i, b in enumerate(loaded.arch.layers)]
    try:
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([graph.tokens])).logits[0, -1]
    finally:
        for h in hooks:
            h.remove()
    out = []
    with torch.no_grad():
        for i in range(graph.n_features):
            layer, pos, feat = graph.feature(i)
            tc = transcoders[layer]
            out.append(float(captured[layer][pos] @ tc.W_enc[:, feat] + tc.b_enc[feat]))
        for t in graph.targets:
            out.append(float(logits[t.vocab_idx] - logits.mean()))
    return torch.tensor(out)


def _rows(graph) -> list[int]:
    return list(range(graph.n_features)) + list(range(graph.logit_start, graph.n_nodes))


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("llama", {"skip": True}),
                                     ("llama", {"activation": "jumprelu", "sparsity": "l0"}),
                                     ("qwen2", {"skip": True})])  # qwen2: q/k/v biases, attention of biases
def test_rows_sum_to_values(arch, kw):
    loaded = tiny_loaded(arch)
    transcoders = _train(loaded, **kw)
    graph = attribute(loaded, transcoders, PROMPT, batch_size=16)
    assert graph.n_features > 20 and graph.n_logits >= 1
    rows = _rows(graph)
    got = graph.adjacency[rows].sum(1) + graph.bias[rows]
    want = _independent_values(loaded, transcoders, graph)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    # error and token rows are sources only
    assert not graph.adjacency[graph.error_start:graph.logit_start].any()


def test_rows_exact_with_position_zero_and_with_no_features(llama, tcs):
    graph = attribute(llama, tcs, PROMPT, zero_first_position=False)
    assert any(graph.feature(i)[1] == 0 for i in range(graph.n_features))
    rows = _rows(graph)
    assert torch.allclose(graph.adjacency[rows].sum(1) + graph.bias[rows],
                          _independent_values(llama, tcs, graph), atol=1e-4)
    silent = TranscoderSet([Transcoder(32, 8, i) for i in range(3)])  # all-zero weights: nothing fires
    graph = attribute(llama, silent, PROMPT)
    assert graph.n_features == 0 and graph.adjacency[graph.logit_start:, graph.error_start:graph.token_start].any()
    rows = _rows(graph)
    assert torch.allclose(graph.adjacency[rows].sum(1) + graph.bias[rows],
                          _independent_values(llama, silent, graph), atol=1e-4)


def test_custom_target_and_logit_difference(llama, tcs):
    diff = logit_difference(llama, 5, 9)
    graph = attribute(llama, tcs, PROMPT, targets=[diff, CustomTarget("u", 0.5, torch.ones(llama.d_model))])
    assert [t.vocab_idx for t in graph.targets] == [128, 129]  # virtual indices after the vocabulary
    logits = real_pass(llama, torch.tensor(PROMPT))
    final = logits.final[-1]
    want = torch.stack([diff.vector @ final + diff.bias, final.sum()])
    rows = _rows(graph)[-2:]
    assert torch.allclose(graph.adjacency[rows].sum(1) + graph.bias[rows], want, atol=1e-4)
    lg = logits.logits[-1]
    assert abs(float(want[0]) - float(lg[5] - lg[9])) < 1e-4


def test_replacement_with_errors_is_exact(llama, tcs):
    ids = torch.tensor(PROMPT)
    rp = real_pass(llama, ids)
    with torch.no_grad():
        real = llama.model(input_ids=ids.view(1, -1)).logits[0]
    errors = reconstruction_errors(rp, tcs)
    assert torch.allclose(replacement_logits(llama, tcs, ids, errors), real, atol=1e-4)
    # without the error terms the transcoders alone differ: the errors carry something
    assert not torch.allclose(replacement_logits(llama, tcs, ids), real, atol=1e-2)


def test_max_feature_nodes_keeps_most_influential(llama, tcs):
    full = attribute(llama, tcs, PROMPT)
    capped = attribute(llama, tcs, PROMPT, max_feature_nodes=12, batch_size=4)
    assert capped.n_features == 12 and capped.n_nodes == full.n_nodes - full.n_features + 12
    # the capped graph's rows equal the full graph's on the columns both have
    for i in range(capped.n_features):
        j = full.feature_index(*capped.feature(i))
        cols_c = list(range(capped.n_features))
        cols_f = [full.feature_index(*capped.feature(c)) for c in cols_c]
        assert torch.allclose(capped.adjacency[i, cols_c], full.adjacency[j, cols_f], atol=1e-6)
    assert torch.allclose(capped.adjacency[capped.logit_start:, capped.error_start:],
                          full.adjacency[full.logit_start:, full.error_start:], atol=1e-6)


# ----------------------------------------------------------------------------------------------- planted path
def _planted():
    """Tiny Llama whose only computation is a planted two-step path at the last position: token T0's embedding
    (direction d0) -> MLP0 writes v_A -> MLP1 reads v_A and writes the unembedding of token T*. Attention writes
    nothing (o_proj = 0). Transcoders: feature A (layer 0, index 1) reads d0, writes MLP0's output; feature B
    (layer 1, index 2) reads v_A, writes MLP1's output."""
    loaded = tiny_loaded("llama", seed=3)
    model, d = loaded.model, loaded.d_model
    t0, t_star = 7, 40
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(d, 3, generator=g))
    d0, v_a = q[:, 0], q[:, 1]
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb -= (emb @ d0)[:, None] * d0  # no token but T0 has a d0 component
        emb[t0] = 10 * d0
        w_u = model.lm_head.weight
        w_u[t_star] *= 3
        u = w_u[t_star] - (w_u[t_star] @ d0) * d0 - (w_u[t_star] @ v_a) * v_a
        v_b = u / u.norm()
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.zero_()
        for i, (read, write, gain) in enumerate([(d0, v_a, 2.0), (v_a, v_b, 3.0)]):
            mlp = model.model.layers[i].mlp
            mlp.gate_proj.weight[0] = gain * read
            mlp.up_proj.weight[0] = gain * read
            mlp.down_proj.weight[:, 0] = write
    prompt = [1, 2, 3, 4, t0]
    rp = real_pass(loaded, torch.tensor(prompt))
    tcs = []
    for i, (read, feat) in enumerate([(d0, 1), (v_a, 2), (None, None)]):
        tc = Transcoder(d, 4, i)
        if read is not None:
            with torch.no_grad():
                tc.W_enc[:, feat] = read
                a = float(rp.mlp_in[i][-1] @ read)
                tc.W_dec[feat] = rp.mlp_out[i][-1] / a  # exact at the planted position
        tcs.append(tc)
    return loaded, TranscoderSet(tcs), prompt, t_star


def test_planted_path_is_found():
    loaded, tcs, prompt, t_star = _planted()
    graph = attribute(loaded, tcs, prompt)
    last = len(prompt) - 1
    a, b = graph.feature_index(0, last, 1), graph.feature_index(1, last, 2)
    assert a is not None and b is not None
    assert graph.targets[0].vocab_idx == t_star  # B's write makes T* the top logit
    logit = graph.logit_index(0)
    assert int(graph.adjacency[logit].abs().argmax()) == b
    assert int(graph.adjacency[b].abs().argmax()) == a
    assert graph.adjacency[b, a] > 0 and graph.adjacency[logit, b] > 0
    from trace_lib.attribution.graph_prune import prune_graph

    pr = prune_graph(graph)
    assert pr.node_mask[[a, b, logit]].all() and pr.edge_mask[b, a] and pr.edge_mask[logit, b]


# ----------------------------------------------------------------------------------------------- bad input
def test_prompt_over_the_limit(llama, tcs):
    with pytest.raises(GraphError, match=rf"limit of {MAX_GRAPH_TOKENS}.*square of the prompt length"):
        attribute(llama, tcs, list(range(MAX_GRAPH_TOKENS + 1)))
    with pytest.raises(GraphError, match="empty"):
        attribute(llama, tcs, [])


def test_transcoders_that_do_not_fit(llama, tcs):
    wide = TranscoderSet([Transcoder(64, 8, i) for i in range(llama.n_layers)])
    with pytest.raises(TranscoderError, match="d_model=64 .* width 32"):
        attribute(llama, wide, PROMPT)
    short = TranscoderSet([tcs[0], tcs[1]])
    with pytest.raises(TranscoderError, match="missing layers 2..2"):
        attribute(llama, short, PROMPT)
    with pytest.raises(TranscoderError, match=r"missing \[1\]"):
        TranscoderSet({0: tcs[0], 2: tcs[2]})


def test_empty_target_set(llama, tcs):
    with pytest.raises(GraphError, match="target set is empty"):
        attribute(llama, tcs, PROMPT, targets=[])


def test_unsupported_family():
    gpt2 = tiny_loaded("gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="Llama-style"):
        attribute(gpt2, TranscoderSet([Transcoder(32, 8, i) for i in range(3)]), PROMPT)
