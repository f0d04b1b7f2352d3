"""ModelTracer: per-layer traces of one model's forward passes, against a reference where one is attached.

It answers: where in the network, and at which token, does a variant start to diverge from its reference,
and is anything numerically broken?

>>> tracer = ModelTracer(ModelTracerConfig.full()).attach(variant, reference=reference)
>>> fwd = tracer.trace("The capital of France is")     # one traced forward pass
>>> fwd.anomaly                                          # first anomaly, or None
>>> gen = tracer.generate("Once upon a time", max_new_tokens=8)   # KV cache per step
>>> tracer.summary()                                     # the seed's summary fields

The seed's low-level protocol is here too, for callers that compute their own records: ``begin_forward``,
``record_layer_activation``, ``record_attention``, ``record_logits``, ``record_kv_state``,
``record_quant_error``, ``end_forward`` (returns the first anomaly's description), ``summary``,
``summary_to_json`` and ``clear``. :meth:`ModelTracer.trace` and :meth:`ModelTracer.generate` drive the same
protocol from hooks on a Hugging Face model.

Every traced forward pass counts once in ``total_forwards`` (the seed counts its activation traces, which is
the same number when activations are traced). The reference's forward pass for the quantization error is not
a traced pass and does not count.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from trace_lib.cache import atomic_write_json
from trace_lib.capture.hooks import HookConfig, HookManager, to_float32_cpu
from trace_lib.jsonutil import json_clean as _finite  # NaN and infinities -> None, recursively
from trace_lib.models.arch import first_tensor
from trace_lib.tracer.activations import (
    RESID_EXPLOSION_POINT,
    ActivationRecord,
    ActivationTrace,
    detect_anomalies,
    tensor_stats,
)
from trace_lib.tracer.attention import AttentionWeightTrace, eager_attention, n_heads, summarise_attention
from trace_lib.tracer.config import ModelTracerConfig, TracerInputError
from trace_lib.tracer.kv_cache import (
    CacheInspector,
    KvCacheSession,
    KvCacheStep,
    make_cache,
    max_positions_of,
    next_token_kl,
)
from trace_lib.tracer.logit_lens import LogitLensTrace, build_lens_trace, lens_logits
from trace_lib.tracer.quant_error import (
    LayerQuantError,
    QuantErrorTrace,
    level_of,
    quant_error_trace,
    thresholds_of,
)

RESULT_KIND = "trace.tracer"
RESULT_VERSION = 1
_POINT_ORDER = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


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


class _TraceHooks(HookManager):
    """A HookManager that keeps statistics (and, where asked, a float32 copy) instead of every activation."""

    def __init__(self, loaded, names: list[str], stats_names: set[str], keep_names: set[str]):
        super().__init__(loaded, HookConfig(layers=[], hook_points=(), names=tuple(names), check_finite=False))
        self.stats_names = stats_names
        self.keep_names = keep_names

    def _record(self, name: str, value) -> None:
        t = first_tensor(value)
        entry: dict = {}
        if name in self.stats_names:
            entry["stats"] = tensor_stats(_real_tokens(t, self._mask), t.dtype)
        if name in self.keep_names:
            entry["tensor"] = to_float32_cpu(t)
        self._store(name, entry)


def _real_tokens(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None or t.dim() != 3 or tuple(mask.shape) != tuple(t.shape[:2]) or bool(mask.all()):
        return t
    return t[mask.bool().to(t.device)]


class ModelTracer:
    """Per-layer tracing of activations, attention, logit lens, quantization error and KV cache.

    ``ModelTracer(config)`` follows the seed (default config: ``ModelTracerConfig.lightweight()``);
    ``attach(model, reference=None)`` binds a model (a :class:`~trace_lib.models.Loaded` or a Hugging Face
    causal LM) and optionally the reference it is compared with for the quantization error (``trace()`` passes
    only; generation steps are not compared).
    """

    def __init__(self, config: ModelTracerConfig | None = None, model=None, reference=None):
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
        if model is not None:
            self.attach(model, reference)

    # ------------------------------------------------------------------ attaching
    def attach(self, model, reference=None) -> ModelTracer:
        """Trace ``model``; compare it with ``reference`` (same architecture and vocabulary) for the
        quantization error. Returns the tracer."""
        from trace_lib.models.load import Loaded, from_model

        loaded = model if isinstance(model, Loaded) else from_model(model) if isinstance(model, nn.Module) else None
        if loaded is None:
            raise TracerInputError(f"cannot trace a {type(model).__name__}: give a trace Loaded or a Hugging Face "
                                   "causal LM")
        ref = None
        if reference is not None:
            ref = reference if isinstance(reference, Loaded) else from_model(reference)
            if ref.n_layers != loaded.n_layers:
                raise TracerInputError(f"the reference has {ref.n_layers} blocks and the traced model "
                                       f"{loaded.n_layers}: compare a variant with the model it was made from")
            if _vocab(ref) != _vocab(loaded):
                raise TracerInputError(f"the reference's vocabulary ({_vocab(ref)}) differs from the traced "
                                       f"model's ({_vocab(loaded)}): they cannot read the same token ids")
        cfg = self.config
        if cfg.trace_attention:
            cfg.attention_config.validate(loaded.n_layers, n_heads(loaded.model))
        if cfg.tracked_tokens is not None:
            bad = [t for t in cfg.tracked_tokens if not 0 <= int(t) < _vocab(loaded)]
            if bad:
                raise TracerInputError(f"tracked token id(s) {bad} outside the vocabulary (0..{_vocab(loaded) - 1})")
        self.loaded, self.reference = loaded, ref
        return self

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

    # ------------------------------------------------------------------ driving a model
    def trace(self, prompt: str | None = None, *, input_ids: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None) -> ForwardTrace:
        """One traced forward pass over a prompt (or token ids [batch, seq] with an optional attention mask)."""
        self._need_model()
        ids, mask = self._inputs(prompt, input_ids, attention_mask)
        with self._attention_mode():
            fwd, _ = self._traced_forward(ids, mask, position=0)
        return fwd

    def generate(self, prompt: str | None = None, *, input_ids: torch.Tensor | None = None,
                 max_new_tokens: int = 16, stop_at_eos: bool = True) -> GenerationTrace:
        """Greedy generation, each step a traced forward pass; with ``trace_kv_cache`` the cache is measured
        after every step (see :mod:`trace_lib.tracer.kv_cache`)."""
        self._need_model()
        if max_new_tokens < 1:
            raise TracerInputError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        ids, mask = self._inputs(prompt, input_ids, None)
        model = self.loaded.model
        cfg = self.config
        kind = cfg.kv_cache if cfg.trace_kv_cache else "dynamic"
        cache = make_cache(model, kind, cfg.kv_nbits)
        inspector = CacheInspector(cache, max_positions_of(model), self._decode) if cfg.trace_kv_cache else None
        full_cache = make_cache(model, "dynamic") if inspector is not None and inspector.quantized else None
        session = None
        if inspector is not None:
            session = KvCacheSession(kind=kind, cache_class=type(cache).__name__)
            if full_cache is not None:
                session.notes.append("next_token_kl: a full-precision DynamicCache run fed the same tokens in "
                                     "lock step; key/value errors: de-quantized cache contents against the "
                                     "full-precision states handed to the cache")
            self.kv_sessions.append(session)
        eos = _eos_ids(self.loaded)
        step_ids, full_mask, position = ids, mask, 0
        new: list[torch.Tensor] = []
        indices: list[int] = []
        with self._attention_mode():
            for step in range(max_new_tokens):
                fwd, logits = self._traced_forward(step_ids, full_mask, position, past_key_values=cache)
                indices.append(fwd.index)
                last = logits[:, -1]
                next_tok = last.argmax(-1)
                if inspector is not None:
                    rec = inspector.measure(step, step_ids.shape[1], int(next_tok[0]) if next_tok.numel() == 1
                                            else None)
                    if full_cache is not None:
                        dev = _device(model)
                        with torch.no_grad():
                            full = model(input_ids=step_ids.to(dev), attention_mask=full_mask.to(dev),
                                         past_key_values=full_cache, use_cache=True).logits[:, -1]
                        rec.next_token_kl, rec.top1_matches_full_precision = next_token_kl(full.float(), last.float())
                    self.record_kv_state(rec)
                new.append(next_tok)
                position += step_ids.shape[1]
                step_ids = next_tok[:, None].to(ids.device)
                full_mask = torch.cat([full_mask, torch.ones_like(step_ids)], dim=1)
                if stop_at_eos and eos and all(int(t) in eos for t in next_tok):
                    break
        gen = torch.stack(new, dim=1).cpu()
        text = [self.loaded.tokenizer.decode(row) for row in gen.tolist()] if self.loaded.tokenizer else []
        result = GenerationTrace(prompt_ids=ids.cpu().tolist(), generated_ids=gen.tolist(), text=text,
                                 forward_indices=indices, kv=session)
        self.generations.append(result)
        return result

    def _traced_forward(self, ids: torch.Tensor, mask: torch.Tensor, position: int, past_key_values=None
                        ) -> tuple[ForwardTrace, torch.Tensor]:
        cfg = self.config
        loaded = self.loaded
        model = loaded.model
        quant = cfg.trace_quant_error and self.reference is not None and past_key_values is None and position == 0
        stats_names, keep_names, names = self._hook_names(lens=cfg.trace_logits, quant=quant)
        hooks = _TraceHooks(loaded, names, stats_names, keep_names) if names else None
        device = _device(model)
        ids, mask = ids.to(device), mask.to(device)
        self.begin_forward(position)
        try:
            with torch.no_grad(), (hooks.capture() if hooks is not None else nullcontext()):
                out = model(input_ids=ids, attention_mask=mask, past_key_values=past_key_values,
                            use_cache=past_key_values is not None, output_attentions=cfg.trace_attention)
        except BaseException:
            self._current = None  # hooks are already removed by capture(); drop the half-recorded pass
            raise
        cur = self._current
        cur.n_tokens = int(ids.shape[1])
        cur.input_ids = ids.cpu().tolist()
        cur.tokens = [[self._decode(t) for t in row] for row in cur.input_ids]
        acts = hooks.batches[-1].acts if hooks is not None and hooks.batches else {}
        logits = out.logits.detach()
        last_idx = _last_real(mask[:, -ids.shape[1]:])
        if cfg.trace_activations:
            for name in names:
                if name in stats_names:
                    _, layer_s, hook = name.split(".")
                    self.record_layer_activation(ActivationRecord(hook=name, layer=int(layer_s),
                                                                  point=hook[len("hook_"):],
                                                                  stats=acts[name]["stats"]))
            final = logits[torch.arange(logits.shape[0], device=logits.device), last_idx.to(logits.device)]
            self.record_layer_activation(ActivationRecord(hook="logits", layer=None, point="logits",
                                                          stats=tensor_stats(final)))
        if cfg.trace_attention:
            attentions = getattr(out, "attentions", None) or ()
            if not attentions:
                cur.notes.append("the model returned no attention weights; attention not traced")
            for t in summarise_attention(attentions, mask, cfg.attention_config, position):
                self.record_attention(t)
        if cfg.trace_logits:
            self._lens(acts, mask[:, -ids.shape[1]:], position)
        if quant:
            variant_acts = {i: acts[f"blocks.{i}.hook_resid_post"]["tensor"] for i in range(loaded.n_layers)}
            cur.quant_error = quant_error_trace(self.reference, variant_acts, logits.float().cpu(), ids, mask, cfg,
                                                variant_name=loaded.name, decode=self._decode)
        elif cfg.trace_quant_error and self.reference is None and position == 0:
            cur.notes.append("quantization error not traced: no reference attached "
                             "(tracer.attach(variant, reference=reference))")
        self.end_forward()
        return self.forwards[-1], logits

    def _lens(self, acts: dict, mask: torch.Tensor, position: int) -> None:
        cfg = self.config
        n = self.loaded.n_layers
        resid = [acts[f"blocks.{i}.hook_resid_post"]["tensor"] for i in range(n)]
        mask = mask.cpu().bool()
        for b in range(resid[0].shape[0]):
            real = mask[b].nonzero().flatten().tolist()
            if cfg.logit_positions is None:
                positions = real
            else:
                positions = []
                for p in cfg.logit_positions:
                    i = len(real) + p if p < 0 else p
                    if 0 <= i < len(real) and real[i] not in positions:
                        positions.append(real[i])
            if not positions:
                continue
            stacked = torch.stack([r[b, positions] for r in resid], dim=1)  # [n_pos, n_layers, d]
            logits = lens_logits(self.loaded, stacked)
            for j, pos in enumerate(positions):
                self.record_logit_trace(build_lens_trace(
                    logits[j], list(range(n)), position + pos, self._tracked(), cfg.logit_top_k, self._decode,
                    batch_index=b, keep_logits=cfg.keep_lens_logits))

    def _hook_names(self, lens: bool, quant: bool) -> tuple[set[str], set[str], list[str]]:
        cfg = self.config
        arch = self.loaded.arch
        stats: set[str] = set()
        keep: set[str] = set()
        names: list[str] = []
        for i in range(arch.n_layers):
            for p in _POINT_ORDER:
                if p == "resid_mid" and arch.layout.resid_mid is None:
                    continue
                name = f"blocks.{i}.hook_{p}"
                if cfg.trace_activations and p in cfg.activation_points:
                    stats.add(name)
                if p == "resid_post" and (lens or quant):
                    keep.add(name)
                if name in stats or name in keep:
                    names.append(name)
        return stats, keep, names

    @contextmanager
    def _attention_mode(self):
        if not self.config.trace_attention:
            yield
            return
        with eager_attention(self.loaded.model) as replaced:
            if replaced is not None:
                note = (f"attention weights need eager attention: switched {self.loaded.name} from {replaced!r} "
                        "to 'eager' for the traced forward passes and restored it afterwards")
                if note not in self.notes:
                    self.notes.append(note)
            yield

    # ------------------------------------------------------------------ helpers
    def _need_model(self) -> None:
        if self.loaded is None:
            raise TracerInputError("no model attached: ModelTracer(config).attach(model) first")

    def _inputs(self, prompt, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        if (prompt is None) == (input_ids is None):
            raise TracerInputError("give either a prompt or input_ids (not both, not neither)")
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt.strip():
                raise TracerInputError("the prompt is empty: give some text to trace")
            if self.loaded.tokenizer is None:
                raise TracerInputError(f"{self.loaded.name} has no tokenizer: pass input_ids instead of a prompt")
            enc = self.loaded.tokenizer(prompt, return_tensors="pt")
            input_ids, attention_mask = enc["input_ids"], enc.get("attention_mask")
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.numel() == 0 or ids.shape[1] == 0:
            raise TracerInputError(f"input_ids must be a non-empty [batch, seq] tensor, not shape {tuple(ids.shape)}")
        vocab = _vocab(self.loaded)
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise TracerInputError(f"token ids must lie in 0..{vocab - 1}; got {int(ids.min())}..{int(ids.max())}")
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).reshape(ids.shape)
        if not bool(mask.any(dim=1).all()):
            raise TracerInputError("a row of the attention mask has no real token: drop empty rows")
        return ids.long(), mask.long()

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
        s = self.summary()
        return "\n".join([
            "ModelTracer Summary:", f"  Forward passes: {s['total_forwards']}", f"  Anomalies: {s['anomalies_detected']}",
            f"  Attention traces: {s['attention_traces']}", f"  Logit traces: {s['logit_traces']}",
            f"  KV cache steps: {s['kv_steps']}", f"  KV evictions: {s['total_evictions']}",
            f"  Avg hit rate: {100 * s['avg_hit_rate']:.2f}%", f"  Quant warnings: {s['quant_warnings']}",
            f"  Quant criticals: {s['quant_criticals']}"])

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

    def to_dict(self) -> dict:
        from trace_lib import __version__

        """Everything recorded, as plain JSON-safe data (NaN and infinities as None): what reports read."""
        return _finite({"kind": RESULT_KIND, "version": RESULT_VERSION, "trace_version": __version__,
                        "model": self.loaded.describe() if self.loaded is not None else None,
                        "reference": self.reference.describe() if self.reference is not None else None,
                        "config": self.config.to_dict(), "summary": self.summary(), "notes": self.notes,
                        "forwards": [f.to_dict() for f in self.forwards],
                        "generations": [g.to_dict() for g in self.generations]})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        return atomic_write_json(path, self.to_dict())


def _vocab(loaded) -> int:
    unembed = loaded.arch.unembed
    n = getattr(unembed, "out_features", None)
    return int(n) if n is not None else int(unembed.weight.shape[0])


def _device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token in each row of ``mask`` [batch, seq]."""
    seq = mask.shape[1]
    idx = torch.arange(seq, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values.clamp_min(0)


def _eos_ids(loaded) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(loaded.model, "generation_config", None), getattr(loaded.model, "config", None),
                loaded.tokenizer):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids
