"""What records a traced forward pass: the hooks' per-layer statistics (:class:`ActivationReducer`) and the
seed's recording protocol (:class:`TraceRecorder`, which :class:`~trace_lib.tracer.tracer.ModelTracer` drives).

The protocol, for callers that compute their own records: ``begin_forward``, ``record_layer_activation``,
``record_attention``, ``record_logits``, ``record_kv_state``, ``record_quant_error``, ``end_forward`` (returns
the first anomaly's description), ``summary``, ``summary_to_json`` and ``clear``.

Every traced forward pass counts once in ``total_forwards`` (the seed counts its activation traces, which is
the same number when activations are traced). The reference's forward pass for the quantization error is not
a traced pass and does not count.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trace_lib.cache import atomic_write_json
from trace_lib.capture.hooks import HookConfig, HookManager, to_float32_cpu
from trace_lib.tracer.activations import ActivationRecord, ActivationTrace, detect_anomalies, tensor_stats
from trace_lib.tracer.attention import AttentionWeightTrace
from trace_lib.tracer.config import ModelTracerConfig
from trace_lib.tracer.kv_cache import KvCacheSession, KvCacheStep
from trace_lib.tracer.logit_lens import LogitLensTrace, build_lens_trace
from trace_lib.tracer.quant_error import LayerQuantError, QuantErrorTrace, level_of, thresholds_of
from trace_lib.tracer.result import ForwardTrace, GenerationTrace, TracerResult, summary_text

POINT_ORDER = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


class ActivationReducer:
    """The tracer's HookManager ``reduce``: per hook, statistics over the real tokens (``stats``) and, where
    asked, a float32 CPU copy (``tensor``) instead of every activation."""

    def __init__(self, stats_names: set[str], keep_names: set[str]) -> None:
        self.stats_names = stats_names
        self.keep_names = keep_names

    def __call__(self, name: str, t: torch.Tensor, mask: torch.Tensor | None) -> dict:
        entry: dict = {}
        if name in self.stats_names:
            entry["stats"] = tensor_stats(_real_tokens(t, mask), t.dtype)
        if name in self.keep_names:
            entry["tensor"] = to_float32_cpu(t)
        return entry


def trace_hooks(loaded, names: list[str], stats_names: set[str], keep_names: set[str]) -> HookManager:
    """A HookManager on ``names`` that keeps :class:`ActivationReducer` entries."""
    return HookManager(loaded, HookConfig(layers=[], hook_points=(), names=tuple(names), check_finite=False),
                       reduce=ActivationReducer(stats_names, keep_names), owner="ModelTracer")


def _real_tokens(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None or t.dim() != 3 or tuple(mask.shape) != tuple(t.shape[:2]) or bool(mask.all()):
        return t
    return t[mask.bool().to(t.device)]


def hook_names(arch, config: ModelTracerConfig, lens: bool, quant: bool) -> tuple[set[str], set[str], list[str]]:
    """The hooks of one traced pass: (statistics names, names whose float32 copy is kept for the logit lens and
    the quantization error, every name in forward order)."""
    stats: set[str] = set()
    keep: set[str] = set()
    names: list[str] = []
    for i in range(arch.n_layers):
        for p in POINT_ORDER:
            if p == "resid_mid" and arch.layout.resid_mid is None:
                continue
            name = f"blocks.{i}.hook_{p}"
            if config.trace_activations and p in config.activation_points:
                stats.add(name)
            if p == "resid_post" and (lens or quant):
                keep.add(name)
            if name in stats or name in keep:
                names.append(name)
    return stats, keep, names


class TraceRecorder:
    """The recorded traces and the seed's protocol that adds to them; models are attached by the driver
    (``loaded``: the traced model, for token strings and the result's description)."""

    def __init__(self, config: ModelTracerConfig | None = None) -> None:
        self.config = config if config is not None else ModelTracerConfig.lightweight()
        self.config.validate()
        self.loaded = None
        self.reference = None
        self.forwards: list[ForwardTrace] = []
        self.generations: list[GenerationTrace] = []
        self.kv_sessions: list[KvCacheSession] = []
        self.notes: list[str] = []
        self._current: ForwardTrace | None = None
        self._lens_rows: list[tuple[int, torch.Tensor]] = []
        self._manual_quant: QuantErrorTrace | None = None

    # ------------------------------------------------------------------ the seed's protocol
    def begin_forward(self, position: int = 0) -> None:
        """Start recording a forward pass at sequence ``position``."""
        self._current = ForwardTrace(index=len(self.forwards), position=position)
        if self.config.trace_activations:
            self._current.activations = ActivationTrace(position=position)
        self._lens_rows = []
        self._manual_quant = None

    def record_layer_activation(self, record: ActivationRecord) -> None:
        """Add one hook point's statistics; its anomalies are (re)computed from the config's rules."""
        if self._current is None or self._current.activations is None:
            return
        act = self._current.activations
        previous = None
        if record.layer is not None and record.layer > 0:
            prev = act.record(record.layer - 1, record.point)
            previous = prev.stats if prev else None
        record.anomalies = detect_anomalies(record.hook, record.layer, record.point, record.stats, previous,
                                            self.config)
        act.add(record)

    def record_attention(self, trace: AttentionWeightTrace) -> None:
        if self.config.trace_attention and self._current is not None:
            self._current.attention.append(trace)

    def record_logits(self, layer_idx: int, logits) -> None:
        """Record one layer's (lens) logits over the vocabulary for the current forward pass; the logit-lens
        trace is built at :meth:`end_forward` (the last recorded layer counts as the final distribution)."""
        if self.config.trace_logits and self._current is not None:
            self._lens_rows.append((layer_idx, torch.as_tensor(logits, dtype=torch.float32).detach().reshape(-1)))

    def record_logit_trace(self, trace: LogitLensTrace) -> None:
        if self.config.trace_logits and self._current is not None:
            self._current.logit_lens.append(trace)

    def record_kv_state(self, step: KvCacheStep) -> None:
        if not self.config.trace_kv_cache:
            return
        if not self.kv_sessions:
            self.kv_sessions.append(KvCacheSession())
        self.kv_sessions[-1].add_step(step)

    def record_quant_error(self, err: LayerQuantError) -> None:
        """Add one layer's reference-vs-variant error; its level follows the config's thresholds."""
        if not self.config.trace_quant_error or self._current is None:
            return
        th = thresholds_of(self.config)
        err.level = level_of(err.cosine, err.snr_db, th)
        if self._current.quant_error is None:
            self._current.quant_error = QuantErrorTrace(thresholds=th)
        self._current.quant_error.add_error(err)

    def end_forward(self) -> str | None:
        """Finish the forward pass; returns the description of its first anomaly, or None."""
        cur = self._current
        if cur is None:
            return None
        if self._lens_rows:
            layers = [i for i, _ in self._lens_rows]
            cur.logit_lens.append(build_lens_trace(torch.stack([r for _, r in self._lens_rows]), layers,
                                                   cur.position, self._tracked(), self.config.logit_top_k,
                                                   self._decode, keep_logits=self.config.keep_lens_logits))
        if cur.activations is not None and cur.activations.has_anomaly:
            cur.anomaly = cur.activations.anomaly_desc
        self.forwards.append(cur)
        self._current = None
        self._lens_rows = []
        return cur.anomaly

    def _tracked(self) -> list[int] | None:
        t = self.config.tracked_tokens
        return [int(x) for x in t] if t is not None else None

    def _decode(self, token_id: int) -> str:
        tok = getattr(self.loaded, "tokenizer", None) if self.loaded is not None else None
        return tok.decode([int(token_id)]) if tok is not None else ""

    # ------------------------------------------------------------------ results
    @property
    def activation_traces(self) -> list[ActivationTrace]:
        return [f.activations for f in self.forwards if f.activations is not None]

    @property
    def attention_traces(self) -> list[AttentionWeightTrace]:
        return [a for f in self.forwards for a in f.attention]

    @property
    def logit_traces(self) -> list[LogitLensTrace]:
        return [t for f in self.forwards for t in f.logit_lens]

    @property
    def quant_traces(self) -> list[QuantErrorTrace]:
        return [f.quant_error for f in self.forwards if f.quant_error is not None]

    @property
    def kv_steps(self) -> list[KvCacheStep]:
        return [s for session in self.kv_sessions for s in session.steps]

    def summary(self) -> dict:
        """The seed's ``ModelTracerSummary`` fields: forward passes traced, forward passes with an anomaly,
        attention traces (one per layer, head and query), logit-lens traces (one per lensed position), KV cache
        steps, evictions, the mean per-step cache hit rate, and quantization warnings and criticals (layers)."""
        steps = self.kv_steps
        return {"total_forwards": len(self.forwards),
                "anomalies_detected": sum(f.anomaly is not None for f in self.forwards),
                "attention_traces": len(self.attention_traces),
                "logit_traces": len(self.logit_traces),
                "kv_steps": len(steps),
                "total_evictions": sum(s.evictions_this_step for s in steps),
                "avg_hit_rate": sum(s.cache_hit_rate for s in steps) / len(steps) if steps else 0.0,
                "quant_warnings": sum(q.warning_count() for q in self.quant_traces),
                "quant_criticals": sum(q.critical_count() for q in self.quant_traces)}

    def summary_to_json(self) -> str:
        """The summary as one line of JSON (``avg_hit_rate`` to 4 decimals, as the seed prints it)."""
        s = self.summary()
        s["avg_hit_rate"] = round(s["avg_hit_rate"], 4)
        return json.dumps(s, separators=(",", ":"))

    def summary_text(self) -> str:
        """The seed's human-readable summary."""
        return summary_text(self.summary())

    def first_anomaly(self) -> str | None:
        return next((f.anomaly for f in self.forwards if f.anomaly), None)

    def clear(self) -> None:
        """Forget every recorded trace (the attached models stay attached)."""
        self.forwards = []
        self.generations = []
        self.kv_sessions = []
        self.notes = []
        self._current = None
        self._lens_rows = []

    def result(self) -> TracerResult:
        """Everything recorded, as a :class:`~trace_lib.tracer.result.TracerResult`."""
        from trace_lib import __version__

        return TracerResult(model=self.loaded.describe() if self.loaded is not None else None,
                            reference=self.reference.describe() if self.reference is not None else None,
                            config=self.config.to_dict(), summary=self.summary(), notes=list(self.notes),
                            forwards=[f.to_dict() for f in self.forwards],
                            generations=[g.to_dict() for g in self.generations], trace_version=__version__)

    def to_dict(self) -> dict:
        """Everything recorded, as plain JSON-safe data (NaN and infinities as None): what reports read."""
        return self.result().to_dict()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        return atomic_write_json(path, self.to_dict())

