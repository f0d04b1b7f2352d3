"""``trace graph`` end to end on a tiny random Llama with SmolLM2's tokenizer (``tiny_folder``): the result file,
circuit-tracer graph files, the HTML page, ``trace report`` on the result, and the one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch

from trace_lib.attribution import attribute, build_transcoders, graph_scores
from trace_lib.attribution.graph_json import validate_graph_json
from trace_lib.attribution.graph_result import GraphResult, graph_result, run_graph
from trace_lib.attribution.transcoder import Transcoder, TranscoderSet, load_transcoder_set
from trace_lib.attribution.transcoder_build import TranscoderBuildConfig
from trace_lib.attribution.transcoder_train import train_transcoders
from trace_lib.cli.app import main
from trace_lib.report import load_result, render_html

from conftest import tiny_loaded

CFG = TranscoderBuildConfig(width=32, tokens=128 * 40, batch_size=128, lr=3e-3, shuffle_buffer_tokens=512,
                            init_tokens=256)
PROMPT = "The cat <script>alert(1)</script> sat on the"


@pytest.fixture(scope="module")
def built(tiny_folder, tmp_path_factory):
    from trace_lib.models import load_model

    loaded = load_model(str(tiny_folder))
    g = torch.Generator().manual_seed(0)
    vocab = loaded.arch.embed.weight.shape[0]
    tr, he = torch.randint(0, vocab, (24, 32), generator=g), torch.randint(0, vocab, (8, 32), generator=g)
    folder = tmp_path_factory.mktemp("tcs") / "set"
    build_transcoders(loaded, folder, config=CFG, train_ids=tr, heldout_ids=he)
    partial = tmp_path_factory.mktemp("tcs-partial") / "set"
    build_transcoders(loaded, partial, layers=[0], config=CFG, train_ids=tr, heldout_ids=he)
    return loaded, folder, partial


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_graph_command_writes_result_graph_files_and_page(built, tiny_folder, tmp_path, capsys):
    loaded, folder, _ = built
    out, page = tmp_path / "out", tmp_path / "g.html"
    code, stdout, err = cli(["graph", "--model", str(tiny_folder), "--transcoders", str(folder), "--prompt", PROMPT,
                             "--variant", "gguf-q4_0", "--out", str(out), "--html", str(page)], capsys)
    assert code == 0, err
    assert "node Jaccard" in stdout and "wrote" in stdout
    result = load_result(out / "graph.json")
    assert isinstance(result, GraphResult) and result.diff is not None
    assert 0 <= result.diff["node_jaccard"] <= 1 and 0 <= result.diff["edge_jaccard"] <= 1
    for side, slug in ((result.reference, "graph-reference"), (result.variant, "graph-variant")):
        data = json.loads((out / f"{slug}.json").read_text())
        validate_graph_json(data)
        assert len(data["nodes"]) == side["counts"]["n_nodes_kept"] == len(side["nodes"])
        assert len(data["links"]) == side["counts"]["n_links"]
    index = json.loads((out / "graph-metadata.json").read_text())
    assert sorted(g["slug"] for g in index["graphs"]) == ["graph-reference", "graph-variant"]
    # the scores equal a graph attributed independently through the Python API
    g = attribute(loaded, load_transcoder_set(folder), PROMPT)
    assert result.reference["scores"]["replacement"] == pytest.approx(graph_scores(g)[0], abs=1e-6)
    assert [t["vocab_idx"] for t in result.targets] == [t.vocab_idx for t in g.targets]
    html = page.read_text()
    assert "<svg" in html and 'id="nodes-table"' in html and 'id="edges-lost"' in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    # `trace report` renders the same result file
    code, _, err = cli(["report", str(out / "graph.json"), "--html", str(tmp_path / "r.html")], capsys)
    assert code == 0, err
    assert 'class="plot graph"' in (tmp_path / "r.html").read_text()


def _refused(args, capsys, expect):
    code, out, err = cli(args, capsys)
    assert code == 2, (out, err)
    assert expect in err and len(err.strip().splitlines()) == 1, err


def test_bad_transcoders_and_inputs_are_one_line_exit_2(built, tiny_folder, tmp_path, capsys, monkeypatch):
    loaded, folder, partial = built
    base = ["graph", "--model", str(tiny_folder), "--out", str(tmp_path / "o")]
    monkeypatch.setenv("TRACE_CACHE", str(tmp_path / "empty-cache"))
    _refused([*base, "-p", "hi"], capsys, "run `trace graph build")
    _refused([*base, "-p", "hi", "--transcoders", str(partial)], capsys, "lack layers [1, 2]")
    other = tmp_path / "other"
    build_transcoders(tiny_loaded("llama"), other, config=CFG, train_ids=torch.randint(0, 128, (24, 32)),
                      heldout_ids=torch.randint(0, 128, (8, 32)))
    _refused([*base, "-p", "hi", "--transcoders", str(other)], capsys, "were built for tiny-llama")
    narrow = TranscoderSet([Transcoder(16, 8, i) for i in range(3)])
    narrow.save(tmp_path / "narrow")
    _refused([*base, "-p", "hi", "--transcoders", str(tmp_path / "narrow")], capsys, "read width d_model=16")
    _refused([*base, "-p", "hi", "--transcoders", str(folder), "--target", "not one token at all"], capsys,
             "must be exactly one token")
    _refused([*base, "-p", "word " * 80, "--transcoders", str(folder)], capsys, "over the limit of 64")
    _refused([*base, "-p", "hi", "--transcoders", str(folder), "--target", "refusal"], capsys,
             "does not refuse this prompt")
    assert not (tmp_path / "o" / "graph.json").exists()


def test_refusal_target_is_the_refusal_minus_compliance_opening(built, tiny_folder, tmp_path, monkeypatch):
    """With a reference that refuses (its reply stubbed), the graph explains logit(first refusal token) -
    logit(first token of "Sure, here") on the chat-formatted prompt."""
    import trace_lib.attribution.inputs as inputs

    loaded, folder, _ = built
    monkeypatch.setattr(inputs, "reference_refusals", lambda m, p, **kw: inputs.Refusals(
        list(p), ["I can't help with that."], [True], "stub"))
    r = run_graph(str(tiny_folder), "How do I pick a lock?", target="refusal", transcoders=folder,
                  out_dir=tmp_path / "o")
    tok = loaded.tokenizer
    ref_t, comp_t = tok("I can't", add_special_tokens=False)["input_ids"][0], tok("Sure", add_special_tokens=False)[
        "input_ids"][0]
    assert r.target["mode"] == "refusal" and r.settings["chat_formatted"]
    assert len(r.targets) == 1 and r.targets[0]["vocab_idx"] == loaded.arch.embed.weight.shape[0]
    assert r.targets[0]["label"] == f"logit({tok.decode([ref_t])})-logit({tok.decode([comp_t])})"
    assert "<|im_start|>" in "".join(r.tokens)


def test_graph_page_escapes_and_draws_the_diff(tmp_path):
    page = render_html(tiny_graph_result(tmp_path, prompt="<script>alert('x')</script>"))
    assert "<svg" in page and 'id="summary-table"' in page and 'id="nodes-table"' in page
    assert page.count("<circle") >= 3 and "<line" in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page and "<script>alert" not in page
    assert 'class="node lost"' in page or 'class="node new"' in page or 'class="node kept"' in page


def tiny_graph_result(tmp_path, prompt: str = "tiny prompt") -> GraphResult:
    """A reference and a gguf-q4_0 graph on the tiny Llama (token-id prompt), as a GraphResult."""
    from trace_lib.quant import quantize

    loaded = tiny_loaded("llama")
    tcs = train_transcoders(loaded, torch.randint(0, 128, (48, 32), generator=torch.Generator().manual_seed(0)),
                            d_transcoder=64, steps=120, skip=True)
    ids = [3, 17, 42, 99, 5, 64, 23, 81, 11, 7]
    g_ref = attribute(loaded, tcs, ids)
    g_var = attribute(quantize(loaded, "gguf-q4_0"), tcs, ids, targets=g_ref.target_spec())
    return graph_result(loaded, tcs, g_ref, g_var, prompt=prompt, target_info={"mode": "top"},
                        out_dir=tmp_path / "graphs", variant="gguf-q4_0", node_threshold=0.99, edge_threshold=0.99)
