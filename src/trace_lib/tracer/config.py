"""What the :class:`~trace_lib.tracer.ModelTracer` records, and the thresholds that turn numbers into findings.

The field names of :class:`ModelTracerConfig` and :class:`AttentionTraceConfig` and the two presets
(``full()``, ``lightweight()``) follow the seed's Rust ``ModelTracerConfig`` (trueno ``brick/tracing``);
the thresholds after them are trace's additions, each documented where it is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from trace_lib.errors import HookError, TraceError
from trace_lib.models.arch import BLOCK_POINTS

KV_CACHE_KINDS = ("dynamic", "fp8", "quanto", "hqq")


class TracerInputError(TraceError):
    """Input the tracer cannot trace: an empty prompt, no tokenizer for a text prompt, a token id outside the
    vocabulary, a reference that does not match the traced model."""


@dataclass
class AttentionTraceConfig:
    """Which attention weights to summarise (the seed's ``AttentionTraceConfig``).

    ``top_k``: attended positions kept per (layer, head, query); ``layers`` / ``heads``: ``None`` means all;
    ``query_positions``: query positions to summarise (negative counts from the end; default the last token,
    the one that predicts the next token); ``weight_threshold``: weights below it are left out of the top-k
    lists (the entropy and tail mass still use every weight); ``sink_threshold``: attention to the first
    token above it marks the head as an attention sink.
    """

    top_k: int = 10
    layers: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    weight_threshold: float = 0.01
    query_positions: Sequence[int] | None = (-1,)
    sink_threshold: float = 0.5

    def should_trace_layer(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def should_trace_head(self, head: int) -> bool:
        return self.heads is None or head in self.heads

    def validate(self, n_layers: int, n_heads: int) -> None:
        """Fail in one line on layers or heads the model does not have."""
        if self.top_k < 1:
            raise HookError(f"attention top_k must be at least 1, not {self.top_k}")
        bad = [x for x in (self.layers or ()) if not 0 <= x < n_layers]
        if bad:
            raise HookError(f"attention layer(s) {bad} out of range: this model has {n_layers} blocks "
                            f"(0..{n_layers - 1})")
        bad = [x for x in (self.heads or ()) if not 0 <= x < n_heads]
        if bad:
            raise HookError(f"attention head(s) {bad} out of range: this model has {n_heads} heads per layer "
                            f"(0..{n_heads - 1})")


@dataclass
class ModelTracerConfig:
    """What to trace. The first seven fields are the seed's; everything after them has a sensible default.

    Activations
        ``activation_points``: block hook points whose statistics are recorded at every layer (TransformerLens
        short names). ``norm_explosion_factor``: a point's RMS token norm above this many times the same
        point's at the previous layer is a *norm explosion*. ``saturation_threshold``: a share of values at
        the dtype's finite limits (``torch.finfo(dtype).max`` / ``.min``) above it is *saturation* (default 0:
        any value pinned at the limit). ``explosion_abs`` / ``explosion_std``: the seed's absolute rules (any
        |value| above 1e6, or a standard deviation above 1e4).
    Logit lens
        ``logit_top_k``: how many of the final top tokens are tracked when ``tracked_tokens`` is ``None``;
        ``logit_positions``: token positions lensed (default the last real token; negative counts from the end;
        ``None``: every real token). ``keep_lens_logits``: keep each lens trace's [n_layers, vocab] logits in
        memory (``LogitLensTrace.logits``; never written to JSON).
    Quantization error (reference against variant, ``resid_post`` at every layer)
        warning when cosine < ``quant_warning_cosine`` or SNR < ``quant_warning_snr_db``; critical when
        cosine < ``quant_critical_cosine`` or SNR < ``quant_critical_snr_db`` (see
        :mod:`trace_lib.tracer.quant_error` for why these values).
    KV cache (generation)
        ``kv_cache``: ``"dynamic"`` (transformers' ``DynamicCache``, full precision), ``"fp8"`` (transformers'
        ``QuantizedCache`` with its FP8 backend, which runs everywhere), ``"quanto"`` / ``"hqq"`` (the
        group-wise integer backends; they need optimum-quanto / hqq installed). ``kv_nbits``: bits for the
        integer backends.
    """

    trace_activations: bool = False
    trace_attention: bool = False
    attention_config: AttentionTraceConfig = field(default_factory=AttentionTraceConfig)
    trace_logits: bool = False
    tracked_tokens: Sequence[int] | None = None
    trace_quant_error: bool = False
    trace_kv_cache: bool = False
    # --- trace's additions
    activation_points: Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "resid_post")
    norm_explosion_factor: float = 10.0
    saturation_threshold: float = 0.0
    explosion_abs: float = 1e6
    explosion_std: float = 1e4
    logit_top_k: int = 5
    logit_positions: Sequence[int] | None = (-1,)
    keep_lens_logits: bool = False
    quant_warning_cosine: float = 0.99
    quant_warning_snr_db: float = 20.0
    quant_critical_cosine: float = 0.9
    quant_critical_snr_db: float = 10.0
    kv_cache: str = "dynamic"
    kv_nbits: int = 4

    @classmethod
    def full(cls, **overrides) -> ModelTracerConfig:
        """Trace everything (for debugging): every block hook point, attention, logit lens, quantization
        error and KV cache."""
        return cls(**{"trace_activations": True, "trace_attention": True, "trace_logits": True,
                      "trace_quant_error": True, "trace_kv_cache": True,
                      "activation_points": ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"),
                      **overrides})

    @classmethod
    def lightweight(cls, **overrides) -> ModelTracerConfig:
        """Activations (``resid_post`` statistics at every layer) and KV cache only: cheap enough to leave on."""
        return cls(**{"trace_activations": True, "trace_kv_cache": True, "activation_points": ("resid_post",),
                      **overrides})

    def is_enabled(self) -> bool:
        """Whether any tracing is switched on."""
        return (self.trace_activations or self.trace_attention or self.trace_logits or self.trace_quant_error
                or self.trace_kv_cache)

    def replace(self, **changes) -> ModelTracerConfig:
        return replace(self, **changes)

    def validate(self) -> None:
        bad = [p for p in self.activation_points if p not in BLOCK_POINTS]
        if bad:
            raise HookError(f"unknown activation point(s) {bad}: use {', '.join(BLOCK_POINTS)}")
        if self.norm_explosion_factor <= 1:
            raise HookError(f"norm_explosion_factor must be above 1, not {self.norm_explosion_factor}")
        if self.logit_top_k < 1:
            raise HookError(f"logit_top_k must be at least 1, not {self.logit_top_k}")
        if self.kv_cache not in KV_CACHE_KINDS:
            raise HookError(f"unknown KV cache {self.kv_cache!r}: use one of {', '.join(KV_CACHE_KINDS)}")
        if self.tracked_tokens is not None and not self.tracked_tokens:
            raise TracerInputError("tracked_tokens is empty: give token ids, or None to track the final top-k")
        if not (self.quant_critical_cosine <= self.quant_warning_cosine
                and self.quant_critical_snr_db <= self.quant_warning_snr_db):
            raise HookError("critical quantization thresholds must be at or below the warning ones")

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, tuple):
                d[k] = list(v)
        d["attention_config"] = {k: list(v) if isinstance(v, tuple) else v
                                 for k, v in d["attention_config"].items()}
        return d
