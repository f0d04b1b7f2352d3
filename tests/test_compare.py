"""Output comparison end to end: the pipeline's KL statistics against a direct recomputation, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from trace_lib.capture.inputs import pack_texts
from trace_lib.cli import main
from trace_lib.compare import CompareResult, compare_outputs
from trace_lib.errors import ResultFormatError
from trace_lib.models import load_model
from trace_lib.quant import quantize

TEXT = ["The quick brown fox jumps over the lazy dog. " * 20, "Quantization rounds weights to fewer bits. " * 20]


def test_pipeline_kld_equals_direct_computation(tiny_folder):
    ref = load_model(tiny_folder)
    var = quantize(ref, "int2-rtn-g32")
    result = compare_outputs(ref, [var, "fp32"], texts=TEXT, ctx=64, n_chunks=4, batch_size=3)
    ids = pack_texts(ref.tokenizer, TEXT, 64, max_sequences=4)
    with torch.no_grad():
        lp_ref = F.log_softmax(ref.model(ids).logits[:, 32:-1].double(), -1)
        lp_var = F.log_softmax(var.model(ids).logits[:, 32:-1].double(), -1)
    kld = (lp_ref.exp() * (lp_ref - lp_var)).sum(-1)
    stats = result.variants[0].stats
    assert stats.n_tokens == kld.numel() == 4 * 31
    assert stats.kld_mean == pytest.approx(kld.mean().item(), rel=1e-9)
    same = (lp_ref.argmax(-1) == lp_var.argmax(-1)).double().mean().item()
    assert stats.same_top_rate == pytest.approx(same)
    nll_ref = -lp_ref.gather(-1, ids[:, 33:, None]).squeeze(-1)
    assert stats.ppl_base == pytest.approx(nll_ref.mean().exp().item(), rel=1e-9)
    assert stats.kld_mean > 0
    ctrl = result.variants[1].stats
    assert ctrl.kld_mean == 0 and ctrl.same_top_rate == 1 and ctrl.ppl_ratio == 1
    again = CompareResult.from_dict(json.loads(result.to_json()))
    assert again.variants[0].stats.kld_mean == stats.kld_mean


def test_result_kind_is_checked():
    with pytest.raises(ResultFormatError, match="not a compare result"):
        CompareResult.from_dict({"kind": "trace.audit", "version": 1})
    with pytest.raises(ResultFormatError, match="version 99"):
        CompareResult.from_dict({"kind": "trace.compare", "version": 99})


def test_cli_compare_writes_json(tiny_folder, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(TEXT))
    main(["compare", "--model", str(tiny_folder), "-v", "fp32", "-v", "int4-rtn-g32", "--text", str(text),
          "--ctx", "64", "--chunks", "2", "--out", str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert data["kind"] == "trace.compare"
    assert [v["name"] for v in data["variants"]] == ["fp32", "int4-rtn-g32"]
    assert data["variants"][0]["stats"]["kld_mean"] == 0
    assert "int4-rtn-g32" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["compare", "--model", "/no/such/model"], "no model at"),
    (["compare", "-v", "int4-bogus"], "unknown quantization config"),
    (["compare", "--text", "/no/such/file.txt", "-v", "fp32"], "no text file"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    _assert_one_line_error(argv, message, capsys)


def _assert_one_line_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err


def test_cli_bad_model_files_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no config here")
    _assert_one_line_error(["compare", "--model", str(tmp_path / "empty")], "no config.json", capsys)
    (tmp_path / "text.gguf").write_text("this is not a GGUF file")
    _assert_one_line_error(["compare", "--model", str(tmp_path / "text.gguf")], "not a GGUF file", capsys)
    from trace_lib.models.default import default_gguf_path

    head = default_gguf_path().read_bytes()[: 1 << 16]  # a real GGUF header, cut off
    (tmp_path / "cut.gguf").write_bytes(head)
    _assert_one_line_error(["compare", "--model", str(tmp_path / "cut.gguf")], "truncated", capsys)


@pytest.mark.parametrize("hook, message", [
    ("blocks.0.hook_bogus", "unknown hook"),
    ("blocks.99.hook_resid_post", "out of range"),
])
def test_cli_bad_hooks_are_one_line(tiny_folder, tmp_path, hook, message, capsys):
    _assert_one_line_error(["audit", "--model", str(tiny_folder), "-v", "fp16", "--hook", hook,
                            "--out", str(tmp_path)], message, capsys)


def test_cli_group_size_and_unrunnable_type_are_one_line(tiny_folder, monkeypatch, capsys):
    base = ["compare", "--model", str(tiny_folder), "--ctx", "32", "--chunks", "1"]
    _assert_one_line_error([*base, "-v", "int4-rtn-g48"], "group size 48 does not divide", capsys)

    import torchao.quantization

    def no_kernel(*a, **k):
        raise NotImplementedError("no CPU kernel for this layout\n(torch internals)")

    monkeypatch.setattr(torchao.quantization, "quantize_", no_kernel)  # what a machine without the kernel says
    _assert_one_line_error([*base, "-v", "int8-dyn-tok"], "could not apply int8-dyn-tok on this machine", capsys)


@pytest.mark.slow
def test_default_model_compare(default_loaded):
    result = compare_outputs(default_loaded, ["fp32", "fp16", "int4-rtn-g32"], ctx=128, n_chunks=2)
    fp32, fp16, int4 = (v.stats for v in result.variants)
    assert fp32.kld_mean == 0 and fp32.same_top_rate == 1
    assert 0 < fp16.kld_mean < 1e-3 and fp16.same_top_rate > 0.97
    assert int4.kld_mean > 10 * fp16.kld_mean
    assert 5 < fp32.ppl_base < 200  # a real model on English prose
