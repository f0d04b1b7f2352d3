"""The CLI's contract under hostile input, driven as a user would: the real ``trace`` command in a subprocess.

For every bad input: exit status 2 (130 when interrupted), a short message, never a traceback, and nothing
written to the cache or the output folder. Parse-time failures load no model, so each case takes a fraction
of a second. The Python API raises the same :class:`TraceError` subclasses for the same mistakes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trace_lib.errors import (
    DatasetError,
    InvalidValueError,
    ModelFormatError,
    ModelNotFoundError,
    OutputPathError,
    QuantizationError,
    TraceError,
)


def _env(cache: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update({"TRACE_CACHE": str(cache), "TRACE_QUIET": "1", "PYTHONUNBUFFERED": "1", **extra})
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _tree(*roots: Path) -> set[str]:
    return {str(p) for r in roots if r.exists() for p in r.rglob("*")}


def run_cli(args: list[str], cwd: Path, cache: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trace_lib", *args], cwd=cwd, env=_env(cache, **env),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def box(tmp_path):
    """A working folder and an empty cache, plus a few hostile files."""
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    cache.mkdir()
    (work / "a_file").write_text("not a folder\n")
    (work / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (work / "empty.jsonl").write_text("")
    (work / "fake.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    (work / "result.json").write_text(json.dumps({"kind": "trace.audit", "version": 999}))
    pickled = work / "pickle-model"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (work / "no-config").mkdir()
    # mixed-precision configs (trace_lib.quant.config's JSON form)
    (work / "bad.json").write_text('{"base": "gguf-q4_0", "overrides": {')
    (work / "noweights.json").write_text(json.dumps({"base": "fp16", "overrides": {"model.layers.1": "gguf-q8_0"}}))
    (work / "act.json").write_text(json.dumps({"base": "gguf-q4_0", "overrides": {"model.layers.1": "int8-dyn-tok"}}))
    (work / "unknown.json").write_text(json.dumps({"base": "gguf-q4_0", "overrides": {"model.layers.1": "q9_0"}}))
    (work / "lacks.json").write_text(json.dumps({"base": "gguf-q4_0", "overrides": {"model.layers.7": "fp16"}}))
    return work, cache


def assert_refused(res: subprocess.CompletedProcess, expect: str, code: int = 2, max_lines: int = 5) -> None:
    err = res.stderr
    assert res.returncode == code, f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {err}"
    assert "Traceback" not in err + res.stdout, err
    assert expect in err, err
    assert len(err.strip().splitlines()) <= max_lines, err


def _device_errors() -> list[tuple[list[str], str]]:
    """The refusals of a device this machine lacks: only those that are refusals here (a GPU machine runs others)."""
    import torch

    out = []
    if not torch.cuda.is_available():
        out += [(["sweep", "--device", "cuda"], "no CUDA GPU is visible: "),
                (["localize", "--device", "cuda:1", "--dtype", "bfloat16"], "no CUDA GPU is visible: ")]
    else:
        n = torch.cuda.device_count()
        out.append((["sweep", "--device", f"cuda:{n}"], f"--device cuda:{n} names GPU {n}, but only {n} CUDA GPU"))
    if not (torch.backends.mps.is_available()):
        out.append((["redteam", "--device", "mps"], "MPS is not available: "))
    return out


# (arguments, what the message must contain); paths are relative to the working folder of `box`
USAGE_ERRORS = [
    (["audit", "--bogus"], "No such option"),
    (["nosuchcmd"], "No such command"),
    (["audit", "--threshold", "abc"], "Invalid value"),
    (["compare", "--chunks"], "requires an argument"),
    (["compare", "--ctx", "1.5"], "Invalid value"),
    (["report"], "Missing argument"),
    (["tracer"], "Missing option"),
    (["organism", "nosuch"], "No such command"),
    (["sweep", "--min-cpfr", "x"], "Invalid value"),
    (["redteam", "--sample", "many"], "Invalid value"),
]

VALUE_ERRORS = [
    (["audit", "--threshold=-1"], "--threshold must be a number in (0, 1], not -1.0"),
    (["audit", "--threshold", "5"], "--threshold must be a number in (0, 1]"),
    (["audit", "--threshold", "nan"], "--threshold must be a number in (0, 1], not nan"),
    (["audit", "--threshold", "inf"], "--threshold must be"),
    (["sweep", "--min-cpfr", "0"], "--min-cpfr must be a number in (0, 1]"),
    (["sweep", "--min-cpfr", "1.5"], "--min-cpfr must be"),
    (["compare", "--chunks", "-3"], "--chunks must be an integer >= 1, not -3"),
    (["compare", "--chunks", "0"], "--chunks must be an integer >= 1, not 0"),
    (["compare", "--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["compare", "--ctx", "2"], "--ctx must be an integer in [4, 32768]"),
    (["compare", "--ctx", "100000"], "--ctx must be an integer in [4, 32768]"),
    (["redteam", "--sample", "1"], "--sample must be an integer >= 2"),
    (["redteam", "--max-new-tokens", "0"], "--max-new-tokens must be an integer in [1, 4096]"),
    (["redteam", "--max-new-tokens", "5000"], "--max-new-tokens must be"),
    (["redteam", "--batch-size", "0"], "--batch-size must be"),
    (["redteam", "--split", "validation"], "--split must be one of test, train, all"),
    (["sweep", "--ladder", "foo"], "--ladder must be one of weights, activations, gguf, all"),
    (["tracer", "-p", "   "], "--prompt is empty"),
    (["tracer", "-p", "hi", "--preset", "huge"], "--preset must be one of full, lightweight"),
    (["tracer", "-p", "hi", "--generate", "-1"], "--generate must be an integer in [0, 4096]"),
    (["tracer", "-p", "hi", "--kv-cache", "zip"], "--kv-cache must be one of"),
    (["tracer", "-p", "hi", "--top-k", "0"], "--top-k must be an integer in [1, 1000]"),
    (["tracer", "-p", "hi", "--attn-layer", "-1"], "--attn-layer must be an integer >= 0"),
    (["tracer", "-p", "hi", "--track", "-5"], "--track must be an integer >= 0"),
    (["organism", "build", "--lr", "0"], "--lr must be a number > 0"),
    (["organism", "build", "--lr", "nan"], "--lr must be a number > 0"),
    (["organism", "build", "--epochs", "0"], "--epochs must be an integer >= 1"),
    (["organism", "build", "--rank", "0"], "--rank must be"),
    (["organism", "build", "--threads", "0"], "--threads must be"),
    (["organism", "evaluate", "--n", "1"], "--n must be an integer >= 2"),
    # names and specs
    (["audit", "-v", ""], "--variant is empty"),
    (["audit", "-v", "gguf-q4_0-kernel"], "the -kernel suffix"),
    (["compare", "-v", "int9-rtn"], "invalid config 'int9-rtn'"),
    (["compare", "-v", "fp33"], "unknown quantization config 'fp33'"),
    (["sweep", "-c", "nope"], "unknown quantization config 'nope'"),
    (["tracer", "-p", "hi", "-v", "int4-gptq-g0"], "group size must be positive"),
    (["hooks", "--model", ""], "--model is empty"),
    (["audit", "-v", "missing.json"], "no config file at missing.json"),
    (["audit", "-v", "bad.json"], "bad.json is not valid JSON (Expecting property name"),
    (["compare", "-v", "noweights.json"], "fp16 quantizes no weights; there are no modules to keep at higher precision"),
    (["sweep", "-c", "act.json"], "int8-dyn-tok quantizes activations; an override takes a weight-only type"),
    (["tracer", "-p", "hi", "-v", "unknown.json"], "override 'model.layers.1': unknown quantization config 'q9_0'"),
    (["audit", "-v", "gguf-q4_0+mxb509f61b"], "names a mixed-precision config"),
    (["audit", "--hook", ""], "--hook is empty"),
    (["audit", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["audit", "--dataset", ""], "--dataset is empty"),
    (["audit", "--dataset", "empty.jsonl"], "empty.jsonl"),
    # input files and folders
    (["compare", "--text", "missing.txt"], "no text file at missing.txt"),
    (["compare", "--text", "no-config"], "is not a file"),
    (["compare", "--text", "binary.txt", "--model", "no-config"], "is not UTF-8 text (byte 0x80 at offset 128)"),
    (["audit", "--sae", "missing"], "no SAE folder at missing"),
    (["audit", "--sae", "a_file"], "is not a folder"),
    (["report", "missing.json"], "no result file at missing.json"),
    (["report", "no-config"], "is not a file"),
    (["organism", "evaluate", "--adapter", "missing"], "no adapter folder at missing"),
    # output paths: checked before any work, never an input
    (["audit", "--out", "a_file"], "--out a_file is a file, not a folder"),
    (["compare", "--out", "a_file/sub"], "cannot be created: a_file is a file, not a folder"),
    (["audit", "--html", "no-config"], "--html no-config is a folder"),
    (["sweep", "--html", "a_file/page.html"], "a_file is a file, not a folder"),
    (["tracer", "-p", "hi", "--out", "t.json", "--html", "t.json"], "name the same file"),
    (["tracer", "-p", "hi", "--out", "no-config"], "--out no-config is a folder"),
    (["audit", "--out", ".", "--html", "audit.json"], "name the same file"),
    (["report", "result.json", "--html", "result.json"], "is an input of this run; refusing to overwrite it"),
    (["organism", "build", "--out", "a_file"], "is a file, not a folder"),
    (["repair", "-v", "fp16"], "fp16 is not weight-quantized"),
    (["repair", "-v", "int8-dynamic"], "int8-dynamic is not weight-quantized"),
    (["repair", "-v", "nope"], "unknown quantization config 'nope'"),
    (["repair", "--max-bpw", "0"], "--max-bpw must be a number > 0"),
    (["repair", "--keep", "q9"], "q9"),
    (["repair", "--method", "prune"], "--method must be one of precision, steer, edit, all"),
    (["repair", "--html", "no-config"], "--html no-config is a folder"),
    (["sae", "build", "--out", "a_file"], "is a file, not a folder"),
    (["graph"], "trace graph needs --prompt TEXT"),
    (["graph", "-p", "  "], "--prompt is empty"),
    (["graph", "-p", "hi", "--node-threshold", "0"], "--node-threshold must be a number in (0, 1], not 0.0"),
    (["graph", "-p", "hi", "--edge-threshold", "1.5"], "--edge-threshold must be a number in (0, 1]"),
    (["graph", "-p", "hi", "--max-feature-nodes", "0"], "--max-feature-nodes must be an integer >= 1"),
    (["graph", "-p", "hi", "--transcoders", "missing-folder"], "no transcoder folder at missing-folder"),
    (["graph", "-p", "hi", "--variant", "nope"], "unknown quantization config 'nope'"),
    (["graph", "build", "--layers", "1,x"], "--layers must be 'all' or comma-separated block indices"),
    (["graph", "build", "--tokens", "0"], "--tokens must be an integer >= 1"),
    (["graph", "build", "--out", "a_file"], "is a file, not a folder"),
    (["organism", "evaluate", "--out", "no-config"], "is a folder"),
    # models: refused before any weight is read
    (["hooks", "--model", "missing-model"], "no model at 'missing-model'"),
    (["hooks", "--model", "no-config"], "has no config.json"),
    (["hooks", "--model", "fake.gguf"], "is not a GGUF file"),
    (["hooks", "--model", "pickle-model"], "trace loads safetensors only, never pickle"),
    (["report", "result.json"], "version"),
    # devices and dtypes: checked while the arguments are parsed, whatever the order of --device and --dtype
    (["audit", "--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps, not 'tpu'"),
    (["compare", "--dtype", "fp8"], "--dtype must be auto, float32, bfloat16 or float16, not 'fp8'"),
    (["hooks", "--device", "cpu", "--dtype", "float16"], "--dtype float16 is refused on the CPU: half-precision"),
    (["tracer", "-p", "hi", "--dtype", "float16", "--device", "cpu"], "--dtype float16 is refused on the CPU"),
    (["organism", "build", "--dtype", "float16"], "--dtype float16 is refused on the CPU"),  # its default: cpu
    *_device_errors(),
]


@pytest.mark.parametrize(("args", "expect"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_print_typers_usage_and_exit_2(args, expect, box):
    work, cache = box
    before = _tree(work, cache)
    res = run_cli(args, work, cache)
    assert_refused(res, expect, max_lines=6)
    assert "Error:" in res.stderr  # typer's message (with its usage block where the parser has a context)
    assert _tree(work, cache) == before


@pytest.mark.parametrize(("args", "expect"), VALUE_ERRORS, ids=[" ".join(a) for a, _ in VALUE_ERRORS])
def test_bad_values_paths_and_files_are_one_line_and_exit_2(args, expect, box):
    work, cache = box
    before = _tree(work, cache)
    t0 = time.perf_counter()
    res = run_cli(args, work, cache)
    assert_refused(res, expect, max_lines=1)
    assert res.stderr.startswith("error: ")
    assert _tree(work, cache) == before, "a refused run wrote files"
    assert time.perf_counter() - t0 < 60  # refused before any long work


def test_indices_out_of_the_models_range_are_refused_after_load_and_before_work(tiny_folder, box):
    work, cache = box
    assert run_cli(["hooks", "--model", str(tiny_folder)], work, cache).returncode == 0  # the file-hash memo
    before = _tree(work, cache)
    for flag, value in (("--attn-layer", "3"), ("--attn-head", "4"), ("--track", "10000000")):
        res = run_cli(["tracer", "-m", str(tiny_folder), "-p", "hi", flag, value, "-o", "t.json"], work, cache)
        assert_refused(res, f"{flag} {value} is out of range", max_lines=1)
    assert _tree(work, cache) == before


@pytest.fixture
def tiny_plain_folder(tmp_path):
    """A tiny random Llama folder with a two-word tokenizer: enough to load, no real model needed."""
    import torch
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    from conftest import TINY

    torch.manual_seed(0)
    path = tmp_path / "tiny-plain"
    T.LlamaForCausalLM(T.LlamaConfig(**TINY)).save_pretrained(path)
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(path)
    return path


def test_a_config_file_naming_modules_the_model_lacks_is_refused_after_load(tiny_plain_folder, box):
    work, cache = box
    assert run_cli(["hooks", "--model", str(tiny_plain_folder)], work, cache).returncode == 0  # the file-hash memo
    before = _tree(work, cache)
    res = run_cli(["tracer", "-m", str(tiny_plain_folder), "-p", "hi", "-v", "lacks.json", "-o", "t.json"], work, cache)
    assert_refused(res, "override 'model.layers.7' names no Linear layer of this model; its Linear layers are named "
                        "like model.layers.0.self_attn.q_proj", max_lines=1)
    assert _tree(work, cache) == before


@pytest.mark.parametrize(("sig", "after_s"), [(signal.SIGINT, 4), (signal.SIGINT, 8), (signal.SIGTERM, 6)],
                         ids=["SIGINT-early", "SIGINT-late", "SIGTERM"])
def test_an_interrupted_run_says_so_exits_130_and_writes_no_result(sig, after_s, tiny_folder, box):
    work, cache = box
    # a long job (the organism build generates the base's answers, then trains), interrupted mid-way
    args = ["organism", "build", "--base", str(tiny_folder), "--out", "o", "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "trace_lib", *args], cwd=work, env=_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    time.sleep(after_s)  # inside the command: its arguments are parsed in well under a second
    assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "interrupted; cached results are kept" in err and "Traceback" not in err, err
    assert not (work / "o").exists()


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    from trace_lib import cache

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    models = tmp_path / "models"
    models.mkdir()
    stale_dir = models / f".gguf-abc.p{dead.pid}.x1y2z3.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"0" * 1000)
    stale_file = models / f".fingerprint.json.p{dead.pid}.q9w8e7.tmp"
    stale_file.write_text("{")
    live = models / f".gguf-def.p{os.getpid()}.a1b2c3.tmp"
    live.mkdir()
    old_legacy = models / ".gguf-old.abcdef.tmp"
    old_legacy.mkdir()
    os.utime(old_legacy, (time.time() - 2 * 86400,) * 2)
    young_legacy = models / ".gguf-young.abcdef.tmp"
    young_legacy.mkdir()
    keep = models / "gguf-0123"
    keep.mkdir()
    monkeypatch.setenv("TRACE_CACHE", str(tmp_path))
    monkeypatch.setattr(cache, "_cleaned", set())
    cache.cache_dir("models")  # the first use of a cache root cleans it
    assert not stale_dir.exists() and not stale_file.exists() and not old_legacy.exists()
    assert live.exists() and young_legacy.exists() and keep.exists()
    # what trace writes carries its pid, so it is recognisable
    cache.atomic_write_text(tmp_path / "x.json", "{}")
    assert (tmp_path / "x.json").read_text() == "{}" and not list(tmp_path.glob(".x.json*"))
    assert cache.temp_prefix(tmp_path / "x.json") == f".x.json.p{os.getpid()}."


def test_transformers_output_is_hidden_when_quiet(tiny_folder, box):
    work, cache = box
    res = run_cli(["hooks", "--model", str(tiny_folder)], work, cache)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr  # no library warnings or progress bars: only trace's own output
    assert "blocks.0.hook_resid_post" in res.stdout


# ---------------------------------------------------------------------------------------------- the Python API
def test_the_python_api_raises_trace_errors_for_the_same_mistakes(tiny_loaded_llama, tmp_path):
    from trace_lib.audit import Audit
    from trace_lib.compare import compare_outputs, resolve_variant
    from trace_lib.models import load_model
    from trace_lib.quant import parse_config
    from trace_lib.redteam.redteam import RedTeam
    from trace_lib.validate import check_output_dir, check_output_file, read_utf8

    ref = tiny_loaded_llama
    with pytest.raises(InvalidValueError, match=r"n_chunks must be an integer >= 1, not 0"):
        compare_outputs(ref, ["fp32"], n_chunks=0)
    with pytest.raises(InvalidValueError, match=r"batch_size must be an integer >= 1, not -1"):
        compare_outputs(ref, ["fp32"], batch_size=-1)
    with pytest.raises(InvalidValueError, match=r"ctx must be an integer in \[4, 32768\]"):
        compare_outputs(ref, ["fp32"], ctx=1)
    with pytest.raises(DatasetError, match="holds no text"):
        compare_outputs(ref, ["fp32"], texts=["  ", ""])
    with pytest.raises(InvalidValueError, match=r"degradation_threshold must be a number in \(0, 1\], not 5"):
        Audit(ref, variants=["fp32"], degradation_threshold=5)
    with pytest.raises(InvalidValueError, match="degradation_threshold"):
        Audit(ref, variants=["fp32"], degradation_threshold=float("nan"))
    with pytest.raises(InvalidValueError, match="variant is empty"):
        Audit(ref, variants=[""])
    with pytest.raises(InvalidValueError, match="variant is empty"):
        resolve_variant(ref, "")
    with pytest.raises(QuantizationError, match="-kernel suffix"):
        parse_config("gguf-q4_0-kernel")
    with pytest.raises(QuantizationError, match="-kernel suffix"):
        parse_config("int4-gptq-g128-kernel")
    assert parse_config("int4-rtn-g32-kernel").kernel
    with pytest.raises(InvalidValueError, match="max_new_tokens must be an integer in"):
        RedTeam(ref, ["fp32"], max_new_tokens=0)
    with pytest.raises(InvalidValueError, match="batch_size"):
        RedTeam(ref, ["fp32"], batch_size=0)
    with pytest.raises(InvalidValueError, match="split must be one of test, train"):
        RedTeam(ref, ["fp32"]).run(split="validation")
    with pytest.raises(ModelNotFoundError, match="model spec is empty"):
        load_model("")
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelFormatError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors only"):
        load_model(folder)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(OutputPathError, match="refusing to overwrite"):
        check_output_file(tmp_path / "f", inputs=[tmp_path / "f"])
    (tmp_path / "b").write_bytes(b"ok \xff\xfe")
    with pytest.raises(TraceError, match=r"not UTF-8 text \(byte 0xff at offset 3\)"):
        read_utf8(tmp_path / "b")


def test_ranges_describe_themselves_and_check_exactly_their_bounds():
    from trace_lib.validate import FRACTION, POSITIVE, POSITIVE_INT, Range

    assert FRACTION.describe() == "a number in (0, 1]"
    assert [FRACTION.contains(x) for x in (0, 1e-9, 1, 1.0000001, float("nan"), float("inf"))] == [
        False, True, True, False, False, False]
    assert [POSITIVE_INT.contains(x) for x in (0, 1, 2**40, 1.0, True)] == [False, True, True, False, False]
    assert POSITIVE.describe() == "a number > 0" and not POSITIVE.contains(0.0)
    assert Range(2, 5, hi_open=True, integer=True).describe() == "an integer in [2, 5)"
    assert POSITIVE_INT.check("n", None) is None  # "not given" passes


@pytest.fixture
def tiny_loaded_llama():
    from conftest import tiny_loaded

    return tiny_loaded("llama")
