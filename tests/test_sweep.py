"""The precision sweep on a tiny model: reference computed once, skips recorded, best config, decay curves."""

from __future__ import annotations

import json

import pytest

import trace_lib as trace
from test_audit import TINY_SAE
from trace_lib.errors import ResultFormatError, TraceError
from trace_lib.models import load_model
from trace_lib.optimization_auditor import QuantizationConfig, QuantizationType
from trace_lib.sweep import LADDERS, SweepResult


@pytest.fixture(scope="module")
def tiny_sweep(tiny_folder, tmp_path_factory):
    import os

    before = os.environ.get("TRACE_CACHE")
    os.environ["TRACE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        auditor = trace.OptimizationAuditor(load_model(tiny_folder), hooks=["blocks.1.hook_resid_post"],
                                            kl_chunks=2, kl_ctx=64)
        auditor.audit.train_sae(**TINY_SAE)
        configs = [QuantizationConfig(QuantizationType.FP32), "int8-rtn-g32",
                   QuantizationConfig(QuantizationType.INT4_RTN, bits=4, group_size=32), "int2-rtn-g32",
                   "int4-rtn-g48"]
        yield auditor.run_sweep(test_prompts="harmful_refusal_v1", configs=configs)
    finally:
        if before is None:
            os.environ.pop("TRACE_CACHE")
        else:
            os.environ["TRACE_CACHE"] = before


def test_rows_and_skips(tiny_sweep):
    names = [r.name for r in tiny_sweep.rows]
    assert names == ["fp32", "int8-rtn-g32", "int4-rtn-g32", "int2-rtn-g32", "int4-rtn-g48"]
    skipped = tiny_sweep.row("int4-rtn-g48")
    assert skipped.status == "skipped" and "does not divide" in skipped.reason
    fp32 = tiny_sweep.row("fp32")
    assert fp32.metric("all_features_cpfr") == 1.0 and fp32.metric("kld_mean") == 0.0
    # the whole-dictionary CPFR falls as bits fall
    cpfr = [tiny_sweep.row(n).metric("all_features_cpfr") for n in ("int8-rtn-g32", "int4-rtn-g32", "int2-rtn-g32")]
    assert cpfr[0] > cpfr[1] > cpfr[2]
    assert tiny_sweep.row("int2-rtn-g32").metric("kld_mean") > tiny_sweep.row("int8-rtn-g32").metric("kld_mean")


def test_best_config_explains_rejections(tiny_sweep):
    best = tiny_sweep.best_config(min_cpfr=0.5)
    # configs are tried from the smallest model up; every smaller one is listed with its reason
    sizes = {r.name: r.metric("model_size_mb") for r in tiny_sweep.rows if r.status == "ok"}
    if best.name is not None:
        assert all(sizes[n] < sizes[best.name] for n in best.rejected if n in sizes)
    assert "int4-rtn-g48" in best.rejected and "skipped" in best.rejected["int4-rtn-g48"]
    assert "best config" in str(best)


def test_decay_curve_and_round_trip(tiny_sweep, tmp_path):
    curves = tiny_sweep.decay_curves()
    pts = curves["weights"] if "weights" in curves else curves["configs"]
    assert [p["bits"] for p in pts] == sorted((p["bits"] for p in pts), reverse=True)
    path = tiny_sweep.save(tmp_path / "sweep.json")
    again = SweepResult.from_dict(json.loads(path.read_text()))
    assert again.summary() == tiny_sweep.summary()
    with pytest.raises(ResultFormatError):
        SweepResult.from_dict({"kind": "trace.audit", "version": 1})


def test_bad_ladder(tiny_folder):
    with pytest.raises(TraceError, match="unknown ladder"):
        trace.OptimizationAuditor(load_model(tiny_folder)).run_sweep(ladder="nope")


def test_ladders_cover_the_spec():
    from trace_lib.quant import parse_config

    assert [parse_config(n).weight_bits for n in LADDERS["weights"]] == [16, 8, 6, 5, 4, 3, 2]
    assert [parse_config(n).act_bits or 16 for n in LADDERS["activations"]] == [16, 8, 6, 4]
