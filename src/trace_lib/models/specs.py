"""Named model specs: a registry, so the loader never imports what builds a model on top of it.

A name (``"default"``, ``"default-safety"``) maps to a :class:`ModelSpec`: how to load it and how to compute
the content hash the load will give, without loading the weights where that is possible (caches key on it).
``trace_lib.models`` registers the models shipped in packages; packages above it register their own through
the entry-point group ``trace_lib.model_specs`` (trace's model organisms do: ``default-safety``), whose modules
are imported the first time a name is not found. Any other spec is a path: a Hugging Face folder or a GGUF
file, hashed by one rule (:func:`spec_content_hash`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "trace_lib.model_specs"


@dataclass(frozen=True)
class ModelSpec:
    """``load(dtype) -> Loaded`` and ``content_hash() -> str`` (equal to the loaded model's ``content_hash``).

    ``sae_pack``: a folder of SAEs trained once for this model and shipped with it (``trace sae build``), read
    by :func:`trace_lib.sae.shipped.shipped_pack` instead of training on first use."""

    name: str
    load: Callable[[Any], Any]
    content_hash: Callable[[], str]
    description: str = ""
    aliases: tuple[str, ...] = field(default=())
    sae_pack: Path | None = None


_SPECS: dict[str, ModelSpec] = {}
_discovered = False


def register_spec(name: str, load_fn: Callable[[Any], Any], hash_fn: Callable[[], str], description: str = "",
                  aliases: tuple[str, ...] = (), sae_pack: Path | None = None) -> ModelSpec:
    """Make ``load_model(name)`` (and each alias) call ``load_fn(dtype)``; ``hash_fn()`` gives its content hash."""
    spec = ModelSpec(name, load_fn, hash_fn, description, tuple(aliases), sae_pack)
    for key in (name, *aliases):
        _SPECS[key] = spec
    return spec


def _discover() -> None:
    """Import the modules named in the ``trace_lib.model_specs`` entry points once (they register specs)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(ep.value.split(":")[0])


def get_spec(name: str) -> ModelSpec | None:
    """The registered spec called ``name`` (or with that alias), else ``None`` (then it is a path)."""
    if name not in _SPECS:
        _discover()
    return _SPECS.get(name)


def spec_names() -> list[str]:
    """Registered names (without aliases), for messages and ``--help``."""
    _discover()
    return sorted({s.name for s in _SPECS.values()})
