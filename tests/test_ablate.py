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


def _logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(ids).logits


def test_ablation_hook_is_listed_and_removing_it_restores_the_model():
    from trace_lib.capture import installed_hooks, remove_hooks

    from conftest import tiny_loaded

    ref = tiny_loaded("llama")
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    d = torch.randn(2, ref.d_model, generator=torch.Generator().manual_seed(2))
    variant = ablate_directions(ref, "blocks.1.hook_resid_post", d)
    assert installed_hooks(ref) == []  # the reference is untouched
    (rec,) = installed_hooks(variant)
    assert (rec.hook_name, rec.module, rec.kind, rec.owner, rec.permanent) == (
        "blocks.1.hook_resid_post", "model.layers.1", "ablation", "ablate_directions", True)
    fresh = _logits(tiny_loaded("llama"), ids)
    assert not torch.equal(_logits(variant, ids), fresh)
    assert remove_hooks(variant, kind="capture") == []
    assert remove_hooks(variant, kind="ablation") == [rec]
    assert installed_hooks(variant) == []
    assert torch.equal(_logits(variant, ids), fresh)


def test_activation_fake_quant_hooks_are_listed_and_removable():
    from trace_lib.capture import installed_hooks, remove_hooks
    from trace_lib.quant import quantize

    from conftest import tiny_loaded

    ref = tiny_loaded("llama")
    variant = quantize(ref, "a8")
    recs = installed_hooks(variant)
    linears = [n for n, m in variant.model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert [r.hook_name for r in recs] == linears and [r.module for r in recs] == linears
    assert {(r.kind, r.owner, r.permanent, r.phase) for r in recs} == {
        ("fake-quant", "add_activation_fake_quant", True, "pre")}
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(_logits(variant, ids), _logits(ref, ids))
    assert len(remove_hooks(variant, owner="add_activation_fake_quant")) == len(linears)
    assert installed_hooks(variant) == [] and torch.equal(_logits(variant, ids), _logits(ref, ids))
