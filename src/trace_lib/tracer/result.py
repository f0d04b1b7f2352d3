"""A tracer's results as plain data: one forward pass (:class:`ForwardTrace`), one generation
(:class:`GenerationTrace`) and the whole result (:class:`TracerResult`, what ``ModelTracer.to_dict()`` and
``save()`` write and ``trace report`` reads).

>>> result = TracerResult.from_dict(json.load(open("trace-out/tracer.json")))
>>> print(result.summary_text())
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from trace_lib.jsonutil import json_clean as _finite  # NaN and infinities -> None, recursively
from trace_lib.tracer.activations import RESID_EXPLOSION_POINT, ActivationTrace
from trace_lib.tracer.attention import AttentionWeightTrace
from trace_lib.tracer.kv_cache import KvCacheSession
from trace_lib.tracer.logit_lens import LogitLensTrace
from trace_lib.tracer.quant_error import QuantErrorTrace

RESULT_KIND = "trace.tracer"
RESULT_VERSION = 1
# The summary fields, in the seed's ModelTracerSummary order.
SUMMARY_FIELDS = ("total_forwards", "anomalies_detected", "attention_traces", "logit_traces", "kv_steps",
                  "total_evictions", "avg_hit_rate", "quant_warnings", "quant_criticals")


@dataclass
class ForwardTrace:
    """Everything recorded in one traced forward pass (plain data; ``to_dict()`` for JSON and reports)."""

    index: int
    position: int
    n_tokens: int = 0
    input_ids: list[list[int]] = field(default_factory=list)
    tokens: list[list[str]] = field(default_factory=list)
    activations: ActivationTrace | None = None
    attention: list[AttentionWeightTrace] = field(default_factory=list)
    logit_lens: list[LogitLensTrace] = field(default_factory=list)
    quant_error: QuantErrorTrace | None = None
    anomaly: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        """Layers with activation records."""
        return len(self.activations.layers) if self.activations else 0

    def layer_rows(self, n_layers: int | None = None) -> list[dict]:
        """One flat row per layer for tables: residual norm (median token L2 norm at resid_post), anomalies, the
        logit lens at the last lensed position of the first row, and the quantization error when a reference
        was compared."""
        if n_layers is None:
            candidates = [self.n_layers, len(self.logit_lens[0].layers) if self.logit_lens else 0,
                          len(self.quant_error.layers) if self.quant_error else 0]
            n_layers = max(candidates)
        row0 = [t for t in self.logit_lens if t.batch_index == 0]
        lens = row0[-1] if row0 else None  # the last lensed position: the one predicting the next token
        final_ranks = lens.final_top1_rank if lens is not None else None
        qe = {e.layer: e for e in self.quant_error.layers} if self.quant_error else {}
        rows = []
        for i in range(n_layers):
            row: dict = {"layer": i}
            if self.activations is not None:
                rec = self.activations.record(i, RESID_EXPLOSION_POINT)
                row["resid_norm"] = rec.stats.token_norm_median if rec else None
                row["anomalies"] = sorted({a.kind for r in self.activations.records if r.layer == i
                                           for a in r.anomalies})
            if lens is not None and i < len(lens.top_tokens):
                row.update(lens_top=lens.top_tokens[i], lens_top_str=lens.top_token_strs[i],
                           lens_top_prob=lens.top_probs[i], kl_to_final=lens.kl_to_final[i],
                           final_token_rank=final_ranks[i] if final_ranks else None)
            if i in qe:
                e = qe[i]
                row.update(cosine=e.cosine, rel_l2=e.rel_l2, snr_db=e.snr_db, quant_level=e.level)
            rows.append(row)
        return rows

    def to_dict(self) -> dict:
        """Plain JSON-safe data (NaN and infinities as None)."""
        return _finite({"index": self.index, "position": self.position, "n_tokens": self.n_tokens,
                        "input_ids": self.input_ids, "tokens": self.tokens, "anomaly": self.anomaly,
                        "notes": self.notes, "activations": self.activations.to_dict() if self.activations else None,
                        "attention": [a.to_dict() for a in self.attention],
                        "logit_lens": [t.to_dict() for t in self.logit_lens],
                        "quant_error": self.quant_error.to_dict() if self.quant_error else None,
                        "layers": self.layer_rows()})


@dataclass
class GenerationTrace:
    """A greedy generation: its tokens, the traced forward pass of each step and the KV cache per step."""

    prompt_ids: list[list[int]]
    generated_ids: list[list[int]]
    text: list[str]
    forward_indices: list[int]
    kv: KvCacheSession | None

    def to_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "generated_ids": self.generated_ids, "text": self.text,
                "forward_indices": self.forward_indices, "kv_cache": self.kv.to_dict() if self.kv else None}


def _percent(x: Any) -> str:
    """A fraction as ``12.34%``; ``n/a`` when it is not a number (a result read from a file may lack it)."""
    try:
        v = math.nan if isinstance(x, bool) or x is None else float(x)
    except (TypeError, ValueError):
        v = math.nan
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return format(v * 100, ".2f") + "%"


def summary_text(summary: Mapping[str, Any]) -> str:
    """The seed's human-readable summary of the summary fields (a missing field reads ``n/a``)."""
    def g(k: str) -> Any:
        return summary.get(k, "n/a")

    return "\n".join([
        "ModelTracer Summary:", f"  Forward passes: {g('total_forwards')}", f"  Anomalies: {g('anomalies_detected')}",
        f"  Attention traces: {g('attention_traces')}", f"  Logit traces: {g('logit_traces')}",
        f"  KV cache steps: {g('kv_steps')}", f"  KV evictions: {g('total_evictions')}",
        f"  Avg hit rate: {_percent(summary.get('avg_hit_rate'))}", f"  Quant warnings: {g('quant_warnings')}",
        f"  Quant criticals: {g('quant_criticals')}"])


def _dict(x: Any) -> dict | None:
    return dict(x) if isinstance(x, Mapping) else None


def _list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else []


@dataclass
class TracerResult:
    """Everything a tracer recorded, as plain JSON-safe data: models, config, summary fields, notes, and the
    forward passes and generations as their ``to_dict()`` dicts."""

    kind: ClassVar[str] = RESULT_KIND
    version: ClassVar[int] = RESULT_VERSION

    model: dict | None = None
    reference: dict | None = None
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    forwards: list[dict] = field(default_factory=list)
    generations: list[dict] = field(default_factory=list)
    trace_version: str | None = None

    def to_dict(self) -> dict:
        """The result file's dict (NaN and infinities as None)."""
        return _finite({"kind": RESULT_KIND, "version": RESULT_VERSION, "trace_version": self.trace_version,
                        "model": self.model, "reference": self.reference, "config": self.config,
                        "summary": self.summary, "notes": self.notes, "forwards": self.forwards,
                        "generations": self.generations})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TracerResult:
        """Read a result dict leniently, as the report does: a missing or malformed field comes back empty."""
        return cls(model=_dict(d.get("model")), reference=_dict(d.get("reference")),
                   config=_dict(d.get("config")) or {}, summary=_dict(d.get("summary")) or {},
                   notes=_list(d.get("notes")), forwards=_list(d.get("forwards")),
                   generations=_list(d.get("generations")), trace_version=d.get("trace_version"))

    def summary_text(self) -> str:
        """The seed's human-readable summary (see :func:`summary_text`)."""
        return summary_text(self.summary)

