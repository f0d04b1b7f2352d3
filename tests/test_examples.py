"""The examples in examples/ run as written (on a tiny model with a saved SAE, so in seconds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from test_audit import tiny_audit  # noqa: F401  (the module fixture: a tiny audit with a trained SAE)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sae_dir(tiny_audit, tmp_path_factory):  # noqa: F811
    from trace_lib.sae import save_sae

    folder = tmp_path_factory.mktemp("saes")
    for h, sae in tiny_audit[0].sae_dict.items():
        save_sae(sae, folder / h)
    return folder


def test_basic_audit_example(tiny_folder, sae_dir, tmp_path, capsys):
    result = _load("basic_audit").main(str(tiny_folder), "int2-rtn-g32", str(sae_dir), str(tmp_path / "a.json"),
                                       kl_chunks=2, kl_ctx=64)
    assert [v.name for v in result.variants] == ["int2-rtn-g32"]
    assert json.loads((tmp_path / "a.json").read_text())["kind"] == "trace.audit"
    assert "safety CPFR" in capsys.readouterr().out


def test_precision_sweep_example(tiny_folder, sae_dir, tmp_path, capsys):
    result = _load("precision_sweep").main(str(tiny_folder), configs=["fp32", "int8-rtn-g32", "int2-rtn-g32"],
                                           min_cpfr=0.5, sae=str(sae_dir), out=str(tmp_path), kl_chunks=2, kl_ctx=64)
    assert [r.name for r in result.rows] == ["fp32", "int8-rtn-g32", "int2-rtn-g32"]
    assert (tmp_path / "sweep.html").read_text().startswith("<!DOCTYPE html>")
    printed = capsys.readouterr().out
    assert "decay curve" in printed and "recommended:" in printed
