"""Directional ablation: the variant's identity (content hash) and its hook's lifetime."""

from __future__ import annotations

import torch

from trace_lib.intervene import ablate_directions
from trace_lib.intervene.ablate import directions_digest

from conftest import TINY


def _loaded_576():
    """A one-block random Llama as wide as SmolLM2-135M (d_model 576): wider than the 512 values the old
    content hash read."""
    import transformers as T

    from trace_lib.models import from_model

    torch.manual_seed(0)
    cfg = T.LlamaConfig(**{**TINY, "hidden_size": 576, "num_hidden_layers": 1, "num_attention_heads": 9,
                           "num_key_value_heads": 3})
    cfg._attn_implementation = "eager"
    return from_model(T.AutoModelForCausalLM.from_config(cfg).eval(), name="tiny-576")


def test_content_hash_reads_every_direction_value():
    loaded = _loaded_576()
    a = torch.randn(2, 576, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[1, 540] += 1.0  # same first 512 float32 values (the old key's 4096 hex characters), different after
    assert a.numpy().tobytes().hex()[:4096] == b.numpy().tobytes().hex()[:4096]
    hook = "blocks.0.hook_resid_post"
    ha, hb = ablate_directions(loaded, hook, a).content_hash, ablate_directions(loaded, hook, b).content_hash
    assert ha != hb
    assert directions_digest(a) != directions_digest(b)
    assert ablate_directions(loaded, hook, a.clone()).content_hash == ha  # the same directions: the same variant
    assert directions_digest(a) != directions_digest(a.reshape(4, 288))  # the shape counts too
