"""Capture internal activations with PyTorch forward hooks, named as TransformerLens names them.

>>> hm = HookManager(model, HookConfig(layers=[0, 5, 10], hook_points=["resid_post"]))
>>> with hm.capture():
...     model(input_ids, attention_mask=mask)
>>> hm.get_activations("resid_post", layer=5)          # [batch, seq, d_model], float32 on CPU

Activations always come back as float32 on the CPU, whatever the model's device, dtype or quantization
(tensor subclasses are de-quantized), so every metric downstream sees the same dtype; from a GPU they are
copied asynchronously into pinned memory and the forward pass's copies are awaited once, at its end, before
anything reads them. :meth:`HookManager.run` moves its inputs to the model's device. The attention mask of
each forward pass is recorded with the activations so padding never counts (``flat=True`` keeps only real
tokens). For runs too large to hold in memory, :meth:`HookManager.stream` hands each forward pass's activations to a callback and keeps nothing, and
:func:`iter_activations` turns a stream of token batches into a stream of captured batches.

``HookManager(..., reduce=fn)`` keeps ``fn(hook_name, activation, attention_mask)`` instead of the activation
(statistics instead of tensors, as the tracer does), and :meth:`HookManager.run` runs one forward pass that
can stop after the last hook (``stop_early=True``: later layers are not computed).

Hooks are always removed when the ``with`` block ends, also when the forward pass raises; while they are on,
:func:`trace_lib.capture.registry.installed_hooks` lists them (kind ``capture``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trace_lib.capture.registry import register_hook
from trace_lib.errors import HookError
from trace_lib.models.arch import ArchAdapter, adapt, first_tensor
from trace_lib.models.device import model_device, to_device

# reduce(hook_name, activation as the module gives it, attention mask [batch, seq] on the CPU) -> what is kept
Reduce = Callable[[str, torch.Tensor, torch.Tensor | None], Any]


@dataclass
class HookConfig:
    """Which hook points to capture.

    ``layers`` x ``hook_points`` in the seed's short form (``layers=None`` means every layer), plus any
    full names in ``names`` (``"blocks.5.hook_attn_out"``, ``"ln_final.hook_normalized"``).
    """

    layers: Sequence[int] | None = None
    hook_points: Sequence[str] = ("resid_post",)
    names: Sequence[str] = ()
    check_finite: bool = True

    def hook_names(self, arch: ArchAdapter) -> list[str]:
        names: list[str] = []
        layers = range(arch.n_layers) if self.layers is None else self.layers
        for layer in layers:
            for point in self.hook_points:
                names.append(arch.resolve(point, None if point.startswith("ln_final") else layer))
        names.extend(arch.resolve(n) for n in self.names)
        seen: dict[str, None] = {}
        for n in names:
            seen.setdefault(n, None)
        if not seen:
            raise HookError("HookConfig selects no hook points: give layers and hook_points, or names")
        return list(seen)


@dataclass
class CapturedBatch:
    """The activations of one forward pass. ``acts[name]`` is [batch, seq, d] float32 (or what the
    HookManager's ``reduce`` returned for it)."""

    index: int
    acts: dict[str, Any]
    attention_mask: torch.Tensor
    input_ids: torch.Tensor | None = None

    def valid(self, name: str) -> torch.Tensor:
        """Activations of real (unpadded) tokens only: [n_tokens, d]."""
        return self.acts[name][self.attention_mask.bool()]


class _StopForward(Exception):
    """Raised inside a hook once every requested activation is captured, to skip the rest of the model."""


def to_float32_cpu(t: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """A detached float32 CPU copy; tensor subclasses (quantized tensors) are de-quantized first.

    With ``non_blocking`` a copy from a CUDA tensor lands in pinned memory and is not waited for: synchronize
    (:func:`wait_for_copies`) before reading it. From the CPU the copy is always complete on return."""
    t = t.detach()
    if type(t) is not torch.Tensor and hasattr(t, "dequantize"):
        t = t.dequantize()
    if t.is_quantized:
        t = t.dequantize()
    return t.to("cpu", torch.float32, non_blocking=non_blocking and t.device.type == "cuda", copy=True)


def wait_for_copies(device: torch.device | None) -> None:
    """Wait for the asynchronous device-to-CPU copies queued on ``device`` (nothing to wait for on the CPU)."""
    if device is not None and device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


@dataclass
class HookManager:
    """Registers forward hooks on the modules behind TransformerLens hook names and stores what they see.

    ``reduce``: when given, ``reduce(hook_name, activation, attention_mask)`` is stored instead of the
    activation's float32 CPU copy (``activation`` as the module gives it: its dtype and device; no finite
    check). ``owner`` names the hooks in the registry (:mod:`trace_lib.capture.registry`).
    """

    model: nn.Module
    config: HookConfig = field(default_factory=HookConfig)
    arch: ArchAdapter | None = None
    reduce: Reduce | None = None
    owner: str = "HookManager"

    def __post_init__(self) -> None:
        loaded = self.model
        if hasattr(loaded, "arch") and hasattr(loaded, "model"):  # a trace Loaded
            self.arch = self.arch or loaded.arch
            self.model = loaded.model
        self.arch = self.arch or adapt(self.model)
        self.names = self.config.hook_names(self.arch)
        self._sites = [self.arch.site(n) for n in self.names]
        self._handles: list = []
        self._current: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._input_ids: torch.Tensor | None = None
        self._batches: list[CapturedBatch] = []
        self._copying_from: torch.device | None = None  # the CUDA device of this pass's pending async copies
        self._callback: Callable[[CapturedBatch], None] | None = None
        self._stop_early = False
        self._n_forward = 0

    # ------------------------------------------------------------------ hook plumbing
    def _record(self, name: str, value) -> None:
        if self.reduce is not None:
            self._store(name, self.reduce(name, first_tensor(value), self._mask))
            return
        src = first_tensor(value)
        if src.device.type == "cuda":  # copied asynchronously; checked once the pass's copies are done
            self._copying_from = src.device
            self._store(name, to_float32_cpu(src, non_blocking=True))
            return
        t = to_float32_cpu(src)
        self._check_finite(name, t)
        self._store(name, t)

    def _check_finite(self, name: str, t: torch.Tensor) -> None:
        """NaN or Inf at a real (unpadded) token is a :class:`HookError`; at padding it never counts."""
        if not self.config.check_finite or torch.isfinite(t).all():
            return
        real = t[self._mask.bool()] if self._mask is not None and self._mask.shape == t.shape[:2] else t
        if torch.isfinite(real).all():
            return
        bad = "NaN" if torch.isnan(real).any() else "Inf"
        raise HookError(f"{bad} in activations at {name} on batch {self._n_forward}: the model's numerics "
                        "broke there (check the quantization config or the input)")

    def _store(self, name: str, t: Any) -> None:
        self._current[name] = t
        if self._stop_early and len(self._current) == len(self.names):
            raise _StopForward

    def _make_hook(self, name: str, kind: str):
        if kind == "in":
            def pre_hook(module, args, kwargs):
                self._record(name, args[0] if args else kwargs.get("hidden_states"))
            return pre_hook

        def hook(module, args, output):
            self._record(name, output)
        return hook

    def _on_model_start(self, module, args, kwargs) -> None:
        self._current = {}
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        embeds = kwargs.get("inputs_embeds")
        ref = ids if isinstance(ids, torch.Tensor) else embeds
        if ref is None:
            raise HookError("could not find input_ids or inputs_embeds in the model call")
        shape = ref.shape[:2]
        self._input_ids = ids.detach().cpu() if isinstance(ids, torch.Tensor) else None
        self._mask = (mask.detach().cpu().to(torch.long) if isinstance(mask, torch.Tensor) and mask.dim() == 2
                      else torch.ones(shape, dtype=torch.long))

    def _on_model_end(self, module, args, output) -> None:
        self._finish_batch()

    def _finish_batch(self) -> None:
        if not self._current:
            return
        if self._copying_from is not None:
            wait_for_copies(self._copying_from)
            self._copying_from = None
            if self.reduce is None:
                for name, t in self._current.items():
                    self._check_finite(name, t)
        missing = [n for n in self.names if n not in self._current]
        if missing:
            raise HookError(f"hooks for {missing[:3]} did not fire in this forward pass; the model's structure "
                            "differs from its architecture adapter")
        batch = CapturedBatch(self._n_forward, self._current, self._mask, self._input_ids)
        self._current = {}
        self._n_forward += 1
        if self._callback is not None:
            self._callback(batch)
        else:
            self._batches.append(batch)

    def _register(self) -> None:
        if self._handles:
            raise HookError("this HookManager is already capturing; nested capture() is not supported")
        tag = {"kind": "capture", "owner": self.owner}
        self._handles.append(register_hook(self.model, self._on_model_start, hook_name="model:start", pre=True,
                                           with_kwargs=True, **tag))
        for name, site in zip(self.names, self._sites):
            if site.kind == "in":
                h = register_hook(site.module, self._make_hook(name, "in"), hook_name=name, pre=True,
                                  with_kwargs=True, **tag)
            else:
                h = register_hook(site.module, self._make_hook(name, "out"), hook_name=name, **tag)
            self._handles.append(h)
        self._handles.append(register_hook(self.model, self._on_model_end, hook_name="model:end", **tag))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._current = {}
        if self._copying_from is not None:  # a pass that raised: let its copies land before the memory is reused
            wait_for_copies(self._copying_from)
            self._copying_from = None

    # ------------------------------------------------------------------ public API
    @contextmanager
    def capture(self, stop_early: bool = False):
        """Record activations of every forward pass run inside the block.

        With ``stop_early=True`` the forward pass is cut short as soon as every requested activation is
        recorded (later layers are not computed; the model call returns nothing and the rest of the
        ``with`` body is skipped), which is what activation collection for SAE training wants.
        """
        self._register()
        self._stop_early = stop_early
        try:
            yield self
        except _StopForward:
            self._finish_batch()
        finally:
            self._stop_early = False
            self._remove()

    def run(self, stop_early: bool = False, **inputs: Any) -> Any:
        """One forward pass of the model on ``inputs`` (``input_ids=...``, ``attention_mask=...``) inside a
        :meth:`capture` or :meth:`stream` block, recorded like any other; tensor inputs are moved to the model's
        device first (:func:`~trace_lib.models.device.to_device`).

        With ``stop_early`` the pass stops as soon as every requested activation is recorded (later layers
        are not computed) and returns None; otherwise it returns the model's output.
        """
        if not self._handles:
            raise HookError("HookManager.run() needs an active capture() or stream() block")
        before, self._stop_early = self._stop_early, stop_early
        try:
            return self.model(**to_device(inputs, model_device(self.model)))
        except _StopForward:
            self._finish_batch()
            return None
        finally:
            self._stop_early = before

    @contextmanager
    def stream(self, callback: Callable[[CapturedBatch], None]):
        """Like :meth:`capture`, but each forward pass's activations go to ``callback`` and are not kept."""
        self._callback = callback
        try:
            with self.capture():
                yield self
        finally:
            self._callback = None

    @property
    def batches(self) -> list[CapturedBatch]:
        return self._batches

    @property
    def attention_mask(self) -> torch.Tensor:
        """Attention masks of the captured forward passes, concatenated over batches: [batch, seq]."""
        self._need_batches()
        return _cat([b.attention_mask for b in self._batches], "attention masks")

    def get_activations(self, point: str, layer: int | None = None, flat: bool = False) -> torch.Tensor:
        """Captured activations at a hook point.

        ``point`` is a short point (``"resid_post"`` with ``layer=5``) or a full name. Returns
        [batch, seq, d] concatenated over the captured forward passes, or with ``flat=True`` the real
        tokens only, [n_tokens, d], in batch-major order.
        """
        self._need_batches()
        name = self.arch.resolve(point, layer)
        if name not in self.names:
            raise HookError(f"{name} was not captured; this HookManager captures {', '.join(self.names[:6])}"
                            f"{' ...' if len(self.names) > 6 else ''}")
        if flat:
            return torch.cat([b.valid(name) for b in self._batches])
        return _cat([b.acts[name] for b in self._batches], name)

    def clear(self) -> None:
        self._batches = []
        self._n_forward = 0

    def _need_batches(self) -> None:
        if not self._batches:
            raise HookError("no activations captured yet: run the model inside `with hook_manager.capture():`")


def _cat(tensors: list[torch.Tensor], what: str) -> torch.Tensor:
    lengths = {t.shape[1] for t in tensors}
    if len(lengths) > 1:
        raise HookError(f"captured {what} have different sequence lengths {sorted(lengths)}; "
                        "use flat=True, or the batches one by one")
    return torch.cat(tensors)


def iter_activations(model, batches: Iterable[dict[str, torch.Tensor]], config: HookConfig | None = None,
                     names: Sequence[str] | None = None, stop_early: bool = True) -> Iterator[CapturedBatch]:
    """Run ``model`` on each batch (dicts with ``input_ids`` and ``attention_mask``) and yield its activations.

    Only one batch's activations are alive at a time, so a run over millions of tokens needs memory for
    one batch. With ``stop_early`` (default) layers after the last requested hook are not computed.
    """
    if config is None:
        config = HookConfig(layers=[], hook_points=(), names=tuple(names or ()))
    hm = HookManager(model, config)
    out: list[CapturedBatch] = []
    # no_grad (not inference_mode) around the call only: the consumer may train on what it receives.
    with hm.stream(out.append):
        for batch in batches:
            with torch.no_grad():
                hm.run(stop_early, input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       use_cache=False)
            yield from out
            out.clear()
