"""Hooked activations against transformers' own output_hidden_states, for every supported architecture."""

from __future__ import annotations

import pytest
import torch

from trace_lib import HookConfig, HookManager
from trace_lib.capture import iter_activations
from trace_lib.errors import HookError

from conftest import ARCHS, tiny_loaded


def _inputs(seed=1, batch=2, seq=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding on the second row
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_resid_matches_output_hidden_states(arch):
    loaded = tiny_loaded(arch)
    ids, mask = _inputs()
    n = loaded.n_layers
    hm = HookManager(loaded, HookConfig(hook_points=["resid_pre", "resid_post"], names=["ln_final.hook_normalized"]))
    with torch.no_grad(), hm.capture():
        out = loaded.model(ids, attention_mask=mask, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == n + 1
    torch.testing.assert_close(hm.get_activations("resid_pre", layer=0), hs[0], atol=1e-6, rtol=0)
    for i in range(n - 1):
        torch.testing.assert_close(hm.get_activations("resid_post", layer=i), hs[i + 1], atol=1e-6, rtol=0)
        torch.testing.assert_close(hm.get_activations(f"blocks.{i + 1}.hook_resid_pre"), hs[i + 1], atol=1e-6, rtol=0)
    # transformers applies the final norm to the last hidden state; so does ln_final.hook_normalized.
    torch.testing.assert_close(hm.get_activations("ln_final.hook_normalized"), hs[n], atol=1e-6, rtol=0)
    last = hm.get_activations("resid_post", layer=n - 1)
    torch.testing.assert_close(loaded.arch.final_norm(last), hs[n], atol=1e-6, rtol=0)
    logits = loaded.arch.unembed(hm.get_activations("ln_final"))
    if loaded.arch.model_type != "gemma2":  # Gemma 2 soft-caps its final logits
        torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_sublayer_outputs_add_up_to_the_residual_stream(arch):
    loaded = tiny_loaded(arch)
    ids, mask = _inputs(seed=2)
    points = ["resid_pre", "attn_out", "mlp_out", "resid_post"]
    parallel = loaded.arch.layout.resid_mid is None
    if not parallel:
        points.append("resid_mid")
    hm = HookManager(loaded, HookConfig(hook_points=points))
    with torch.no_grad(), hm.capture():
        loaded.model(ids, attention_mask=mask)
    for i in range(loaded.n_layers):
        g = lambda p: hm.get_activations(p, layer=i)  # noqa: E731
        if parallel:
            torch.testing.assert_close(g("resid_pre") + g("attn_out") + g("mlp_out"), g("resid_post"),
                                       atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(g("resid_pre") + g("attn_out"), g("resid_mid"), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(g("resid_mid") + g("mlp_out"), g("resid_post"), atol=1e-5, rtol=1e-5)


def test_parallel_block_has_no_resid_mid():
    loaded = tiny_loaded("gpt_neox")
    with pytest.raises(HookError, match="parallel"):
        HookManager(loaded, HookConfig(layers=[0], hook_points=["resid_mid"]))


def test_seed_api_and_flat_masking():
    loaded = tiny_loaded("llama")
    ids, mask = _inputs()
    hm = HookManager(loaded.model, HookConfig(layers=[0, 2], hook_points=["resid_post"]))
    with hm.capture():
        loaded.model(ids, attention_mask=mask)
    full = hm.get_activations("resid_post", layer=2)
    assert full.shape == (2, 7, 32) and full.dtype == torch.float32
    flat = hm.get_activations("blocks.2.hook_resid_post", flat=True)
    assert flat.shape == (int(mask.sum()), 32)
    torch.testing.assert_close(flat, full[mask.bool()])
    assert torch.equal(hm.attention_mask, mask)


def test_hooks_removed_even_when_forward_raises():
    loaded = tiny_loaded("llama")
    model = loaded.model
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    hm = HookManager(loaded, HookConfig(hook_points=["resid_post", "attn_out"]))
    with pytest.raises(IndexError):
        with hm.capture():
            model(torch.tensor([[1, 2, 500]]))  # token id out of the vocabulary
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert after == before


def test_bad_hook_names_and_layers():
    loaded = tiny_loaded("llama")
    with pytest.raises(HookError, match="out of range"):
        HookManager(loaded, HookConfig(layers=[3]))
    with pytest.raises(HookError, match="unknown hook point"):
        HookManager(loaded, HookConfig(layers=[0], hook_points=["resid_postt"]))
    with pytest.raises(HookError, match="malformed"):
        HookManager(loaded, HookConfig(names=["blocks.x.resid"]))
    hm = HookManager(loaded, HookConfig(layers=[0]))
    with pytest.raises(HookError, match="no activations captured"):
        hm.get_activations("resid_post", layer=0)
    with hm.capture():
        loaded.model(torch.tensor([[1, 2, 3]]))
    with pytest.raises(HookError, match="was not captured"):
        hm.get_activations("resid_post", layer=1)


def test_nan_in_activations_names_hook_and_batch():
    loaded = tiny_loaded("llama")
    hm = HookManager(loaded, HookConfig(hook_points=["resid_post"]))
    with pytest.raises(HookError, match=r"NaN in activations at blocks\.1\.hook_resid_post on batch 1"):
        with torch.no_grad(), hm.capture():
            loaded.model(torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[1, 1, 0]]))
            loaded.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
            loaded.model(torch.tensor([[1, 2, 3]]))


def test_streaming_keeps_nothing_and_matches_capture():
    loaded = tiny_loaded("qwen2")
    batches = [dict(zip(("input_ids", "attention_mask"), _inputs(seed=s))) for s in range(3)]
    cfg = HookConfig(layers=[1], hook_points=["resid_post"])
    ref = HookManager(loaded, cfg)
    with ref.capture():
        for b in batches:
            loaded.model(**b)
    seen = []
    hm = HookManager(loaded, cfg)
    with hm.stream(lambda cb: seen.append(cb.valid("blocks.1.hook_resid_post"))):
        for b in batches:
            loaded.model(**b)
    assert hm.batches == []
    torch.testing.assert_close(torch.cat(seen), ref.get_activations("resid_post", layer=1, flat=True))
    # iter_activations stops after layer 1 and yields the same activations.
    got = [cb.valid("blocks.1.hook_resid_post") for cb in iter_activations(loaded, batches, cfg)]
    torch.testing.assert_close(torch.cat(got), torch.cat(seen))
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("arch", ARCHS)
def test_reduce_sees_the_tensors_of_output_hidden_states(arch):
    loaded = tiny_loaded(arch)
    ids, mask = _inputs()
    n = loaded.n_layers
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def reduce(name, t, m):
        seen[name] = (t.detach().clone(), m.clone())
        return t.shape[-1]

    hm = HookManager(loaded, HookConfig(hook_points=["resid_pre", "resid_post"]), reduce=reduce)
    with torch.no_grad(), hm.capture():
        out = loaded.model(ids, attention_mask=mask, output_hidden_states=True)
    hs = out.hidden_states
    assert torch.equal(seen["blocks.0.hook_resid_pre"][0], hs[0])
    for i in range(n - 1):  # the last hidden state has the final norm applied
        assert torch.equal(seen[f"blocks.{i}.hook_resid_post"][0], hs[i + 1])
        assert torch.equal(seen[f"blocks.{i + 1}.hook_resid_pre"][0], hs[i + 1])
    assert all(torch.equal(m, mask) for _, m in seen.values())
    assert hm.batches[0].acts == {name: loaded.d_model for name in hm.names}  # reduce's results are kept


def test_run_stops_after_the_last_hook():
    loaded = tiny_loaded("llama")
    ids, mask = _inputs()
    later = []
    handle = loaded.arch.layers[2].register_forward_hook(lambda *a: later.append(1))
    try:
        hm = HookManager(loaded, HookConfig(layers=[0], hook_points=["resid_post"]))
        with pytest.raises(HookError, match="active capture"):
            hm.run(input_ids=ids)
        with torch.no_grad(), hm.capture():
            assert hm.run(stop_early=True, input_ids=ids, attention_mask=mask) is None
            assert later == [] and len(hm.batches) == 1
            out = hm.run(input_ids=ids, attention_mask=mask)
            assert out.logits.shape[:2] == ids.shape and later == [1] and len(hm.batches) == 2
        torch.testing.assert_close(hm.batches[0].acts["blocks.0.hook_resid_post"],
                                   hm.batches[1].acts["blocks.0.hook_resid_post"], atol=0, rtol=0)
    finally:
        handle.remove()


def test_capture_hooks_are_in_the_registry_only_while_capturing():
    from trace_lib.capture import installed_hooks

    loaded = tiny_loaded("llama")
    hm = HookManager(loaded, HookConfig(layers=[0, 2], hook_points=["resid_post", "attn_out"]), owner="test")
    assert installed_hooks(loaded) == []
    with hm.capture():
        recs = installed_hooks(loaded)
        assert {r.hook_name for r in recs} == set(hm.names) | {"model:start", "model:end"}
        assert {(r.kind, r.owner, r.permanent) for r in recs} == {("capture", "test", False)}
        assert next(r for r in recs if r.hook_name == "blocks.2.hook_resid_post").module == "model.layers.2"
    assert installed_hooks(loaded.model) == []
    with pytest.raises(IndexError):
        with hm.capture():
            loaded.model(torch.tensor([[1, 2, 500]]))  # token id out of the vocabulary
    assert installed_hooks(loaded) == []


def test_bf16_model_gives_float32_activations():
    loaded = tiny_loaded("llama")
    loaded.model.to(torch.bfloat16)
    hm = HookManager(loaded, HookConfig(layers=[0]))
    with hm.capture():
        loaded.model(torch.tensor([[1, 2, 3]]))
    assert hm.get_activations("resid_post", layer=0).dtype == torch.float32


def test_resid_pre_of_block_0_is_the_embedding_output():
    for arch in ARCHS:
        loaded = tiny_loaded(arch)
        ids, mask = _inputs()
        seen = {}
        emb = loaded.model.get_input_embeddings()
        handle = emb.register_forward_hook(lambda m, a, o: seen.setdefault("emb", o.detach().clone()))
        hm = HookManager(loaded, HookConfig(layers=[0], hook_points=["resid_pre"]))
        try:
            with torch.no_grad(), hm.capture():
                loaded.model(ids, attention_mask=mask)
        finally:
            handle.remove()
        got = hm.get_activations("resid_pre", layer=0)
        # (Gemma's sqrt(d_model) scaling lives inside its embedding module, so its output is block 0's input)
        if arch == "gpt2":  # GPT-2 adds learned positions to the token embeddings
            pos = loaded.model.transformer.wpe(torch.arange(ids.shape[1]))
            expected = seen["emb"] + pos
        else:
            expected = seen["emb"]
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg=arch)


@pytest.mark.parametrize("name", ["fp16", "int8-dynamic", "int4-rtn-g32-kernel"])
def test_quantized_variants_give_float32_activations_equal_to_their_hidden_states(name):
    from trace_lib.quant import quantize

    var = quantize(tiny_loaded("llama"), name)
    ids, mask = _inputs()
    hm = HookManager(var, HookConfig(layers=[0, 1], hook_points=["resid_post"]))
    with torch.no_grad(), hm.capture():
        out = var.model(ids, attention_mask=mask, output_hidden_states=True)
    for i in (0, 1):
        got = hm.get_activations("resid_post", layer=i)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, out.hidden_states[i + 1].float(), atol=0, rtol=0)


def test_quantized_tensors_are_dequantized_on_the_fly():
    from trace_lib.capture.hooks import to_float32_cpu

    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    q = torch.quantize_per_tensor(x, scale=0.05, zero_point=3, dtype=torch.quint8)
    got = to_float32_cpu(q)
    assert got.dtype == torch.float32 and not got.is_quantized
    torch.testing.assert_close(got, (q.int_repr().float() - 3) * 0.05, atol=1e-7, rtol=0)
    # a torchao tensor subclass (what a weight-only kernel variant carries) is de-quantized the same way
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    lin = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
    quantize_(lin, Int8WeightOnlyConfig(set_inductor_config=False))
    w = lin[0].weight
    torch.testing.assert_close(to_float32_cpu(w), w.qdata.float() * w.scale.float(), atol=1e-7, rtol=0)


def test_trace_is_offline_and_runs_as_a_module():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = "import os, trace_lib; print(os.environ['HF_HUB_OFFLINE'], trace_lib.__version__)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    import trace_lib

    assert run.stdout.split() == ["1", trace_lib.__version__]
    mod = subprocess.run([sys.executable, "-m", "trace_lib", "version"], env=env, capture_output=True, text=True)
    assert mod.returncode == 0 and mod.stdout.strip() == trace_lib.__version__


def test_over_long_prompt_keeps_the_template_tokens(tiny_folder):
    """A prompt past max_length loses the end of its user message, not the post-instruction template tokens
    the fingerprint reads; the cut is announced."""
    from trace_lib.capture.inputs import format_prompts, prompt_batches
    from trace_lib.capture.prompts import post_instruction_length
    from trace_lib.models import load_model

    tok = load_model(tiny_folder).tokenizer
    long = "Tell me everything about the history of bridges. " * 30
    with pytest.warns(UserWarning, match=r"prompt 1: prompt of \d+ tokens cut to \d+ .* to fit 48 tokens"):
        (batch,) = prompt_batches(tok, ["Hi", long], batch_size=2, max_length=48)
    assert int(batch["attention_mask"][1].sum()) <= 48
    row = batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist()
    short = tok(format_prompts(tok, ["Hi"])[0], add_special_tokens=False)["input_ids"]
    n_post = post_instruction_length(tok)
    assert n_post >= 3
    assert row[-n_post:] == short[-n_post:]  # the cut prompt ends with the template's post-instruction tokens
    assert row[:5] == short[:5]  # and starts with the template's system turn
    assert tok.decode(row).count("history of bridges") >= 1
