"""ModelTracer: activation anomalies, attention, logit lens, quantization error, KV cache, summary and CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trace_lib.errors import HookError, QuantizationError, TraceError
from trace_lib.tracer import (
    ActivationRecord,
    AttentionTraceConfig,
    ModelTracer,
    ModelTracerConfig,
    TensorStats,
    TracerInputError,
    tensor_stats,
)
from trace_lib.tracer.activations import detect_anomalies
from trace_lib.tracer.logit_lens import build_lens_trace, compute_rank
from trace_lib.tracer.quant_error import LayerQuantError, layer_error, thresholds_of

from conftest import ARCHS, tiny_loaded

SUMMARY_FIELDS = ["total_forwards", "anomalies_detected", "attention_traces", "logit_traces", "kv_steps",
                  "total_evictions", "avg_hit_rate", "quant_warnings", "quant_criticals"]


def _ids(seed: int = 1, seq: int = 7, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, seq), generator=g)


# ---------------------------------------------------------------------------------------------- config
def test_presets_match_the_seed():
    light = ModelTracerConfig.lightweight()
    assert light.trace_activations and light.trace_kv_cache
    assert not (light.trace_attention or light.trace_logits or light.trace_quant_error)
    full = ModelTracerConfig.full()
    assert all([full.trace_activations, full.trace_attention, full.trace_logits, full.trace_quant_error,
                full.trace_kv_cache])
    assert light.is_enabled() and full.is_enabled()
    assert not ModelTracerConfig().is_enabled()
    assert ModelTracerConfig(trace_logits=True).is_enabled()
    assert ModelTracerConfig.full(activation_points=("mlp_out",)).activation_points == ("mlp_out",)
    assert ModelTracerConfig.lightweight(trace_kv_cache=False).trace_kv_cache is False


def test_bad_configs_are_one_line_errors():
    with pytest.raises(HookError, match="activation point"):
        ModelTracer(ModelTracerConfig(trace_activations=True, activation_points=("resid_nope",)))
    with pytest.raises(HookError, match="KV cache"):
        ModelTracer(ModelTracerConfig(kv_cache="int3"))
    loaded = tiny_loaded("llama")  # 3 layers, 4 heads
    with pytest.raises(HookError, match="layer"):
        ModelTracer(ModelTracerConfig(trace_attention=True, attention_config=AttentionTraceConfig(layers=[3]))
                    ).attach(loaded)
    with pytest.raises(HookError, match="head"):
        ModelTracer(ModelTracerConfig(trace_attention=True, attention_config=AttentionTraceConfig(heads=[0, 4]))
                    ).attach(loaded)
    with pytest.raises(TracerInputError, match="vocabulary"):
        ModelTracer(ModelTracerConfig(trace_logits=True, tracked_tokens=[128])).attach(loaded)


def test_bad_inputs_are_trace_errors():
    tracer = ModelTracer(ModelTracerConfig.lightweight())
    with pytest.raises(TracerInputError, match="no model attached"):
        tracer.trace(input_ids=_ids())
    tracer.attach(tiny_loaded("llama"))
    with pytest.raises(TracerInputError, match="no tokenizer"):
        tracer.trace("hello")
    with pytest.raises(TracerInputError, match="empty"):
        tracer.trace("   ")
    with pytest.raises(TracerInputError, match="non-empty"):
        tracer.trace(input_ids=torch.zeros((1, 0), dtype=torch.long))
    with pytest.raises(TracerInputError, match="0..127"):
        tracer.trace(input_ids=torch.tensor([[5, 200]]))
    with pytest.raises(TracerInputError, match="blocks"):
        ModelTracer().attach(tiny_loaded("llama"), reference=_two_layer_llama())
    assert issubclass(TracerInputError, TraceError)


def _two_layer_llama():
    import transformers as T

    from trace_lib.models import from_model

    from conftest import TINY

    cfg = T.LlamaConfig(**{**TINY, "num_hidden_layers": 2})
    return from_model(T.LlamaForCausalLM(cfg).eval())


# ---------------------------------------------------------------------------------------------- the seed's protocol
def test_seed_protocol_forward_pass_and_nan_anomaly():
    tracer = ModelTracer(ModelTracerConfig.lightweight())
    tracer.begin_forward(0)
    for i in range(2):
        tracer.record_layer_activation(ActivationRecord(f"blocks.{i}.hook_resid_post", i, "resid_post",
                                                        TensorStats.from_values([1.0, 2.0, 3.0])))
    assert tracer.end_forward() is None
    assert tracer.summary()["total_forwards"] == 1 and tracer.summary()["anomalies_detected"] == 0

    tracer.begin_forward(1)
    tracer.record_layer_activation(ActivationRecord("blocks.0.hook_resid_pre", 0, "resid_pre",
                                                    TensorStats.from_values([float("nan")])))
    anomaly = tracer.end_forward()
    assert anomaly is not None and "NaN" in anomaly and "blocks.0.hook_resid_pre" in anomaly
    assert tracer.summary()["anomalies_detected"] == 1
    s = json.loads(tracer.summary_to_json())
    assert list(s) == SUMMARY_FIELDS
    assert s["total_forwards"] == 2 and s["anomalies_detected"] == 1
    assert '"total_forwards":2' in tracer.summary_to_json()
    assert "Forward passes: 2" in tracer.summary_text()
    tracer.clear()
    assert tracer.summary()["total_forwards"] == 0 and tracer.forwards == []


def test_seed_falsification_layer_count():
    tracer = ModelTracer(ModelTracerConfig.lightweight())
    tracer.begin_forward(0)
    for i in range(32):
        tracer.record_layer_activation(ActivationRecord(f"blocks.{i}.hook_resid_post", i, "resid_post",
                                                        TensorStats.from_values([0.5, -0.5])))
    tracer.end_forward()
    assert len(tracer.activation_traces[0].records) == 32
    assert tracer.activation_traces[0].layers == list(range(32))


def test_seed_protocol_logits_and_quant_records():
    tracer = ModelTracer(ModelTracerConfig(trace_logits=True, trace_quant_error=True, logit_top_k=2))
    tracer.begin_forward(0)
    tracer.record_logits(0, [0.0, 1.0, 0.5])
    tracer.record_logits(1, [0.0, 0.2, 3.0])
    tracer.record_quant_error(LayerQuantError(0, "blocks.0.hook_resid_post", cosine=0.95, rel_l2=0.3,
                                              snr_db=10.5, mse=0.0, max_abs_error=0.0, n_tokens=1))
    tracer.record_quant_error(LayerQuantError(1, "blocks.1.hook_resid_post", cosine=0.5, rel_l2=0.9,
                                              snr_db=0.9, mse=0.0, max_abs_error=0.0, n_tokens=1))
    tracer.end_forward()
    lens = tracer.logit_traces[0]
    assert lens.final_top1 == 2 and lens.decisive_layer == 1
    assert lens.tracked_tokens[0].token_id == 2 and lens.tracked_tokens[0].per_layer_rank == [1, 0]
    s = tracer.summary()
    assert (s["logit_traces"], s["quant_warnings"], s["quant_criticals"]) == (1, 1, 1)


# ---------------------------------------------------------------------------------------------- activations
def test_tensor_stats_against_torch():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16) * 3 + 1
    s = tensor_stats(x)
    assert s.count == x.numel() and s.nan_count == 0 and s.inf_count == 0
    assert s.mean == pytest.approx(float(x.mean()), abs=1e-5)
    assert s.std == pytest.approx(float(x.std()), rel=1e-5)
    assert (s.min, s.max) == (float(x.min()), float(x.max()))
    assert s.abs_max == float(x.abs().max())
    assert s.l2_norm == pytest.approx(float(x.norm()), rel=1e-5)
    assert s.token_norm_median == pytest.approx(float(x.norm(dim=-1).flatten().median()), rel=1e-6)
    assert s.saturated_share == 0.0

    y = x.clone()
    y[0, 0, 0] = float("nan")
    y[1, 2, 3] = float("inf")
    s2 = tensor_stats(y)
    finite = y[torch.isfinite(y)]
    assert (s2.nan_count, s2.inf_count) == (1, 1)
    assert s2.mean == pytest.approx(float(finite.mean()), abs=1e-5)
    assert s2.max == float(finite.max())


def test_tensor_stats_is_stable_with_a_large_offset():
    # The seed's Welford falsification test: values 1e9 + i, i < 1000; the sums formula would cancel here.
    s = TensorStats.from_values([1e9 + i for i in range(1000)])
    assert abs(s.mean - torch.tensor(1e9 + 499.5, dtype=torch.float32).item()) < 1.0
    assert 280 < s.std < 300


def test_saturation_uses_the_dtype_limits():
    x = torch.zeros(1, 4, 8, dtype=torch.float16)
    x[0, 0, :2] = torch.finfo(torch.float16).max
    s = tensor_stats(x)
    assert s.dtype == "float16" and s.saturated_share == pytest.approx(2 / 32)
    cfg = ModelTracerConfig()
    kinds = [a.kind for a in detect_anomalies("blocks.0.hook_resid_post", 0, "resid_post", s, None, cfg)]
    assert "saturation" in kinds


def test_norm_explosion_uses_the_median_token_norm():
    cfg = ModelTracerConfig()
    base = torch.ones(1, 8, 4)
    prev = tensor_stats(base)
    exploded = tensor_stats(base * 20)
    kinds = [a.kind for a in detect_anomalies("blocks.3.hook_resid_post", 3, "resid_post", exploded, prev, cfg)]
    assert kinds == ["norm_explosion"]
    # One massive-activation token (an attention sink) is healthy and is not an explosion.
    sink = base.clone()
    sink[0, 0] *= 1000
    assert detect_anomalies("blocks.3.hook_resid_post", 3, "resid_post", tensor_stats(sink), prev, cfg) == []
    # Sub-layer outputs are not compared across layers.
    assert detect_anomalies("blocks.3.hook_mlp_out", 3, "mlp_out", exploded, prev, cfg) == []
    # The seed's absolute rule.
    big = tensor_stats(torch.full((1, 2, 2), 2e6))
    assert "explosion" in [a.kind for a in detect_anomalies("blocks.0.hook_attn_out", 0, "attn_out", big, None, cfg)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gpt_neox"])
def test_nan_injected_in_block_1_is_reported_at_block_1(arch):
    loaded = tiny_loaded(arch)
    block = loaded.arch.layers[1]
    weight = next(p for _, p in block.named_parameters() if p.dim() == 2)
    with torch.no_grad():
        weight.fill_(float("nan"))
    tracer = ModelTracer(ModelTracerConfig.full()).attach(loaded)
    fwd = tracer.trace(input_ids=_ids())
    assert fwd.anomaly is not None and "NaN" in fwd.anomaly
    assert "blocks.1." in fwd.anomaly, fwd.anomaly
    first = fwd.activations.anomalies[0]
    assert (first.kind, first.layer) == ("nan", 1)
    assert all(not r.anomalies for r in fwd.activations.records if r.layer == 0)
    assert tracer.summary()["anomalies_detected"] == 1
    json.dumps(tracer.to_dict(), allow_nan=False, default=str)  # NaN statistics still give valid JSON


@pytest.mark.parametrize("arch", ARCHS)
def test_recorded_layer_count_equals_the_models(arch):
    loaded = tiny_loaded(arch)
    tracer = ModelTracer(ModelTracerConfig.full()).attach(loaded, reference=tiny_loaded(arch))
    fwd = tracer.trace(input_ids=_ids())
    assert fwd.n_layers == loaded.n_layers
    assert len(fwd.logit_lens[0].layers) == loaded.n_layers
    assert len(fwd.quant_error.layers) == loaded.n_layers
    assert len(fwd.layer_rows()) == loaded.n_layers
    points = {r.point for r in fwd.activations.records}
    expected = {"resid_pre", "attn_out", "mlp_out", "resid_post", "logits"}
    if loaded.arch.layout.resid_mid is not None:
        expected.add("resid_mid")
    assert points == expected
    assert fwd.anomaly is None


# ---------------------------------------------------------------------------------------------- logit lens
@pytest.mark.parametrize("arch", ARCHS)
def test_logit_lens_last_layer_equals_the_models_logits(arch):
    loaded = tiny_loaded(arch)
    ids = _ids(seq=6)
    cfg = ModelTracerConfig(trace_logits=True, logit_positions=None, keep_lens_logits=True)
    fwd = ModelTracer(cfg).attach(loaded).trace(input_ids=ids)
    with torch.no_grad():
        logits = loaded.model(ids).logits[0]
    assert [t.position for t in fwd.logit_lens] == list(range(6))
    for t in fwd.logit_lens:
        torch.testing.assert_close(t.logits[-1], logits[t.position], atol=1e-4, rtol=0)
        assert t.final_top1 == int(logits[t.position].argmax())
        assert t.kl_to_final[-1] == 0.0 and all(k >= 0 for k in t.kl_to_final)
        assert t.final_top1_rank[-1] == 0


def test_lens_rank_and_decisive_layer_definitions():
    assert compute_rank(torch.tensor([1.0, 5.0, 3.0, 2.0]), 0) == 3  # the seed's example
    assert compute_rank(torch.tensor([1.0, 5.0, 3.0, 2.0]), 1) == 0
    tops = [5, 3, 3, 7, 3, 3]  # top-1 per layer; the final one (3) is top-1 from layer 4 on
    logits = torch.zeros(len(tops), 8)
    for i, t in enumerate(tops):
        logits[i, t] = 5.0
    trace = build_lens_trace(logits, list(range(len(tops))), position=0, tracked=[3, 7], top_k=2)
    assert trace.decisive_layer == 4 and trace.final_top1 == 3
    assert trace.rank_of(7) == [1, 1, 1, 0, 1, 1]
    assert trace.top_tokens == tops


# ---------------------------------------------------------------------------------------------- attention
def test_attention_switches_to_eager_and_restores():
    loaded = tiny_loaded("llama")
    loaded.model.set_attn_implementation("sdpa")
    cfg = ModelTracerConfig(trace_attention=True, attention_config=AttentionTraceConfig(top_k=3, query_positions=None))
    tracer = ModelTracer(cfg).attach(loaded)
    ids = _ids(seq=5)
    fwd = tracer.trace(input_ids=ids)
    assert loaded.model.config._attn_implementation == "sdpa"
    assert any("eager" in n and "sdpa" in n for n in tracer.notes)
    assert len(fwd.attention) == 3 * 4 * 5  # layers x heads x query positions
    loaded.model.set_attn_implementation("eager")
    with torch.no_grad():
        att = loaded.model(ids, output_attentions=True).attentions
    for t in fwd.attention:
        w = att[t.layer][0, t.head, t.query_pos, : t.query_pos + 1]
        assert t.max_weight == pytest.approx(float(w.max()), abs=1e-6)
        assert t.max_position == int(w.argmax())
        assert t.first_token_weight == pytest.approx(float(w[0]), abs=1e-6)
        assert t.entropy == pytest.approx(float(-(w * w.log()).sum()), abs=1e-5)
        assert 0 <= t.entropy <= math.log(t.query_pos + 1) + 1e-6
        assert len(t.top_k_positions) <= 3 and t.tail_mass >= 0
    assert fwd.attention[0].query_pos == 0 and fwd.attention[0].max_weight == pytest.approx(1.0)


def test_attention_layer_and_head_selection():
    cfg = ModelTracerConfig(trace_attention=True, attention_config=AttentionTraceConfig(layers=[2], heads=[1, 3]))
    fwd = ModelTracer(cfg).attach(tiny_loaded("gpt2")).trace(input_ids=_ids())
    assert {(t.layer, t.head) for t in fwd.attention} == {(2, 1), (2, 3)}
    assert {t.query_pos for t in fwd.attention} == {6}  # default: the last token


def test_hooks_and_attention_restored_when_the_forward_raises():
    loaded = tiny_loaded("llama")
    loaded.model.set_attn_implementation("sdpa")

    def boom(module, args, output):
        raise RuntimeError("boom")

    def hooks():  # transformers keeps hooks of its own (output capturing): compare with what was there before
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in loaded.model.modules()]

    tracer = ModelTracer(ModelTracerConfig.full()).attach(loaded)
    tracer.trace(input_ids=_ids())
    tracer.clear()
    before = hooks()
    handle = loaded.arch.layers[1].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        tracer.trace(input_ids=_ids())
    handle.remove()
    assert loaded.model.config._attn_implementation == "sdpa"
    assert hooks() == before
    assert tracer.forwards == [] and tracer.summary()["total_forwards"] == 0
    assert tracer.trace(input_ids=_ids()).anomaly is None  # usable afterwards


# ---------------------------------------------------------------------------------------------- quantization error
def test_layer_error_formulas_and_levels():
    th = thresholds_of(ModelTracerConfig())
    a = torch.ones(1, 2, 4)
    same = layer_error(a, a.clone(), None, 0, "h", th)
    assert (same.cosine, same.rel_l2, same.snr_db, same.level) == (1.0, 0.0, math.inf, "ok")
    assert same.to_dict()["snr_db"] is None and same.to_dict()["identical"] is True
    scaled = layer_error(a, a * 1.1, None, 0, "h", th)  # rel 0.1 -> SNR 20 dB, cosine 1
    assert scaled.rel_l2 == pytest.approx(0.1) and scaled.snr_db == pytest.approx(20.0)
    assert scaled.cosine == pytest.approx(1.0)
    assert layer_error(a, a * 1.2, None, 0, "h", th).level == "warning"  # 14 dB
    assert layer_error(a, a * 1.5, None, 0, "h", th).level == "critical"  # 6 dB
    b = a.clone()
    b[0, 1] = -1  # one token reversed: cosine 0 overall
    e = layer_error(a, b, None, 0, "h", th)
    assert e.cosine == pytest.approx(0.0) and e.level == "critical"
    assert e.token_cosine == [[1.0, -1.0]] and e.token_rel_l2 == [[0.0, 2.0]]
    assert e.median_token_rel_l2 == 1.0 and e.worst_token == {"batch_index": 0, "token_index": 1, "rel_l2": 2.0}
    nan = layer_error(a, a * float("nan"), None, 0, "h", th)
    assert nan.level == "critical"


def test_fp32_against_itself_has_zero_error():
    from trace_lib.quant import quantize

    ref = tiny_loaded("llama")
    variant = quantize(ref, "fp32")
    tracer = ModelTracer(ModelTracerConfig(trace_quant_error=True)).attach(variant, reference=ref)
    q = tracer.trace(input_ids=_ids()).quant_error
    assert all(e.cosine == 1.0 and e.rel_l2 == 0.0 and e.snr_db == math.inf and e.max_abs_error == 0.0
               for e in q.layers)
    assert q.output_kl_divergence == 0.0 and q.top1_agreement == 1.0
    assert q.first_divergence is None and q.first_divergent_layer() is None
    s = tracer.summary()
    assert s["quant_warnings"] == 0 and s["quant_criticals"] == 0
    d = json.loads(json.dumps(tracer.to_dict(), allow_nan=False, default=str))
    assert d["forwards"][0]["quant_error"]["layers"][0]["snr_db"] is None


def test_quant_error_grows_with_fewer_bits_on_a_tiny_model():
    from trace_lib.quant import quantize

    ref = tiny_loaded("llama")
    ids = _ids(seq=12)
    err = {}
    for name in ("int8-rtn-g32", "int4-rtn-g32", "int2-rtn-g32"):
        q = ModelTracer(ModelTracerConfig(trace_quant_error=True)).attach(quantize(ref, name), reference=ref
                                                                          ).trace(input_ids=ids).quant_error
        err[name] = sum(e.rel_l2 for e in q.layers) / len(q.layers)
    assert 0 < err["int8-rtn-g32"] < err["int4-rtn-g32"] < err["int2-rtn-g32"]


def test_quant_error_without_reference_is_a_note():
    fwd = ModelTracer(ModelTracerConfig(trace_quant_error=True)).attach(tiny_loaded("llama")).trace(input_ids=_ids())
    assert fwd.quant_error is None and any("no reference" in n for n in fwd.notes)


# ---------------------------------------------------------------------------------------------- KV cache
def test_dynamic_cache_steps_match_generate():
    loaded = tiny_loaded("llama")
    ids = _ids(seq=5)
    tracer = ModelTracer(ModelTracerConfig.lightweight()).attach(loaded)
    gen = tracer.generate(input_ids=ids, max_new_tokens=4, stop_at_eos=False)
    with torch.no_grad():
        expected = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                         do_sample=False)[0, 5:].tolist()
    assert gen.generated_ids == [expected]
    steps = gen.kv.steps
    assert [s.valid_positions for s in steps] == [5, 6, 7, 8]
    cfg = loaded.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_pos = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4  # keys + values, float32
    assert [s.cache_size_bytes for s in steps] == [per_pos * n for n in (5, 6, 7, 8)]
    assert [s.cache_hit_rate for s in steps] == pytest.approx([0.0, 5 / 6, 6 / 7, 7 / 8])
    assert all(s.evictions_this_step == 0 and s.key_rel_error is None for s in steps)
    s = tracer.summary()
    assert s["kv_steps"] == 4 and s["total_evictions"] == 0 and s["total_forwards"] == 4
    assert s["avg_hit_rate"] == pytest.approx((5 / 6 + 6 / 7 + 7 / 8) / 4)


def test_sliding_window_cache_counts_evictions():
    import transformers as T

    from trace_lib.models import from_model

    from conftest import tiny_config

    cfg = tiny_config("mistral")
    cfg.sliding_window = 4
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    loaded = from_model(T.AutoModelForCausalLM.from_config(cfg).eval())
    gen = ModelTracer(ModelTracerConfig.lightweight()).attach(loaded).generate(input_ids=_ids(seq=6),
                                                                               max_new_tokens=3, stop_at_eos=False)
    steps = gen.kv.steps
    # A window of 4 keeps 3 positions per layer: 6 prompt tokens evict 3 in each of 3 layers, then 1 per step.
    assert [s.valid_positions for s in steps] == [3, 3, 3]
    assert [s.evictions_this_step for s in steps] == [9, 3, 3]
    assert [s.oldest_position for s in steps] == [3, 4, 5]
    assert gen.kv.total_evictions == 15


def test_fp8_quantized_cache_error_is_measured():
    loaded = tiny_loaded("llama")
    ids = _ids(seq=5)
    dyn = ModelTracer(ModelTracerConfig.lightweight()).attach(loaded).generate(input_ids=ids, max_new_tokens=3,
                                                                               stop_at_eos=False)
    tracer = ModelTracer(ModelTracerConfig.lightweight(kv_cache="fp8")).attach(loaded)
    gen = tracer.generate(input_ids=ids, max_new_tokens=3, stop_at_eos=False)
    assert gen.kv.cache_class == "QuantizedCache"
    for q, d in zip(gen.kv.steps, dyn.kv.steps):
        assert q.valid_positions == d.valid_positions
        assert q.cache_size_bytes < d.cache_size_bytes / 3  # 1-byte states (plus scales) against 4-byte floats
        assert 0 < q.key_rel_error < 0.1 and 0 < q.value_rel_error < 0.1  # e4m3: 3 mantissa bits
        assert 0.99 < q.key_cosine < 1
        assert q.next_token_kl is not None and q.next_token_kl >= 0
    assert gen.kv.steps[0].next_token_kl == 0.0  # the prompt step attends to the unquantized states


def test_missing_kv_backends_are_clear_errors():
    tracer = ModelTracer(ModelTracerConfig.lightweight(kv_cache="quanto")).attach(tiny_loaded("llama"))
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        with pytest.raises(QuantizationError, match="optimum-quanto"):
            tracer.generate(input_ids=_ids(), max_new_tokens=2)
    gemma = ModelTracer(ModelTracerConfig.lightweight(kv_cache="fp8")).attach(tiny_loaded("gemma2"))
    with pytest.raises(QuantizationError, match="sliding_attention"):
        gemma.generate(input_ids=_ids(), max_new_tokens=2)


def test_generation_traces_every_step():
    loaded = tiny_loaded("qwen2")
    tracer = ModelTracer(ModelTracerConfig.full()).attach(loaded)
    gen = tracer.generate(input_ids=_ids(seq=4), max_new_tokens=3, stop_at_eos=False)
    fwds = [tracer.forwards[i] for i in gen.forward_indices]
    assert [f.position for f in fwds] == [0, 4, 5]
    assert [f.n_tokens for f in fwds] == [4, 1, 1]
    assert all(f.n_layers == loaded.n_layers for f in fwds)
    assert [t.position for t in tracer.logit_traces] == [3, 4, 5]
    assert {t.query_pos for t in fwds[2].attention} == {5}
    assert all(t.n_keys == 6 for t in fwds[2].attention)
    s = tracer.summary()
    assert s["kv_steps"] == 3 and s["logit_traces"] == 3 and s["attention_traces"] == 3 * 3 * 4


# ---------------------------------------------------------------------------------------------- results and CLI
def test_padding_is_left_out_of_statistics():
    loaded = tiny_loaded("llama")
    ids = _ids(batch=2, seq=6)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    cfg = ModelTracerConfig(trace_activations=True, trace_logits=True)
    fwd = ModelTracer(cfg).attach(loaded).trace(input_ids=ids, attention_mask=mask)
    rec = fwd.activations.record(0, "resid_post")
    assert rec.stats.count == 10 * loaded.d_model
    assert [(t.batch_index, t.position) for t in fwd.logit_lens] == [(0, 5), (1, 3)]


def test_save_writes_strict_json(tmp_path):
    from trace_lib.quant import quantize

    ref = tiny_loaded("llama")
    tracer = ModelTracer(ModelTracerConfig.full()).attach(quantize(ref, "fp32"), reference=ref)
    tracer.trace(input_ids=_ids())
    tracer.generate(input_ids=_ids(), max_new_tokens=2)
    path = tracer.save(tmp_path / "t.json")
    d = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert d["kind"] == "trace.tracer" and list(d["summary"]) == SUMMARY_FIELDS
    assert len(d["forwards"][0]["layers"]) == ref.n_layers
    assert d["generations"][0]["kv_cache"]["steps"][0]["step"] == 0


def test_tracer_result_round_trips_and_prints_the_tracer_summary(tmp_path):
    from trace_lib.tracer import TracerResult

    tracer = ModelTracer(ModelTracerConfig.full()).attach(tiny_loaded("llama"))
    tracer.trace(input_ids=_ids())
    tracer.generate(input_ids=_ids(), max_new_tokens=2)
    d = json.loads(tracer.save(tmp_path / "t.json").read_text())
    result = TracerResult.from_dict(d)
    assert result.to_dict() == d == tracer.result().to_dict()
    assert result.summary_text() == tracer.summary_text()
    assert "Avg hit rate: 50.00%" in TracerResult(summary={"avg_hit_rate": 0.5}).summary_text()
    lenient = TracerResult.from_dict({"summary": "junk", "forwards": None})
    assert lenient.forwards == [] and "Forward passes: n/a" in lenient.summary_text()


def test_cli_command_on_a_tiny_folder(tiny_folder, tmp_path, capsys):
    from trace_lib.cli.tracer import tracer_command

    out = tmp_path / "tracer.json"
    tracer_command(prompt="The capital of France is", model=str(tiny_folder), variant="int4-rtn-g32",
                   generate=2, out_path=out)
    text = capsys.readouterr().out
    assert "rel err" in text and "KL→final" in text and "wrote" in text
    d = json.loads(out.read_text())
    assert d["summary"]["total_forwards"] == 3 and d["summary"]["kv_steps"] == 2
    assert len(d["forwards"][0]["layers"]) == 3 and d["forwards"][0]["quant_error"] is not None
    with pytest.raises(TraceError, match="empty"):
        tracer_command(prompt=" ", model=str(tiny_folder), out_path=out)
    with pytest.raises(QuantizationError, match="unknown quantization config"):
        tracer_command(prompt="hi", model=str(tiny_folder), variant="int5-nope", out_path=out)


# ---------------------------------------------------------------------------------------------- the real default model
@pytest.mark.slow
def test_quant_error_ladder_on_the_default_model(default_loaded):
    from trace_lib.quant import quantize

    prompt = "The capital of France is Paris, and the capital of Germany is"
    mean_rel = {}
    for name in ("fp32", "int8-rtn-g32", "int4-rtn-g32", "int2-rtn-g32"):
        tracer = ModelTracer(ModelTracerConfig(trace_quant_error=True)).attach(quantize(default_loaded, name),
                                                                               reference=default_loaded)
        q = tracer.trace(prompt).quant_error
        assert len(q.layers) == default_loaded.n_layers == 30
        mean_rel[name] = sum(e.rel_l2 for e in q.layers) / len(q.layers)
        if name == "fp32":
            assert all(e.rel_l2 == 0.0 and e.cosine == 1.0 and e.snr_db == math.inf for e in q.layers)
        if name == "int8-rtn-g32":
            assert tracer.summary()["quant_warnings"] == tracer.summary()["quant_criticals"] == 0
        if name == "int2-rtn-g32":
            assert tracer.summary()["quant_criticals"] == 30
    assert mean_rel["fp32"] == 0.0 < mean_rel["int8-rtn-g32"] < mean_rel["int4-rtn-g32"] < mean_rel["int2-rtn-g32"]


@pytest.mark.slow
def test_full_trace_of_the_default_model(default_loaded):
    tracer = ModelTracer(ModelTracerConfig.full()).attach(default_loaded)
    fwd = tracer.trace("The capital of France is Paris, and the capital of Germany is")
    assert fwd.anomaly is None  # the healthy reference: its massive activations are not flagged
    assert fwd.n_layers == default_loaded.n_layers
    lens = fwd.logit_lens[0]
    assert lens.top_token_strs[-1] == " Berlin" and lens.decisive_layer == 29
    assert default_loaded.model.config._attn_implementation == "sdpa"
    gen = tracer.generate("The capital of France is", max_new_tokens=4)
    assert gen.kv.steps[-1].valid_positions == gen.kv.steps[0].valid_positions + len(gen.kv.steps) - 1
