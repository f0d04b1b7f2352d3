"""Devices and dtypes: the resolver's choices and refusals, a bfloat16 model's hooks, and (marked ``gpu``) the same
on a CUDA GPU, skipped where there is none."""

from __future__ import annotations

import pytest
import torch

from trace_lib import HookConfig, HookManager
from trace_lib.errors import DeviceError
from trace_lib.models import device as devmod
from trace_lib.models import load_model, resolve_device, resolve_dtype, to_device
from trace_lib.models.load import check_placement, ensure_loaded, run_hash, spec_content_hash

from conftest import tiny_loaded


def _expected_auto() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")


# ---------------------------------------------------------------- the resolver
def test_auto_is_the_cpu_in_float32_without_a_gpu():
    assert resolve_device("auto") == _expected_auto()
    if _expected_auto().type == "cpu":
        assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", "mps") is torch.float32  # bfloat16 needs macOS 14; float16 can overflow
    assert resolve_device(" CPU ") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16 and resolve_dtype(torch.float32, "cpu") is torch.float32


def test_auto_on_a_cuda_gpu_is_bfloat16_or_float16_where_bfloat16_is_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda:0") is torch.float16
    assert resolve_dtype("float16", "cuda:0") is torch.float16  # allowed on a GPU


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devmod, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)


@pytest.mark.parametrize(("spec", "message"), [
    ("tpu", "--device must be auto, cpu, cuda, cuda:N or mps, not 'tpu'"),
    ("cuda:x", "--device must be auto, cpu, cuda, cuda:N or mps, not 'cuda:x'"),
    ("", "--device must be auto, cpu, cuda, cuda:N or mps, not ''"),
])
def test_an_unknown_device_is_refused(spec, message):
    with pytest.raises(DeviceError) as e:
        resolve_device(spec, "--device")
    assert str(e.value) == message


def test_cuda_without_a_gpu_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(DeviceError, match=r"^no CUDA GPU is visible: .+; use --device cpu or auto$"):
            resolve_device(spec, "--device")


def test_a_gpu_index_beyond_the_visible_ones_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(DeviceError) as e:
        resolve_device("cuda:3", "--device")
    assert str(e.value) == "--device cuda:3 names GPU 3, but only 1 CUDA GPU is visible (cuda:0)"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match=r"only 2 CUDA GPUs are visible \(cuda:0 to cuda:1\)$"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)  # the current device, so results record an index


def test_mps_without_mps_is_refused(monkeypatch):
    monkeypatch.setattr(devmod, "_mps_available", lambda: False)
    with pytest.raises(DeviceError, match=r"^MPS is not available: .+; use device cpu or auto$"):
        resolve_device("mps")


@pytest.mark.parametrize(("spec", "device", "message"), [
    ("fp8", "cpu", "dtype must be auto, float32, bfloat16 or float16, not 'fp8'"),
    (torch.float64, "cpu", "dtype must be auto, float32, bfloat16 or float16, not torch.float64"),
    ("float16", "cpu", "dtype float16 is refused on the CPU: half-precision matmuls are emulated there"),
    (torch.float16, "cpu", "dtype float16 is refused on the CPU"),
])
def test_bad_dtypes_are_refused(spec, device, message):
    with pytest.raises(DeviceError) as e:
        resolve_dtype(spec, device)
    assert str(e.value).startswith(message)


def test_the_api_refuses_before_loading(tmp_path):
    with pytest.raises(DeviceError, match="float16 is refused on the CPU"):
        load_model(tmp_path / "does-not-exist", dtype="float16", device="cpu")  # not "no model at": checked first
    with pytest.raises(DeviceError, match="device must be"):
        load_model(tmp_path / "does-not-exist", device="gpu")


def test_to_device_leaves_cpu_tensors_as_they_are():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3), "n": 3}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["input_ids"] is batch["input_ids"] and moved["attention_mask"] is batch["attention_mask"]
    assert moved["n"] == 3 and to_device(batch["input_ids"], "cpu") is batch["input_ids"]


# ---------------------------------------------------------------- a bfloat16 model on the CPU
def test_bfloat16_load_records_device_dtype_and_keeps_caches_apart(tiny_folder):
    ref = load_model(tiny_folder)
    bf = load_model(tiny_folder, dtype="bfloat16", device="cpu")
    assert ref.dtype is torch.float32 and bf.dtype is torch.bfloat16
    assert ref.device == bf.device == torch.device("cpu")
    assert next(bf.model.parameters()).dtype is torch.bfloat16
    # float32 on the CPU keeps the hash every existing cache was made with; bfloat16 gets its own
    assert ref.weights_hash == "" and bf.weights_hash == ref.content_hash != bf.content_hash
    assert bf.content_hash == run_hash(ref.content_hash, torch.device("cpu"), torch.bfloat16)
    assert spec_content_hash(tiny_folder, dtype="bfloat16") == bf.content_hash  # computed without loading
    assert spec_content_hash(tiny_folder) == ref.content_hash
    d = bf.describe()
    assert d["dtype"] == "bfloat16" and d["device"] == "cpu"
    assert d["environment"]["torch"] == torch.__version__ and "transformers" in d["environment"]
    assert ref.describe()["dtype"] == "float32" and ref.describe()["device"] == "cpu"


def test_bfloat16_hooks_hand_back_float32_cpu_copies_of_the_hidden_states(tiny_folder):
    bf = load_model(tiny_folder, dtype="bfloat16", device="cpu")
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    n = bf.n_layers
    hm = HookManager(bf, HookConfig(hook_points=["resid_pre", "resid_post"], names=["ln_final.hook_normalized"]))
    with torch.no_grad(), hm.capture():
        out = hm.run(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hs = out.hidden_states
    assert hs[0].dtype is torch.bfloat16
    got = hm.get_activations("resid_pre", layer=0)
    assert got.dtype is torch.float32 and got.device.type == "cpu"
    assert torch.equal(got, hs[0].float())
    for i in range(n - 1):
        assert torch.equal(hm.get_activations("resid_post", layer=i), hs[i + 1].float())
    assert torch.equal(hm.get_activations("ln_final.hook_normalized"), hs[n].float())


def test_the_api_classes_take_device_and_dtype(tiny_folder):
    from trace_lib.audit import Audit
    from trace_lib.compare import compare_outputs
    from trace_lib.redteam.redteam import RedTeam
    from trace_lib.sweep import OptimizationAuditor
    from trace_lib.tracer import ModelTracer, ModelTracerConfig

    audit = Audit(str(tiny_folder), variants=["fp32"], device="cpu", dtype="bfloat16")
    assert audit.reference.dtype is torch.bfloat16
    assert OptimizationAuditor(str(tiny_folder), dtype="bfloat16").audit.reference.dtype is torch.bfloat16
    rt = RedTeam(str(tiny_folder), ["fp32"], device="auto", dtype="bfloat16")
    assert rt.reference.dtype is torch.bfloat16 and rt.reference.device == resolve_device("auto")
    # a model given loaded is used where it is: asking for another place is refused, not a silent move
    assert ensure_loaded(audit.reference, "cpu", "bfloat16") is audit.reference
    with pytest.raises(DeviceError, match=r"already loaded in bfloat16, not float32"):
        RedTeam(audit.reference, ["fp32"], dtype="float32")
    with pytest.raises(DeviceError, match=r"already loaded in bfloat16"):
        check_placement(audit.reference, dtype=torch.float32)
    tracer = ModelTracer(ModelTracerConfig.lightweight()).attach(str(tiny_folder), dtype="bfloat16")
    assert tracer.loaded.dtype is torch.bfloat16
    fwd = tracer.trace("hello there")
    assert fwd.n_tokens > 0
    result = compare_outputs(str(tiny_folder), ["fp32"], texts=["some words to score " * 40], ctx=16, n_chunks=2,
                             device="cpu", dtype="bfloat16")
    assert result.reference["dtype"] == "bfloat16" and result.reference["device"] == "cpu"
    assert result.variants[0].model["device"] == "cpu"
    assert "environment" in result.to_dict()["reference"]


def test_a_loaded_model_is_used_where_it_is():
    loaded = tiny_loaded("llama")
    assert ensure_loaded(loaded) is loaded and loaded.device.type == "cpu"


# ---------------------------------------------------------------- on a CUDA GPU (skipped without one)
@pytest.mark.gpu
def test_gpu_auto_picks_the_gpu_in_bfloat16_or_float16():
    dev = resolve_device("auto")
    assert dev.type == "cuda" and dev.index is not None
    assert resolve_dtype("auto", dev) is (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    n = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=rf"names GPU {n}, but only {n} CUDA GPU"):
        resolve_device(f"cuda:{n}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gpu_hooks_hand_back_float32_cpu_copies(tiny_folder, dtype):
    loaded = load_model(tiny_folder, dtype=dtype, device="cuda")
    assert loaded.device.type == "cuda" and loaded.describe()["device"].startswith("cuda")
    assert "gpu" in loaded.describe()["environment"]
    ids = torch.randint(0, 1000, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    hm = HookManager(loaded, HookConfig(hook_points=["resid_post"]))
    with torch.no_grad(), hm.capture():
        out = hm.run(input_ids=ids, attention_mask=mask, output_hidden_states=True)  # CPU inputs, moved by run()
    for i in range(loaded.n_layers - 1):
        got = hm.get_activations("resid_post", layer=i)
        assert got.dtype is torch.float32 and got.device.type == "cpu"
        assert torch.equal(got, out.hidden_states[i + 1].float().cpu())


@pytest.mark.gpu
def test_gpu_float32_matches_the_cpu(tiny_folder):
    from trace_lib.capture.prompts import capture_prompts
    from trace_lib.compare import compare_outputs

    cpu = load_model(tiny_folder)
    gpu = load_model(tiny_folder, dtype="float32", device="cuda")
    prompts = ["How do I bake bread?", "Tell me a story about a cat."]
    a = capture_prompts(cpu, prompts, ["blocks.1.hook_resid_post"], batch_size=2)
    b = capture_prompts(gpu, prompts, ["blocks.1.hook_resid_post"], batch_size=2)
    torch.testing.assert_close(b.acts["blocks.1.hook_resid_post"], a.acts["blocks.1.hook_resid_post"],
                               atol=1e-4, rtol=1e-4)
    texts = ["some words to score " * 40]
    rc = compare_outputs(cpu, ["gguf-q4_0"], texts=texts, ctx=16, n_chunks=2)
    rg = compare_outputs(gpu, ["gguf-q4_0"], texts=texts, ctx=16, n_chunks=2)
    assert rg.reference["device"].startswith("cuda") and rg.variants[0].model["device"].startswith("cuda")
    assert abs(rg.variants[0].stats.kld_mean - rc.variants[0].stats.kld_mean) < 1e-3


@pytest.mark.gpu
def test_gpu_tracer_and_generation(tiny_folder):
    from trace_lib.redteam.generate import generate
    from trace_lib.tracer import ModelTracer, ModelTracerConfig

    tracer = ModelTracer(ModelTracerConfig.full()).attach(str(tiny_folder), device="cuda", dtype="auto")
    assert tracer.loaded.device.type == "cuda"
    tracer.trace("hello there")
    tracer.generate("hello", max_new_tokens=3)
    run = generate(tracer.loaded, ["Say hi."], max_new_tokens=4, batch_size=1, cache=False)
    assert len(run.replies) == 1
