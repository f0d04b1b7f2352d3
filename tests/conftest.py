"""Shared fixtures: tiny randomly initialised models of every supported architecture, and the real default."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRACE_QUIET", "1")

import trace_lib  # noqa: E402,F401  (sets offline mode before transformers is imported)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where a CUDA GPU is visible; elsewhere they are skipped with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)


def tiny_config(arch: str):
    import transformers as T

    if arch == "llama":
        return T.LlamaConfig(**TINY)
    if arch == "qwen2":
        return T.Qwen2Config(**TINY)
    if arch == "qwen3":
        return T.Qwen3Config(**TINY, head_dim=8)
    if arch == "mistral":
        return T.MistralConfig(**TINY)
    if arch == "gemma2":
        return T.Gemma2Config(**TINY, head_dim=8)
    if arch == "gemma3":
        return T.Gemma3TextConfig(**TINY, head_dim=8)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0,
                            eos_token_id=0)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, bos_token_id=0, eos_token_id=0)
    if arch == "gpt_neox_seq":
        return T.GPTNeoXConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, use_parallel_residual=False, bos_token_id=0, eos_token_id=0)
    if arch == "phi3":
        return T.Phi3Config(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise KeyError(arch)


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "gpt2", "gpt_neox", "gpt_neox_seq", "phi3"]


def tiny_model(arch: str = "llama", seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cfg._attn_implementation = "eager"
    model = T.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def tiny_loaded(arch: str = "llama", seed: int = 0):
    from trace_lib.models import from_model

    return from_model(tiny_model(arch, seed), name=f"tiny-{arch}")


@pytest.fixture(params=ARCHS)
def any_arch(request):
    return request.param


@pytest.fixture(scope="session")
def default_loaded():
    from trace_lib.models import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def default_tokenizer(default_loaded):
    return default_loaded.tokenizer


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, default_tokenizer):
    """A tiny random Llama saved as a Hugging Face folder, with SmolLM2's real tokenizer (vocab 49152)."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(**{**TINY, "vocab_size": len(default_tokenizer)}, tie_word_embeddings=True)
    model = T.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    default_tokenizer.save_pretrained(path)
    return path
