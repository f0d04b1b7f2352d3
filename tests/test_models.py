"""Loading: specs, caching, hashes, and every bad input as one clear TraceError."""

from __future__ import annotations

import pytest
import torch

from trace_lib.errors import (
    HookError,
    ModelFormatError,
    ModelNotFoundError,
    TraceError,
    UnsupportedArchitectureError,
)
from trace_lib.models import from_model, load_model, supported_architectures

from conftest import tiny_model


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError):
        load_model("meta-llama/Llama-3-8B")  # a hub id is not a local path: no download attempt


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="no config.json"):
        load_model(tmp_path)


def test_non_gguf_file(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        load_model(f)


def test_truncated_gguf(tmp_path, monkeypatch):
    from trace_lib.models.default import default_gguf_path

    monkeypatch.setenv("TRACE_CACHE", str(tmp_path / "cache"))
    src = default_gguf_path().read_bytes()
    f = tmp_path / "cut.gguf"
    f.write_bytes(src[: len(src) // 3])
    with pytest.raises(ModelFormatError, match="truncated|corrupt"):
        load_model(f)
    assert not any((tmp_path / "cache" / "models").glob("*")), "a failed conversion must leave no cache entry"


def test_unknown_architecture_lists_supported():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=64, is_decoder=True))
    with pytest.raises(UnsupportedArchitectureError, match="not supported; trace supports .*GPT-2.*Llama"):
        from_model(model)
    assert "llama" in supported_architectures()


def test_hf_folder_round_trip(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2},
                                                                               unk_token="[UNK]")))
    tok.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.arch.family == "Qwen2" and loaded.n_layers == 3 and loaded.d_model == 32
    again = load_model(tmp_path)
    assert loaded.content_hash == again.content_hash
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)


def test_errors_are_trace_errors():
    for cls in (ModelNotFoundError, ModelFormatError, UnsupportedArchitectureError, HookError):
        assert issubclass(cls, TraceError)


@pytest.mark.slow
def test_default_model_loads_fast_from_cache(default_loaded):
    import time

    t = time.perf_counter()
    again = load_model("default")
    assert time.perf_counter() - t < 10
    assert again.content_hash == default_loaded.content_hash
    assert again.arch.family == "Llama/SmolLM" and again.n_layers == 30 and again.d_model == 576
    assert again.tokenizer.chat_template


@pytest.mark.slow
def test_gemma3_270m_hooks_match_hidden_states():
    from trace_lib import HookConfig, HookManager

    loaded = load_model("gemma3-270m")
    assert loaded.arch.family == "Gemma 3"
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    hm = HookManager(loaded, HookConfig(hook_points=["resid_pre", "resid_post", "attn_out", "resid_mid", "mlp_out"]))
    with torch.no_grad(), hm.capture():
        out = loaded.model(ids, output_hidden_states=True)
    hs = out.hidden_states
    torch.testing.assert_close(hm.get_activations("resid_pre", layer=0), hs[0], atol=1e-6, rtol=0)
    for i in range(loaded.n_layers - 1):
        torch.testing.assert_close(hm.get_activations("resid_post", layer=i), hs[i + 1], atol=1e-6, rtol=0)
        g = lambda p: hm.get_activations(p, layer=i)  # noqa: E731
        torch.testing.assert_close(g("resid_pre") + g("attn_out"), g("resid_mid"), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(g("resid_mid") + g("mlp_out"), g("resid_post"), atol=1e-4, rtol=1e-5)
    # The model is a real one: it continues a simple fact.
    ids = loaded.tokenizer("The Eiffel Tower is in the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        top = loaded.model(ids).logits[0, -1].argmax()
    assert loaded.tokenizer.decode(top).strip() == "Paris"
