"""trace report for ModelTracer results (``trace.tracer``): verdict, per-layer table, quantization-error and
logit-lens views, attention and KV cache, from real traces of tiny models."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from test_report import EVIL, EVIL_IMG, EVIL_SCRIPT, Page, assert_self_contained
from trace_lib.report import load_result, render_html, write_html
from trace_lib.report.kit import JS, esc, fmt
from trace_lib.report.load import KINDS, TracerData

from conftest import tiny_loaded

SECTIONS = ["verdict", "layers", "quant", "lens", "attention", "kv", "models"]


def _ids(seed: int = 1, seq: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, seq), generator=g)


def make_tracer(variant: str = "int2-rtn-g32", kv_cache: str = "fp8", generate: int = 3):
    """A full trace of a tiny Llama quantized with ``variant`` against the original, and a generation."""
    from trace_lib.quant import quantize
    from trace_lib.tracer import ModelTracer, ModelTracerConfig

    ref = tiny_loaded("llama")
    tracer = ModelTracer(ModelTracerConfig.full(kv_cache=kv_cache)).attach(quantize(ref, variant), reference=ref)
    tracer.trace(input_ids=_ids())
    if generate:
        tracer.generate(input_ids=_ids(seq=5), max_new_tokens=generate, stop_at_eos=False)
    return tracer


def tracer_dict() -> dict:
    """The saved JSON of :func:`make_tracer` (as ``trace report tracer.json`` reads it)."""
    return json.loads(json.dumps(make_tracer().to_dict(), allow_nan=False))


@pytest.fixture(scope="module")
def tracer_obj():
    return make_tracer()


@pytest.fixture(scope="module")
def result(tracer_obj) -> dict:
    return json.loads(json.dumps(tracer_obj.to_dict(), allow_nan=False))


@pytest.fixture(scope="module")
def page_html(result) -> str:
    return render_html(load_result(result))


def _cell_value(cell) -> float:
    s = cell[1].get("data-sort")
    return math.nan if s in (None, "") else float(s)


def _col(page: Page, table_id: str, name: str) -> int:
    header = [c[0].strip() for c in page.tables[table_id][0]]
    return header.index(name)


# ------------------------------------------------------------------------------------------------ loading
def test_load_result_reads_the_tracer_kind(result, tmp_path):
    from trace_lib.tracer.tracer import RESULT_KIND, RESULT_VERSION

    assert KINDS[RESULT_KIND][0] == RESULT_VERSION
    path = tmp_path / "tracer.json"
    path.write_text(json.dumps(result))
    loaded = load_result(path)
    assert isinstance(loaded, TracerData) and loaded.kind == "trace.tracer" and loaded == result


# ------------------------------------------------------------------------------------------------ the page
def test_page_sections_verdict_first(result, page_html):
    page = Page(page_html)
    assert [a.get("id") for t, a in page.elements if t == "section"] == SECTIONS
    banner = next(a for t, a in page.elements if a.get("id") == "verdict-banner")
    s = result["summary"]
    expected = ("WARNING" if s["anomalies_detected"] or s["quant_criticals"] else
                "CHECK" if s["quant_warnings"] else "OK")
    assert banner["data-verdict"] == expected
    assert s["quant_criticals"] > 0 and expected == "WARNING"  # int2 on the tiny model: critical layers
    plots = {a.get("data-plot") for t, a in page.elements if t == "svg" and "plot" in a.get("class", "")}
    assert plots == {"quant-error", "logit-lens", "attention", "kv-cache"}
    for tid in ("layers-table", "tracked-table", "attention-table", "kv-table"):
        assert "sortable" in next(a for t, a in page.elements if a.get("id") == tid)["class"]
    assert_self_contained(page_html)
    assert page.scripts == [JS]
    assert page_html.index('id="verdict"') < page_html.index('id="layers"') < page_html.index('id="quant"')


def test_verdict_and_summary_numbers(result, page_html):
    page = Page(page_html)
    verdict = {r[0][0]: r[1][0] for r in page.tables["verdict-table"]}
    s = result["summary"]
    q = result["forwards"][0]["quant_error"]
    assert verdict["first anomaly"] == "none"
    assert verdict["quantization"] == f"{s['quant_warnings']} warning and {s['quant_criticals']} critical layers"
    assert verdict["quantization"] == f"{q['warnings']} warning and {q['criticals']} critical layers"
    div = q["first_divergence"]
    assert verdict["first divergence"].startswith(f"layer {div['layer']}, token {div['token_index']} ")
    lens = result["forwards"][0]["logit_lens"][-1]
    assert f"decisive layer {lens['decisive_layer']} " in verdict["logit lens"]
    summary = {r[0][0]: r[1] for r in Page(page_html).rows("summary-table")}
    assert list(summary) == list(s)
    for k, v in s.items():
        assert _cell_value(summary[k]) == pytest.approx(v, abs=0), k
    assert f"  Quant criticals: {s['quant_criticals']}" in page_html


def test_layer_table_numbers_are_the_results(result, page_html):
    page = Page(page_html)
    fwd = result["forwards"][0]
    rows = page.rows("layers-table")
    layers = fwd["layers"]
    assert len(rows) == len(layers) == 3
    qe = {e["layer"]: e for e in fwd["quant_error"]["layers"]}
    lens = fwd["logit_lens"][-1]
    final = next(t for t in lens["tracked_tokens"] if t["token_id"] == lens["final_top1"])
    resid = {r["layer"]: r["stats"] for r in fwd["activations"]["records"] if r["point"] == "resid_post"}
    col = {name: _col(page, "layers-table", name) for name in
           ("layer", "resid norm", "resid std", "p", "rank of final", "final logit", "KL→final", "cosine",
            "rel. L2 error", "SNR dB", "level", "max |Δ|")}
    th = fwd["quant_error"]["thresholds"]
    for row, want in zip(rows, layers):
        i = want["layer"]
        assert _cell_value(row[col["layer"]]) == i
        # the exact numbers in data-sort, the formatted ones shown
        assert _cell_value(row[col["SNR dB"]]) == want["snr_db"] == qe[i]["snr_db"]
        assert row[col["SNR dB"]][0] == fmt(want["snr_db"], ".2f")
        assert _cell_value(row[col["cosine"]]) == want["cosine"]
        assert row[col["cosine"]][0] == fmt(want["cosine"], ".5f")
        assert _cell_value(row[col["rel. L2 error"]]) == want["rel_l2"]
        assert _cell_value(row[col["max |Δ|"]]) == qe[i]["max_abs_error"]
        assert row[col["level"]][0] == want["quant_level"]
        assert _cell_value(row[col["resid norm"]]) == want["resid_norm"]
        assert _cell_value(row[col["resid std"]]) == resid[i]["std"]
        assert _cell_value(row[col["p"]]) == want["lens_top_prob"]
        assert _cell_value(row[col["rank of final"]]) == want["final_token_rank"]
        assert _cell_value(row[col["final logit"]]) == final["per_layer_logit"][i]
        assert _cell_value(row[col["KL→final"]]) == want["kl_to_final"]
        # highlighting: the SNR cell carries its own level against the thresholds
        snr_level = ("critical" if want["snr_db"] < th["critical_snr_db"] else
                     "warning" if want["snr_db"] < th["warning_snr_db"] else None)
        assert row[col["SNR dB"]][1].get("data-level") == snr_level
        if snr_level:
            assert f"level-{snr_level}" in row[col["SNR dB"]][1]["class"] and row[col["SNR dB"]][1]["style"]
        if want["quant_level"] in ("warning", "critical"):
            assert f"level-{want['quant_level']}" in row[col["level"]][1]["class"]
    levels = [a.get("data-level") for t, a in page.elements if t == "tr" and a.get("data-layer") is not None]
    assert levels == [r["quant_level"] if r["quant_level"] != "ok" else None for r in layers]


def test_attention_and_kv_numbers(result, page_html):
    page = Page(page_html)
    fwd = result["forwards"][0]
    rows = page.by_first_cell("attention-table")
    c = _col(page, "attention-table", "mean entropy")
    for layer in range(3):
        ents = [a["entropy"] for a in fwd["attention"] if a["layer"] == layer]
        assert _cell_value(rows[str(layer)][c]) == pytest.approx(sum(ents) / len(ents), rel=1e-12)
    steps = result["generations"][0]["kv_cache"]["steps"]
    kv = page.rows("kv-table")
    assert len(kv) == len(steps) == 3
    for row, st in zip(kv, steps):
        assert _cell_value(row[_col(page, "kv-table", "bytes")]) == st["cache_size_bytes"]
        assert _cell_value(row[_col(page, "kv-table", "positions")]) == st["valid_positions"]
        assert _cell_value(row[_col(page, "kv-table", "key rel. err")]) == st["key_rel_error"]
        assert _cell_value(row[_col(page, "kv-table", "next-token KL")]) == st["next_token_kl"]


def test_render_is_deterministic_and_equal_from_file_and_object(result, tracer_obj, page_html, tmp_path):
    assert render_html(load_result(copy.deepcopy(result))) == page_html
    assert render_html(result) == page_html  # a plain dict is loaded by its kind
    path = tmp_path / "tracer.json"
    tracer_obj.save(path)
    assert render_html(path) == page_html
    assert render_html(tracer_obj) == page_html  # the ModelTracer itself
    out = write_html(load_result(path), tmp_path / "sub" / "tracer.html")
    assert out.read_text(encoding="utf-8") == page_html
    assert [p.name for p in out.parent.iterdir()] == ["tracer.html"]


def test_token_strings_and_names_are_escaped(result):
    d = copy.deepcopy(result)
    d["model"]["name"] = f"tiny {EVIL}"
    d["notes"] = [f"note {EVIL}"]
    fwd = d["forwards"][0]
    fwd["tokens"] = [[EVIL_SCRIPT, EVIL_IMG] + row[2:] for row in fwd["tokens"]]
    for lens in fwd["logit_lens"]:
        lens["top_token_strs"] = [EVIL for _ in lens["top_token_strs"]]
        for t in lens["tracked_tokens"]:
            t["token_str"] = EVIL_IMG
    for row in fwd["layers"]:
        row["lens_top_str"] = EVIL
    fwd["quant_error"]["first_divergence"] = {**(fwd["quant_error"]["first_divergence"] or {}), "layer": 0,
                                              "token_index": 1, "token": EVIL_SCRIPT}
    fwd["activations"]["records"][3]["anomalies"] = [{"kind": "nan", "hook": EVIL, "layer": 0,
                                                      "description": f"NaN {EVIL}"}]
    fwd["anomaly"] = f"NaN {EVIL}"
    d["generations"][0]["kv_cache"]["steps"][0]["token_str"] = EVIL
    text = render_html(load_result(d))
    assert EVIL_SCRIPT not in text and "<img" not in text
    assert esc(repr(EVIL)) in text and esc(repr(EVIL_IMG)) in text and esc(repr(EVIL_SCRIPT)) in text
    assert esc(f"NaN {EVIL}") in text and esc(f"tiny {EVIL}") in text
    # the final top-1 token reaches the logit-lens figure too, escaped by matplotlib
    assert "rank of the final top-1 '\"&gt;&lt;img" in text  # text content: < and > escaped
    page = Page(text)
    assert [t for t, _ in page.elements].count("script") == 1
    assert not any(t == "img" for t, _ in page.elements)
    assert not any(k.startswith("on") for _, a in page.elements for k in a)
    assert_self_contained(text)
    banner = next(a for t, a in page.elements if a.get("id") == "verdict-banner")
    assert banner["data-verdict"] == "WARNING"


def test_identical_variant_is_ok_with_infinite_snr():
    tracer = make_tracer("fp32", kv_cache="dynamic", generate=0)
    d = json.loads(json.dumps(tracer.to_dict(), allow_nan=False))
    page = Page(render_html(d))
    banner = next(a for t, a in page.elements if a.get("id") == "verdict-banner")
    assert banner["data-verdict"] == "OK"
    col = _col(page, "layers-table", "SNR dB")
    for row in page.rows("layers-table"):
        assert row[col][0] == "∞" and row[col][1]["data-sort"] == "Infinity" and "data-level" not in row[col][1]
        assert row[_col(page, "layers-table", "cosine")][0] == "1.00000"
    assert any(t == "svg" and a.get("data-plot") == "quant-error" for t, a in page.elements)
    assert "No generation traced." in render_html(d)


def test_nan_variant_and_no_reference():
    from trace_lib.tracer import ModelTracer, ModelTracerConfig

    broken = tiny_loaded("llama")
    weight = next(p for _, p in broken.arch.layers[1].named_parameters() if p.dim() == 2)
    with torch.no_grad():
        weight.fill_(float("nan"))
    tracer = ModelTracer(ModelTracerConfig.full()).attach(broken, reference=tiny_loaded("llama"))
    fwd = tracer.trace(input_ids=_ids())
    d = json.loads(json.dumps(tracer.to_dict(), allow_nan=False))
    text = render_html(d)
    page = Page(text)
    banner = next(a for t, a in page.elements if a.get("id") == "verdict-banner")
    assert banner["data-verdict"] == "WARNING" and "numerical anomaly" in text
    verdict = {r[0][0]: r[1][0] for r in page.tables["verdict-table"]}
    assert verdict["first anomaly"] == fwd.anomaly and "blocks.1." in fwd.anomaly
    rows = page.by_first_cell("layers-table")
    assert rows["0"][_col(page, "layers-table", "anomalies")][0] == "-"
    assert "nan" in rows["1"][_col(page, "layers-table", "anomalies")][0]
    assert rows["1"][_col(page, "layers-table", "cosine")][0] == fmt(d["forwards"][0]["layers"][1]["cosine"], ".5f")
    assert rows["1"][_col(page, "layers-table", "level")][0] == "critical"
    assert "anomalies-table" in page.tables

    plain = ModelTracer(ModelTracerConfig.lightweight()).attach(tiny_loaded("llama"))
    plain.trace(input_ids=_ids())
    page = Page(render_html(plain))
    header = [c[0] for c in page.tables["layers-table"][0]]
    assert "cosine" not in header and "SNR dB" not in header
    assert not any(t == "svg" for t, _ in page.elements)
    assert next(a for t, a in page.elements if a.get("id") == "verdict-banner")["data-verdict"] == "OK"


# ------------------------------------------------------------------------------------------------ commands
def test_tracer_cli_writes_html_and_trace_report_reads_the_json(tiny_folder, tmp_path, capsys):
    import typer
    from typer.testing import CliRunner

    from trace_lib.cli.report import report_command
    from trace_lib.cli.tracer import tracer_command

    out, html = tmp_path / "tracer.json", tmp_path / "tracer.html"
    tracer_command(prompt="The capital of France is <b>Paris</b>", model=str(tiny_folder),
                   variant="int4-rtn-g32", generate=2, out_path=out, html=html)
    assert f"wrote {html}" in capsys.readouterr().out.replace("\n", "")
    text = html.read_text(encoding="utf-8")
    assert text == render_html(load_result(out))
    d = json.loads(out.read_text())
    fwd = d["forwards"][0]
    assert any("<b>" in t or "<" in t for t in fwd["tokens"][0])  # real tokens, escaped on the page
    for t in fwd["tokens"][0]:
        assert esc(repr(t)) in text
    for row in fwd["layers"]:
        assert esc(repr(row["lens_top_str"])) in text
    assert "<b>" not in text
    assert_self_contained(text)

    app = typer.Typer()
    app.command("report")(report_command)

    @app.command()
    def other() -> None:  # two commands, so "report" is a sub-command as in trace's app
        pass

    page = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", str(out), "--html", str(page)])
    assert res.exit_code == 0, res.output
    assert page.read_text(encoding="utf-8") == text


def test_tracer_plots_are_deterministic_svg():
    from trace_lib.report import plots

    th = {"warning_cosine": 0.99, "warning_snr_db": 20.0, "critical_cosine": 0.9, "critical_snr_db": 10.0}
    args = ([0, 1, 2], [0.999, 0.95, None], [30.0, 15.0, None], ["ok", "warning", "critical"], th)
    a = plots.quant_error_svg(*args, prefix="q")
    assert a == plots.quant_error_svg(*args, prefix="q") and a.startswith("<svg") and "<metadata" not in a
    assert "warning: cosine &lt; 0.99 or SNR &lt; 20 dB" in a
    lens = plots.logit_lens_svg([0, 1, 2], [3.0, 1.0, 0.0], [500, 3, 0], 2, "<b>", prefix="l")
    assert lens == plots.logit_lens_svg([0, 1, 2], [3.0, 1.0, 0.0], [500, 3, 0], 2, "<b>", prefix="l")
    assert "decisive layer 2" in lens and "&lt;b&gt;" in lens and "<b>" not in lens
    assert plots.quant_error_svg([], [], [], [], th) == "" and plots.kv_cache_svg([], [], []) == ""
    assert plots.attention_entropy_svg([0], [[math.nan]]) == ""
    assert plots.kv_cache_svg([0, 1], [5, 6], [100, 120]).startswith("<svg")
