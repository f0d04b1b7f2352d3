"""ModelTracer: per-layer traces of one model's forward passes, against a reference where one is attached.

It answers: where in the network, and at which token, does a variant start to diverge from its reference,
and is anything numerically broken?

>>> tracer = ModelTracer(ModelTracerConfig.full()).attach(variant, reference=reference)
>>> fwd = tracer.trace("The capital of France is")     # one traced forward pass
>>> fwd.anomaly                                          # first anomaly, or None
>>> gen = tracer.generate("Once upon a time", max_new_tokens=8)   # KV cache per step
>>> tracer.summary()                                     # the seed's summary fields

This module drives a Hugging Face model (prompts, generation, hooks); what a pass records and the seed's
low-level protocol are in :mod:`trace_lib.tracer.recorder`, the results' data in :mod:`trace_lib.tracer.result`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from trace_lib.models.device import model_device, to_device
from trace_lib.tracer.activations import ActivationRecord, tensor_stats
from trace_lib.tracer.attention import eager_attention, n_heads, summarise_attention
from trace_lib.tracer.config import ModelTracerConfig, TracerInputError
from trace_lib.tracer.kv_cache import (
    CacheInspector,
    KvCacheSession,
    make_cache,
    max_positions_of,
    next_token_kl,
)
from trace_lib.tracer.logit_lens import build_lens_trace, lens_logits
from trace_lib.tracer.quant_error import quant_error_trace
from trace_lib.tracer.recorder import TraceRecorder, hook_names, trace_hooks
from trace_lib.tracer.result import RESULT_KIND, RESULT_VERSION, ForwardTrace, GenerationTrace

__all__ = ["RESULT_KIND", "RESULT_VERSION", "ForwardTrace", "GenerationTrace", "ModelTracer"]  # results re-exported


class ModelTracer(TraceRecorder):
    """Per-layer tracing of activations, attention, logit lens, quantization error and KV cache.

    ``ModelTracer(config)`` follows the seed (default config: ``ModelTracerConfig.lightweight()``);
    ``attach(model, reference=None)`` binds a model (a :class:`~trace_lib.models.Loaded`, a Hugging Face
    causal LM or a model spec, loaded on ``device`` in ``dtype``) and optionally the reference it is compared
    with for the quantization error (``trace()`` passes only; generation steps are not compared). Inputs go to
    the model's device; what is recorded comes back as float32 on the CPU.
    """

    def __init__(self, config: ModelTracerConfig | None = None, model=None, reference=None, *,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None):
        super().__init__(config)
        if model is not None:
            self.attach(model, reference, device=device, dtype=dtype)

    # ------------------------------------------------------------------ attaching
    def attach(self, model, reference=None, *, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> ModelTracer:
        """Trace ``model``; compare it with ``reference`` (same architecture and vocabulary) for the
        quantization error. A spec (``"default"``, a folder, a .gguf) is loaded on ``device`` in ``dtype``; a
        model given loaded must already be there (:func:`~trace_lib.models.load.ensure_loaded`). Returns the
        tracer."""
        from trace_lib.models.load import Loaded, check_placement, ensure_loaded, from_model

        def as_loaded(m):
            if isinstance(m, str | os.PathLike):
                return ensure_loaded(m, device, dtype)
            if isinstance(m, nn.Module):
                m = from_model(m)
            if isinstance(m, Loaded):
                check_placement(m, device, dtype)
                return m
            return None

        loaded = as_loaded(model)
        if loaded is None:
            raise TracerInputError(f"cannot trace a {type(model).__name__}: give a trace Loaded, a Hugging Face "
                                   "causal LM or a model spec")
        ref = None
        if reference is not None:
            ref = as_loaded(reference)
            if ref is None:
                raise TracerInputError(f"cannot compare with a {type(reference).__name__}: give a trace Loaded, a "
                                       "Hugging Face causal LM or a model spec")
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
                        inputs = to_device({"input_ids": step_ids, "attention_mask": full_mask},
                                           model_device(model))
                        with torch.no_grad():
                            full = model(**inputs, past_key_values=full_cache, use_cache=True).logits[:, -1]
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
        stats_names, keep_names, names = hook_names(loaded.arch, cfg, lens=cfg.trace_logits, quant=quant)
        hooks = trace_hooks(loaded, names, stats_names, keep_names) if names else None
        device = model_device(model)
        ids, mask = to_device(ids, device), to_device(mask, device)
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


def _vocab(loaded) -> int:
    unembed = loaded.arch.unembed
    n = getattr(unembed, "out_features", None)
    return int(n) if n is not None else int(unembed.weight.shape[0])


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

