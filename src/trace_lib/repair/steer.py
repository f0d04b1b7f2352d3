"""Steering vectors: add a fixed direction to the residual stream at one hook point, on every token.

    x'_t = x_t + s * v        for every token t at ``blocks.{L}.hook_resid_post`` (or ``resid_pre``)

``v`` is a difference in means of the residual over two prompt sets (Turner et al. 2023, "Activation
Addition", arXiv:2308.10248; Arditi et al. 2024, arXiv:2406.11717, who add the refusal direction to induce
refusal)::

    v = mean_i a_pos,i - mean_j a_neg,j        a = the residual at the hook, reduced per prompt over ``position``

not normalised, so ``s = 1`` moves a negative prompt's mean onto the positive prompts' mean at that point.

Repair use: a damaged variant (a quantized model that refuses less) gets the *reference's* refusal direction
added back, ``SteeringVector.from_prompts(reference, harmful, harmless, layer).as_variant(variant, s)``, at the
block(s) the localisation names (:func:`steer_variant` takes several vectors), with ``s`` chosen on the train
split by :func:`trace_lib.repair.strength.choose_strength`.

``apply`` is a context manager (the hook is removed on exit, also when the body raises); ``as_variant`` builds
a new :class:`~trace_lib.models.load.Loaded` with a deep-copied model carrying a permanent hook (kind
``steering`` in :mod:`trace_lib.capture.registry`) and its own ``content_hash``, so caches keyed by the model
(generations) never mix steered and unsteered replies.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trace_lib.cache import stable_hash
from trace_lib.capture.prompts import capture_prompts
from trace_lib.capture.splice import register_replacement
from trace_lib.errors import HookError, InvalidValueError
from trace_lib.intervene.ablate import directions_digest
from trace_lib.metrics.directions import diff_in_means
from trace_lib.models.arch import adapt
from trace_lib.models.load import Loaded
from trace_lib.validate import check_choice

__all__ = ["POSITIONS", "SteeringVector", "steer_variant"]

#: Per-prompt reductions of the residual (see :meth:`trace_lib.capture.prompts.PromptActs.select`): the last
#: prompt token, or the mean over the post-instruction template tokens.
POSITIONS = ("last", "post_instruction")


def steering_hook_name(loaded: Loaded, layer: int | str) -> str:
    """``blocks.{layer}.hook_resid_post`` for an int (negative counts from the end), or a full ``resid_pre`` /
    ``resid_post`` hook name. Other points are refused: a pre-hook on ``resid_mid``'s norm does not reach the
    residual the block adds to, and ``attn_out`` / ``mlp_out`` are what a sub-layer writes, not the stream."""
    if isinstance(layer, bool) or not isinstance(layer, int | str):
        raise HookError(f"the steering layer must be a block index or a hook name, not {layer!r}")
    name = loaded.arch.resolve("resid_post", layer) if isinstance(layer, int) else loaded.arch.resolve(layer)
    if not name.endswith(("hook_resid_pre", "hook_resid_post")):
        raise HookError(f"steering adds to the residual stream: use blocks.L.hook_resid_pre or "
                        f"blocks.L.hook_resid_post, not {name}")
    return name


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """A direction ``[d_model]`` (float32, not normalised) added at ``hook_name`` times a strength.

    ``meta`` records how it was made (model, prompt counts, position, norm) for result files."""

    direction: torch.Tensor
    hook_name: str
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        d = torch.as_tensor(self.direction).detach().to("cpu", torch.float32)
        if d.dim() == 2 and d.shape[0] == 1:
            d = d[0]
        if d.dim() != 1:
            raise HookError(f"a steering direction is one vector [d_model], got shape {tuple(d.shape)}")
        if not torch.isfinite(d).all():
            raise InvalidValueError("the steering direction contains NaN/Inf values")
        object.__setattr__(self, "direction", d.contiguous())

    @property
    def layer(self) -> int:
        return int(self.hook_name.split(".")[1])

    @property
    def digest(self) -> str:
        """sha256 of the direction's values (:func:`trace_lib.intervene.ablate.directions_digest`)."""
        return directions_digest(self.direction)

    @classmethod
    def from_prompts(cls, loaded: Loaded, positive: Sequence[str], negative: Sequence[str], layer: int | str,
                     position: str = "last", batch_size: int = 16, max_length: int = 256) -> SteeringVector:
        """Difference in means of the residual at ``layer`` (see :func:`steering_hook_name`) over
        chat-formatted ``positive`` minus ``negative`` prompts, each prompt reduced over ``position``
        (``"last"`` token or mean over the ``"post_instruction"`` tokens), in float64."""
        check_choice("position", position, POSITIONS)
        hook = steering_hook_name(loaded, layer)
        pos, neg = list(positive), list(negative)
        acts = capture_prompts(loaded, pos + neg, [hook], batch_size=batch_size, max_length=max_length,
                               description="steering vector")
        per_prompt = acts.per_prompt(acts.acts[hook].to(torch.float64), position, "mean")
        direction = diff_in_means(per_prompt[: len(pos)], per_prompt[len(pos):])
        return cls(direction.float(), hook, {
            "method": "difference in means (positive - negative)", "model": loaded.name,
            "content_hash": loaded.content_hash, "position": position, "n_positive": len(pos),
            "n_negative": len(neg), "norm": float(direction.norm())})

    def _check(self, loaded: Loaded) -> str:
        if self.direction.shape[0] != loaded.d_model:
            raise HookError(f"the steering direction has width {self.direction.shape[0]} but {loaded.name} has "
                            f"d_model {loaded.d_model}")
        return steering_hook_name(loaded, self.hook_name)

    @contextmanager
    def apply(self, loaded: Loaded, strength: float) -> Iterator[Loaded]:
        """Inside the block, ``loaded``'s residual at ``hook_name`` gets ``strength * direction`` on every token;
        the hook comes off on exit, also when the body raises."""
        handle = register_replacement(loaded.arch.site(self._check(loaded)), _adder(self.direction, strength),
                                      kind="steering", owner="SteeringVector.apply")
        try:
            yield loaded
        finally:
            handle.remove()

    def as_variant(self, loaded: Loaded, strength: float, name: str | None = None) -> Loaded:
        """A copy of ``loaded`` steered for good (see :func:`steer_variant`)."""
        return steer_variant(loaded, [self], strength, name=name)

    def save(self, path: str | Path, strength: float | None = None) -> Path:
        """Write the vector as safetensors (tensor ``direction``; metadata: hook, strength when given, and
        ``meta`` as JSON), atomically."""
        from safetensors.torch import save_file

        from trace_lib.cache import atomic_write

        path = Path(path)
        meta = {"hook_name": self.hook_name, "meta": json.dumps(self.meta, sort_keys=True)}
        if strength is not None:
            meta["strength"] = repr(_strength(strength))
        atomic_write(path, lambda p: save_file({"direction": self.direction.contiguous()}, str(p), metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> tuple[SteeringVector, float | None]:
        """Read a vector written by :meth:`save`: ``(vector, strength or None)``."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta, direction = f.metadata() or {}, f.get_tensor("direction")
        except Exception as e:  # noqa: BLE001 - a missing or foreign file is the user's, said in one line
            raise InvalidValueError(f"{path} is not a steering vector written by trace ({type(e).__name__}: {e})") from None
        if "hook_name" not in meta:
            raise InvalidValueError(f"{path} has no hook_name: not a steering vector written by trace")
        strength = float(meta["strength"]) if "strength" in meta else None
        return cls(direction, meta["hook_name"], json.loads(meta.get("meta", "{}"))), strength


def _adder(direction: torch.Tensor, strength: float):
    strength = _strength(strength)
    shift = strength * direction  # float32, computed once

    def add(x: torch.Tensor) -> torch.Tensor:
        return x + shift.to(device=x.device, dtype=x.dtype)

    return add


def _strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not torch.isfinite(
            torch.tensor(float(strength))):
        raise InvalidValueError(f"the steering strength must be a finite number, not {strength!r}")
    return float(strength)


def steer_variant(loaded: Loaded, vectors: Sequence[SteeringVector], strength: float,
                  name: str | None = None) -> Loaded:
    """A copy of ``loaded`` (model deep-copied; ``loaded`` untouched) with every vector added at its hook times
    ``strength`` on every token, as permanent hooks (``remove_hooks(v, kind="steering")`` takes them off).

    ``content_hash`` = hash of ``loaded``'s hash, each hook, ``strength`` and each direction's digest; the name
    reads ``<name>+steer(L15,4)``."""
    if not vectors:
        raise InvalidValueError("steer_variant needs at least one steering vector")
    strength = _strength(strength)
    hooks = [v._check(loaded) for v in vectors]
    model = copy.deepcopy(loaded.model)
    arch = adapt(model)
    for v, hook in zip(vectors, hooks):
        register_replacement(arch.site(hook), _adder(v.direction, strength), kind="steering",
                             owner="steer_variant", permanent=True)
    where = ",".join(f"L{h.split('.')[1]}{'' if h.endswith('resid_post') else 'pre'}" for h in hooks)
    label = name or f"{loaded.name}+steer({where},{strength:g})"
    steering = {"hooks": hooks, "strength": strength, "directions": [v.digest for v in vectors],
                "made_by": [v.meta for v in vectors]}
    return Loaded(model=model, tokenizer=loaded.tokenizer, arch=arch,
                  content_hash=stable_hash({"ref": loaded.content_hash, "steer": hooks, "strength": strength,
                                            "dirs": steering["directions"]}),
                  name=label, spec=f"{loaded.spec}+steer({where},{strength:g})", source=loaded.source,
                  quant=loaded.quant, quant_info={**loaded.quant_info, "steering": steering})
