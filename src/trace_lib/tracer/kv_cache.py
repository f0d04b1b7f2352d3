"""KV cache state during generation (the seed's MLT-05).

After every generation step (step 0 is the prompt's forward pass, each later step one new token) a
:class:`KvCacheStep` records, from the transformers cache object itself:

- ``valid_positions``: positions held (the longest layer); ``max_positions``: the model's context window;
- ``cache_size_bytes``: bytes of every tensor the cache stores, summed over layers (keys, values, and for a
  quantized cache its quantized states and scales);
- ``evictions_this_step``: key/value positions dropped this step, summed over layers: ``held before + new -
  held after`` (non-zero only for sliding-window layers past their window; ``DynamicCache`` never evicts);
- ``cache_hit_rate``: the seed's "reused positions / total lookups": the new tokens attend to the ``held
  before`` cached positions plus themselves, so ``held before / (held before + new)``, averaged over layers
  (0 at the prompt step, where nothing is cached yet);
- ``oldest_position``: the oldest position every layer still holds; ``fragmentation``: 0, as transformers
  keeps each layer's cache in one contiguous tensor.

For a quantized cache (transformers' ``QuantizedCache``: the ``fp8`` backend is plain torch and runs
everywhere; ``quanto`` and ``hqq`` need optimum-quanto / hqq) each step also records

- the storage error of what is cached: every key/value state handed to the cache is kept in full precision
  on the side, and the cache's de-quantized contents are compared with it (relative L2 error and cosine, over
  all layers; the worst layer's relative error);
- the cost to the output: a full-precision ``DynamicCache`` run is fed the same tokens in lock step, and
  KL(p_full || p_quantized) of the next-token distribution and whether both pick the same top-1 are recorded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from trace_lib.errors import QuantizationError
from trace_lib.metrics.divergence import kl_divergence


@dataclass
class KvCacheStep:
    """The cache after one generation step (the seed's ``KvCacheStateTrace`` plus quantization error)."""

    step: int
    new_tokens: int
    valid_positions: int
    max_positions: int
    cache_size_bytes: int
    evictions_this_step: int = 0
    cache_hit_rate: float = 0.0
    oldest_position: int = 0
    fragmentation: float = 0.0
    token_id: int | None = None
    token_str: str | None = None
    key_rel_error: float | None = None
    value_rel_error: float | None = None
    key_cosine: float | None = None
    value_cosine: float | None = None
    worst_layer: int | None = None
    worst_layer_rel_error: float | None = None
    next_token_kl: float | None = None
    top1_matches_full_precision: bool | None = None

    def utilization(self) -> float:
        return self.valid_positions / self.max_positions if self.max_positions else 0.0

    def is_window_exhausted(self) -> bool:
        return self.valid_positions >= self.max_positions

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class KvCacheSession:
    """Every step of one generation (the seed's ``KvCacheSessionTrace``)."""

    kind: str = "dynamic"
    cache_class: str = ""
    steps: list[KvCacheStep] = field(default_factory=list)
    total_evictions: int = 0
    avg_hit_rate: float = 0.0
    peak_memory_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def add_step(self, step: KvCacheStep) -> None:
        self.total_evictions += step.evictions_this_step
        self.peak_memory_bytes = max(self.peak_memory_bytes, step.cache_size_bytes)
        n = len(self.steps) + 1
        self.avg_hit_rate = (self.avg_hit_rate * (n - 1) + step.cache_hit_rate) / n
        self.steps.append(step)

    def has_high_eviction_rate(self) -> bool:
        """More than 10% of steps evicted something (the seed's rule)."""
        return bool(self.steps) and sum(s.evictions_this_step > 0 for s in self.steps) / len(self.steps) > 0.1

    def to_dict(self) -> dict:
        return {"kind": self.kind, "cache_class": self.cache_class, "total_evictions": self.total_evictions,
                "avg_hit_rate": self.avg_hit_rate, "peak_memory_bytes": self.peak_memory_bytes, "notes": self.notes,
                "steps": [s.to_dict() for s in self.steps]}


def make_cache(model, kind: str = "dynamic", nbits: int = 4):
    """A fresh transformers cache of ``kind`` for ``model`` (see the module docstring)."""
    from transformers import DynamicCache

    if kind == "dynamic":
        return DynamicCache(config=model.config)
    from transformers import QuantizedCache
    from transformers.utils import is_hqq_available, is_optimum_quanto_available

    if kind == "quanto" and not is_optimum_quanto_available():
        raise QuantizationError("the 'quanto' KV cache backend needs optimum-quanto, which is not installed; "
                                "use kv_cache='fp8' (plain torch) or install optimum-quanto")
    if kind == "hqq" and not is_hqq_available():
        raise QuantizationError("the 'hqq' KV cache backend needs hqq, which is not installed; "
                                "use kv_cache='fp8' (plain torch) or install hqq")
    try:
        if kind == "fp8":
            return QuantizedCache("fp8", model.config)
        return QuantizedCache(kind, model.config, nbits=nbits)
    except (ValueError, ImportError) as e:
        raise QuantizationError(f"transformers' QuantizedCache ({kind}) cannot run on this model: "
                                f"{str(e).splitlines()[0]}; use kv_cache='dynamic'") from e


def is_quantized(cache) -> bool:
    from transformers.cache_utils import BaseQuantizedLayer

    return any(isinstance(layer, BaseQuantizedLayer) for layer in getattr(cache, "layers", ()))


def _nbytes(obj) -> int:
    if obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(_nbytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(x) for x in obj.values())
    return 0


def layer_bytes(layer) -> int:
    """Bytes a cache layer stores: full-precision keys/values plus any quantized states."""
    n = _nbytes(getattr(layer, "keys", None)) + _nbytes(getattr(layer, "values", None))
    n += _nbytes(getattr(layer, "_quantized_keys", None)) + _nbytes(getattr(layer, "_quantized_values", None))
    return n


def _held(layer) -> int:
    """Positions a layer physically holds (a sliding window holds fewer than it has seen)."""
    from transformers.cache_utils import BaseQuantizedLayer

    if isinstance(layer, BaseQuantizedLayer):
        return int(layer.get_seq_length())
    keys = getattr(layer, "keys", None)
    if keys is None or keys.dim() < 2:
        return 0
    return int(keys.shape[-2])


def _seen(layer) -> int:
    return int(getattr(layer, "cumulative_length", 0) or 0) or _held(layer)


def _dequantized(layer, which: str) -> torch.Tensor | None:
    """The full contents of a quantized layer's keys or values, as attention reads them."""
    from transformers.cache_utils import QuantizedLayer

    q = getattr(layer, f"_quantized_{which}", None)
    if q is None:
        return None
    deq = layer._dequantize(q)
    if isinstance(layer, QuantizedLayer):  # KIVI-style: quantized part + full-precision residual window
        resid = getattr(layer, which)
        if resid is not None and resid.dim() == 4 and resid.shape[-2] > 0:
            deq = torch.cat([deq, resid], dim=-2)
    return deq


class CacheInspector:
    """Measures a cache after each step; for a quantized cache, keeps the full-precision states on the side."""

    def __init__(self, cache, max_positions: int, decode=None):
        self.cache = cache
        self.max_positions = max_positions
        self.decode = decode
        self.quantized = is_quantized(cache)
        self._prev_held: list[int] = []
        self._shadow: dict[int, dict[str, list[torch.Tensor]]] = {}
        if self.quantized:
            for i, layer in enumerate(cache.layers):
                self._wrap(i, layer)

    def _wrap(self, i: int, layer) -> None:
        shadow = self._shadow.setdefault(i, {"keys": [], "values": []})
        update = layer.update

        def recording_update(key_states, value_states, *args, **kwargs):
            shadow["keys"].append(key_states.detach().clone())
            shadow["values"].append(value_states.detach().clone())
            return update(key_states, value_states, *args, **kwargs)

        layer.update = recording_update  # instance attribute: this cache object only

    def measure(self, step: int, new_tokens: int, token_id: int | None = None) -> KvCacheStep:
        layers = list(getattr(self.cache, "layers", ()))
        held = [_held(layer) for layer in layers]
        prev = self._prev_held or [0] * len(layers)
        evictions = sum(max(0, p + new_tokens - h) for p, h in zip(prev, held))
        hit = (sum(p / (p + new_tokens) for p in prev) / len(prev)) if prev and new_tokens else 0.0
        oldest = max((_seen(layer) - h for layer, h in zip(layers, held)), default=0)
        rec = KvCacheStep(step=step, new_tokens=new_tokens, valid_positions=max(held, default=0),
                          max_positions=self.max_positions, cache_size_bytes=sum(layer_bytes(x) for x in layers),
                          evictions_this_step=evictions, cache_hit_rate=hit, oldest_position=oldest,
                          token_id=token_id, token_str=self.decode(token_id) if self.decode and token_id is not None
                          else None)
        self._prev_held = held
        if self.quantized:
            self._storage_error(rec, layers)
        return rec

    def _storage_error(self, rec: KvCacheStep, layers) -> None:
        sums = {"keys": [0.0, 0.0, 0.0, 0.0], "values": [0.0, 0.0, 0.0, 0.0]}  # ||a||², ||b||², ||a-b||², <a,b>
        worst, worst_rel = None, -1.0
        for i, layer in enumerate(layers):
            shadow = self._shadow.get(i)
            if not shadow or not shadow["keys"]:
                continue
            layer_err = 0.0
            layer_norm = 0.0
            for which in ("keys", "values"):
                full = torch.cat(shadow[which], dim=-2).double()
                stored = _dequantized(layer, which)
                if stored is None:
                    continue
                stored = stored.double()
                if stored.shape != full.shape:  # a backend that trims what it stores: compare the held tail
                    full = full[..., -stored.shape[-2]:, :]
                d = stored - full
                s = sums[which]
                s[0] += float(full.pow(2).sum())
                s[1] += float(stored.pow(2).sum())
                s[2] += float(d.pow(2).sum())
                s[3] += float((full * stored).sum())
                layer_err += float(d.pow(2).sum())
                layer_norm += float(full.pow(2).sum())
            rel = math.sqrt(layer_err / layer_norm) if layer_norm > 0 else 0.0
            if rel > worst_rel:
                worst, worst_rel = i, rel
        for which, (aa, bb, dd, ab) in sums.items():
            rel = math.sqrt(dd / aa) if aa > 0 else None
            cos = (1.0 if dd == 0 else ab / math.sqrt(aa * bb)) if aa > 0 and bb > 0 else None
            prefix = "key" if which == "keys" else "value"
            setattr(rec, f"{prefix}_rel_error", rel)
            setattr(rec, f"{prefix}_cosine", cos)
        rec.worst_layer = worst
        rec.worst_layer_rel_error = worst_rel if worst is not None else None


def max_positions_of(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(config, name, None)
        if isinstance(v, int):
            return v
    return 0


def next_token_kl(full_logits: torch.Tensor, quant_logits: torch.Tensor) -> tuple[float, bool]:
    """KL(p_full || p_quantized) of the next-token distributions (nats) and whether their top-1 agree."""
    kl = float(kl_divergence(full_logits, quant_logits, dtype=torch.float64).clamp_min(0).mean())
    return kl, bool((full_logits.argmax(-1) == quant_logits.argmax(-1)).all())
