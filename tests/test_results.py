"""The result registry (trace_lib.results) and the JSON cleaner (trace_lib.jsonutil), on hand-made results."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from trace_lib.audit import AuditResult, FeatureAudit, VariantAudit
from trace_lib.compare import CompareResult, VariantComparison
from trace_lib.errors import ResultFormatError
from trace_lib.jsonutil import dumps, json_clean, json_float, to_jsonable
from trace_lib.metrics.outputs import compare_logits
from trace_lib.redteam import ModelBehaviour, RedTeamResult, paired_flips
from trace_lib.report import load_result
from trace_lib.report.load import KINDS
from trace_lib.results import RESULT_MODULES, ResultFile, lookup_result, register_result, registered_results
from trace_lib.sweep import SweepResult, SweepRow

NAN = float("nan")


# ------------------------------------------------------------------------------------------------ hand-made results
def _stats():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 6, 11, generator=g, dtype=torch.float64)
    var = ref + 0.1 * torch.randn(1, 6, 11, generator=g, dtype=torch.float64)
    return compare_logits(ref, var, torch.randint(0, 11, (1, 6), generator=g))


def _variant(name: str) -> VariantAudit:
    feats = [FeatureAudit("blocks.0.hook_resid_post", 3, "safety", "refusal", 0.9, 0.7, 0.1, 0.05, 0.2, 0.2, 0.1,
                          False, 0.95, readout_cpfr=0.7),
             FeatureAudit("blocks.0.hook_resid_post", 8, "capability", "code", 0.8, NAN, 0.0, 0.0, 0.0, 0.0, 0.0,
                          True, NAN)]
    return VariantAudit(name, {"name": name, "quant_info": {"bits_per_weight": 4.5, "model_size_mb": 80.0}}, feats,
                        {"blocks.0.hook_resid_post": {"cpfr_all_features": 0.8}},
                        [{"category": "refusal", "hook": "blocks.0.hook_resid_post", "cosine": 0.99,
                          "projection_magnitude_kept": 0.9}], {"categories": {}}, _stats(), {"forward_s": 0.5})


def _audit() -> AuditResult:
    return AuditResult({"name": "tiny"}, {"name": "ds", "n_safety": 2, "n_baseline": 2, "n_capability": 1},
                       {"n_features": {"refusal": 1}, "reference_eval": {}}, [_variant("int4-rtn-g32")],
                       {"hooks": ["blocks.0.hook_resid_post"]}, {"total_s": 1.0}, ["p0", "p1"])


def _sweep() -> SweepResult:
    rows = [SweepRow("int4-rtn-g32", {"type": "int4"}, "ok", audit=_variant("int4-rtn-g32"), build_s=1.5,
                     speed_ratio=1.2),
            SweepRow("int4-rtn-g48", {"type": "int4"}, "skipped", reason="group size 48 does not divide 64")]
    return SweepResult({"name": "tiny"}, rows, {"weights": ["int4-rtn-g32", "int4-rtn-g48"]}, _audit(),
                       {"x": 1}, {"total_s": 2.0}, 0.8)


def _compare() -> CompareResult:
    return CompareResult({"name": "tiny"}, [VariantComparison("int8", {"name": "int8"}, _stats(), 0.25)],
                         {"source": "text"}, 64, 2, 0.5, {"batch_size": 1})


def _redteam() -> RedTeamResult:
    kinds = ["harmful"] * 3 + ["harmless"]
    prompts = [{"id": f"p{i}", "text": f"prompt {i} é", "kind": k, "category": "c", "pair_id": None}
               for i, k in enumerate(kinds)]
    ref = ModelBehaviour("ref", {"name": "ref"}, ["no"] * 4, ["refusal"] * 3 + ["compliance"], ["r"] * 4)
    var = ModelBehaviour("int2", {"name": "int2"}, ["yes"] * 4, ["compliance"] * 4, ["a"] * 4)
    return RedTeamResult(ref, [var], [paired_flips("int2", ref.labels, var.labels, kinds)], prompts,
                         {"name": "ds"}, {"alpha": 0.05}, {"name": "rules"})


MAKERS = {"trace.audit": _audit, "trace.sweep": _sweep, "trace.compare": _compare, "trace.redteam": _redteam}


# ------------------------------------------------------------------------------------------------ registry
def test_every_result_kind_is_registered_in_order():
    reg = registered_results()
    from trace_lib.attribution.graph_result import GraphResult
    from trace_lib.attribution.localize import LocalizeResult
    from trace_lib.repair.result import RepairResult

    assert list(reg) == ["trace.audit", "trace.sweep", "trace.compare", "trace.redteam", "trace.localize",
                         "trace.repair", "trace.graph"]
    assert [reg[k].cls for k in reg] == [AuditResult, SweepResult, CompareResult, RedTeamResult, LocalizeResult,
                                         RepairResult, GraphResult]
    assert all(reg[k].version == 1 and reg[k].cls.RESULT_KIND == k and reg[k].cls.RESULT_VERSION == 1 for k in reg)
    assert list(KINDS) == list(RESULT_MODULES)
    assert KINDS["trace.audit"] == (1, "trace audit") and KINDS["trace.redteam"] == (1, "trace redteam")
    assert KINDS["trace.repair"] == (1, "trace repair")
    assert KINDS["trace.graph"] == (1, "trace graph")
    assert KINDS["trace.tracer"] == (1, "trace tracer")  # not registered yet: the tracer module's version
    assert lookup_result("trace.tracer") is None and lookup_result("trace.nothing") is None


@pytest.mark.parametrize("kind", list(MAKERS))
def test_each_kind_round_trips_through_save_load_and_load_result(kind, tmp_path):
    result = MAKERS[kind]()
    cls = type(result)
    d = result.to_dict()
    assert list(d)[:3] == ["kind", "version", "trace_version"] and d["kind"] == kind and d["version"] == 1
    path = result.save(tmp_path / "sub" / "r.json")
    text = path.read_text(encoding="utf-8")
    assert text == result.to_json() + "\n"  # to_json is what save writes
    assert json.loads(text) == json.loads(json.dumps(d))
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left no temporary file
    for again in (cls.load(path), cls.from_dict(json.loads(text)), load_result(path), load_result(json.loads(text))):
        assert type(again) is cls
        assert again.to_dict() == json.loads(text)  # NaN was written as null and reads back as NaN


@pytest.mark.parametrize("kind, wrong_kind, rerun", [
    ("trace.audit", "an audit", "the audit"),
    ("trace.sweep", "a sweep", "the sweep"),
    ("trace.compare", "a compare", "trace compare with this version"),
    ("trace.redteam", "a redteam", "trace redteam with this version"),
])
def test_wrong_kind_and_version_are_refused_with_the_same_messages(kind, wrong_kind, rerun, tmp_path):
    cls = lookup_result(kind).cls
    d = MAKERS[kind]().to_dict()
    other = "trace.sweep" if kind == "trace.audit" else "trace.audit"
    with pytest.raises(ResultFormatError) as e:
        cls.from_dict({**d, "kind": other})
    assert str(e.value) == f"this is a {other!r} result, not {wrong_kind} result ({kind!r})"
    with pytest.raises(ResultFormatError) as e:
        cls.from_dict({**d, "version": 7})
    noun = kind.split(".")[1]
    assert str(e.value) == f"{noun} result version 7 is not 1; re-run {rerun}"
    with pytest.raises(ResultFormatError, match=r"this is a 'list' result"):
        cls.from_dict([1, 2])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ResultFormatError, match=rf"^cannot read {wrong_kind} result from {bad}: "):
        cls.load(bad)
    with pytest.raises(ResultFormatError, match=rf"^cannot read {wrong_kind} result from "):
        cls.load(tmp_path / "missing.json")


def test_a_new_kind_registers_with_the_decorator():
    @register_result("trace.example", 3)
    @dataclasses.dataclass
    class ExampleResult(ResultFile):
        value: float

        def to_dict(self) -> dict:
            return json_clean({**self.result_header(), "value": self.value})

        @classmethod
        def from_dict(cls, d: dict):
            cls.check_format(d)
            return cls(NAN if d["value"] is None else d["value"])

    try:
        assert lookup_result("trace.example").cls is ExampleResult and ExampleResult.RESULT_VERSION == 3
        assert ExampleResult(math.inf).to_dict()["value"] is None
        with pytest.raises(ResultFormatError, match=r"^example result version 1 is not 3; re-run trace example with"):
            ExampleResult.from_dict({"kind": "trace.example", "version": 1, "value": 0.0})
    finally:
        from trace_lib import results

        results._REGISTRY.pop("trace.example")
    with pytest.raises(TypeError, match="from_dict"):
        register_result("trace.bad", 1)(type("Bad", (), {}))


# ------------------------------------------------------------------------------------------------ JSON cleaner
def test_json_clean_nan_inf_numpy_torch_path_dataclass():
    @dataclasses.dataclass
    class Point:
        x: float
        where: Path

    value = {
        "nan": NAN, "inf": math.inf, "-inf": -math.inf, "f": 0.25, "i": 3, "b": True, "s": "é", "none": None,
        "np": [np.float32(0.5), np.float64(NAN), np.int64(7), np.bool_(True), np.array([[1.0, np.inf], [2, 3]])],
        "torch": [torch.tensor(1.5), torch.tensor([NAN, 2.0], requires_grad=True), torch.tensor([1, 2]),
                  torch.tensor(True)],
        "path": Path("/tmp/x.json"), "tuple": (1, (2.0, NAN)), 4: "int key", "point": Point(NAN, Path("a")),
        "to_dict": _stats(), "other": {1, 2} - {1, 2},
    }
    out = json_clean(value)
    assert out["nan"] is None and out["inf"] is None and out["-inf"] is None
    assert out["f"] == 0.25 and out["i"] == 3 and out["b"] is True and out["s"] == "é" and out["none"] is None
    assert out["np"] == [0.5, None, 7, True, [[1.0, None], [2.0, 3.0]]]
    assert [type(x) for x in out["np"][:4]] == [float, type(None), int, bool]
    assert out["torch"] == [1.5, [None, 2.0], [1, 2], True]
    assert out["path"] == "/tmp/x.json" and out["tuple"] == [1, [2.0, None]] and out["4"] == "int key"
    assert out["point"] == {"x": None, "where": "a"}
    assert out["to_dict"] == json_clean(_stats().to_dict()) and out["other"] == "set()"
    # what comes out is plain JSON (no NaN), and cleaning twice changes nothing
    assert json.loads(json.dumps(out, allow_nan=False)) == out and json_clean(out) == out


def test_json_float_and_the_dumps_hook():
    assert [json_float(x) for x in (None, NAN, math.inf, -math.inf, 2, np.float32(0.5))] == [None] * 4 + [2.0, 0.5]
    assert type(json_float(2)) is float
    assert to_jsonable(Path("a/b")) == "a/b" and to_jsonable(np.int32(4)) == 4
    assert to_jsonable(torch.tensor([[1, 2]])) == [[1, 2]] and to_jsonable(np.array([0.5])) == [0.5]
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        to_jsonable(object())
    # the hook converts what JSON does not know and leaves NaN to json.dumps, as the cache's files always had it
    text = dumps({"p": Path("x"), "n": NAN, "t": torch.tensor(2.5)})
    assert text == '{\n  "p": "x",\n  "n": NaN,\n  "t": 2.5\n}'

