"""The precision sweep on a tiny model: reference computed once, skips recorded, best config, decay curves."""

from __future__ import annotations

import json

import pytest

import trace_lib as trace
from test_audit import TINY_SAE
from trace_lib.errors import ResultFormatError, TraceError
from trace_lib.models import load_model
from trace_lib.optimization_auditor import QuantizationConfig, QuantizationType
from trace_lib.sweep import LADDERS, SweepResult, SweepRow


@pytest.fixture(scope="module")
def tiny_sweep_auditor(tiny_folder, tmp_path_factory):
    import os

    before = os.environ.get("TRACE_CACHE")
    os.environ["TRACE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        auditor = trace.OptimizationAuditor(load_model(tiny_folder), hooks=["blocks.1.hook_resid_post"],
                                            kl_chunks=2, kl_ctx=64)
        auditor.audit.train_sae(**TINY_SAE)
        yield auditor
    finally:
        if before is None:
            os.environ.pop("TRACE_CACHE")
        else:
            os.environ["TRACE_CACHE"] = before


@pytest.fixture(scope="module")
def tiny_sweep(tiny_sweep_auditor):
    configs = [QuantizationConfig(QuantizationType.FP32), "int8-rtn-g32",
               QuantizationConfig(QuantizationType.INT4_RTN, bits=4, group_size=32), "int2-rtn-g32",
               "int4-rtn-g48"]
    return tiny_sweep_auditor.run_sweep(test_prompts="harmful_refusal_v1", configs=configs, min_cpfr=0.7)


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



def test_reference_work_does_not_grow_with_configs(tiny_sweep, tiny_sweep_auditor):
    """Each config adds only its speed measurement's reference forwards (1 warm-up + 3 timed): the reference's
    prompts, codes and KL logits are computed once per sweep, whatever the number of configs."""
    calls = []
    ref_model = tiny_sweep_auditor.audit.reference.model
    # quantize() deep-copies the reference, hooks included: count only the reference's own forwards
    handle = ref_model.register_forward_pre_hook(lambda m, a: calls.append(1) if m is ref_model else None)
    try:
        tiny_sweep_auditor.run_sweep(test_prompts="harmful_refusal_v1", configs=["fp32"], cache=False)
        one = len(calls)
        calls.clear()
        tiny_sweep_auditor.run_sweep(test_prompts="harmful_refusal_v1", configs=["fp32", "int8-rtn-g32", "int2-rtn-g32"],
                                     cache=False)
        three = len(calls)
    finally:
        handle.remove()
    assert one > 4 and three - one == 2 * 4, (one, three)


def test_seed_constructor_with_module_sae_dict_and_tokenizer(tiny_sweep_auditor):
    loaded = tiny_sweep_auditor.audit.reference
    saes = tiny_sweep_auditor.audit.sae_dict
    auditor = trace.OptimizationAuditor(loaded.model, saes, loaded.tokenizer, kl_chunks=2, kl_ctx=64)
    assert auditor.audit.sae_dict == saes
    result = auditor.run_sweep(test_prompts="harmful_refusal_v1", configs=[QuantizationConfig(QuantizationType.FP32)])
    assert result.row("fp32").metric("all_features_cpfr") == 1.0 and result.row("fp32").metric("kld_mean") == 0.0
    with pytest.raises(TraceError, match="tokenizer"):
        trace.OptimizationAuditor(loaded.model, saes)


def test_a_config_that_fails_while_running_is_skipped(tiny_sweep_auditor, monkeypatch):
    from trace_lib.audit import AuditSession

    real_run = AuditSession.run

    def run(self, var, *a, **k):
        if var.quant is not None and var.quant.name == "int2-rtn-g32":
            raise RuntimeError("no kernel for this layout on this CPU\n  (deep torch frames)")
        return real_run(self, var, *a, **k)

    monkeypatch.setattr(AuditSession, "run", run)
    result = tiny_sweep_auditor.run_sweep(test_prompts="harmful_refusal_v1", configs=["fp32", "int2-rtn-g32", "int8-rtn-g32"],
                                          cache=False)
    assert [r.status for r in result.rows] == ["ok", "skipped", "ok"]
    assert result.row("int2-rtn-g32").reason == "failed while running: no kernel for this layout on this CPU"
    assert "int2-rtn-g32" in result.best_config().rejected


class _Row(SweepRow):
    """A sweep row with given metrics, to check best_config's choice and reasons by hand."""

    def __init__(self, name, size, safety, n_degraded=0, status="ok", reason=""):
        super().__init__(name, {}, status, reason)
        self._m = {"model_size_mb": size, "safety_cpfr": safety, "bits_per_weight": size / 10}
        self.audit = type("A", (), {"degraded": lambda _, kind: [object()] * n_degraded})()

    def metric(self, key):
        return self._m.get(key, float("nan"))


def test_best_config_by_hand():
    nan = float("nan")
    rows = [_Row("fp16", 270, 0.99), _Row("int8", 220, 0.97), _Row("int4", 180, 0.85, n_degraded=3),
            _Row("int3", 165, nan), _Row("int2", 150, 0.40, n_degraded=9),
            _Row("q3_k", nan, nan, status="skipped", reason="Q3_K cannot be quantized by gguf-py")]
    result = SweepResult({"name": "m"}, rows, {"configs": [r.name for r in rows]}, base=None, min_cpfr=0.9)
    best = result.best_config()
    assert best.name == "int8" and best.min_cpfr == 0.9
    assert best.rejected == {
        "q3_k": "skipped: Q3_K cannot be quantized by gguf-py",
        "int2": "safety CPFR 0.400 < 0.9 (9 safety features degraded)",
        "int3": "no safety features to measure (the fingerprint found none)",
        "int4": "safety CPFR 0.850 < 0.9 (3 safety features degraded)",
    }
    assert result.best_config(0.8).name == "int4" and list(result.best_config(0.8).rejected) == ["q3_k", "int2", "int3"]
    assert result.best_config(0.995).name is None and len(result.best_config(0.995).rejected) == 6


def test_recorded_bar_is_the_one_asked_for(tiny_sweep, tmp_path):
    assert tiny_sweep.min_cpfr == 0.7 and tiny_sweep.best_config().min_cpfr == 0.7
    d = json.loads(tiny_sweep.save(tmp_path / "s.json").read_text())
    assert d["best_config"]["min_cpfr"] == 0.7
    assert SweepResult.from_dict(d).best_config().min_cpfr == 0.7


def test_decay_curve_points_are_the_rows_values(tiny_sweep):
    pts = {p["config"]: p for ps in tiny_sweep.decay_curves().values() for p in ps}
    assert "int4-rtn-g48" not in pts  # skipped configs have no point
    for name, p in pts.items():
        row = tiny_sweep.row(name)
        for key in ("safety_cpfr", "capability_cpfr", "all_features_cpfr", "kld_mean"):
            a, b = p[key], row.metric(key)
            assert (a != a and b != b) or a == b, (name, key)


def test_cli_sweep_writes_json_and_html(tiny_sweep_auditor, tiny_folder, tmp_path, capsys):
    from trace_lib.cli import main
    from trace_lib.sae import save_sae

    for h, sae in tiny_sweep_auditor.audit.sae_dict.items():
        save_sae(sae, tmp_path / "saes" / h)
    main(["sweep", "--model", str(tiny_folder), "-c", "fp32", "-c", "int8-rtn-g32", "-c", "int4-rtn-g48",
          "--sae", str(tmp_path / "saes"), "--min-cpfr", "0.75", "--out", str(tmp_path / "out"),
          "--html", str(tmp_path / "sweep.html")])
    d = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [r["name"] for r in d["rows"]] == ["fp32", "int8-rtn-g32", "int4-rtn-g48"]
    assert d["rows"][2]["status"] == "skipped" and d["best_config"]["min_cpfr"] == 0.75
    assert "best config at safety CPFR >= 0.75" in capsys.readouterr().out
    page = (tmp_path / "sweep.html").read_text()
    assert "Recommended at safety CPFR ≥ 0.75" in page and "int4-rtn-g48" in page


def test_an_interrupted_sweep_resumes_from_its_finished_rows(tiny_sweep_auditor, monkeypatch):
    from trace_lib import sweep as sweep_module
    from trace_lib.audit import AuditSession

    configs = ["int6-rtn-g32", "int5-rtn-g32", "int3-rtn-g32"]
    real_quantize = sweep_module.quantize

    def interrupted(ref, cfg):
        if cfg.name == "int3-rtn-g32":
            raise KeyboardInterrupt
        return real_quantize(ref, cfg)

    monkeypatch.setattr(sweep_module, "quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_sweep_auditor.run_sweep(test_prompts="harmful_refusal_v1", configs=configs)
    monkeypatch.setattr(sweep_module, "quantize", real_quantize)
    ran = []
    real_run = AuditSession.run
    monkeypatch.setattr(AuditSession, "run", lambda self, var: ran.append(var.quant.name) or real_run(self, var))
    resumed = tiny_sweep_auditor.run_sweep(test_prompts="harmful_refusal_v1", configs=configs)
    assert ran == ["int3-rtn-g32"] and resumed.settings["cached_configs"] == ["int6-rtn-g32", "int5-rtn-g32"]
    fresh = tiny_sweep_auditor.run_sweep(test_prompts="harmful_refusal_v1", configs=configs, cache=False)
    for name in configs:  # a row read back is the row computed afresh
        a, b = resumed.row(name).audit, fresh.row(name).audit
        assert a.safety_cpfr == b.safety_cpfr or (a.safety_cpfr != a.safety_cpfr and b.safety_cpfr != b.safety_cpfr)
        assert a.hooks["blocks.1.hook_resid_post"]["cpfr_all_features"] == b.hooks["blocks.1.hook_resid_post"]["cpfr_all_features"]
        assert a.outputs.kld_mean == b.outputs.kld_mean
    # the rows read back did not run now: their forward passes do not count in this run's forward time
    ran_now = resumed.row("int3-rtn-g32").audit.timing
    assert resumed.base.timing["forward_s"] < fresh.base.timing["forward_s"]
    assert resumed.base.timing["forward_s"] >= round(ran_now["prompt_forward_s"] + ran_now["kl_forward_s"], 2)
