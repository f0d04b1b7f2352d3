"""Registers ``default-safety`` with the model loader (entry point ``trace_lib.model_specs``).

Only this light module is imported when ``load_model("default-safety")`` first looks the name up; the
organism's loading code is imported when the model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trace_lib.models.specs import register_spec

DEFAULT_SAFETY_SPEC = "default-safety"
# The SAEs trained once for default-safety (``trace sae build --model default-safety``), shipped in the package.
DEFAULT_SAFETY_SAES = Path(__file__).resolve().parent / "default_safety" / "saes"


def _load(dtype: Any) -> Any:
    from trace_lib.organisms.load import load_default_safety

    return load_default_safety(dtype=dtype)


def _hash() -> str:
    from trace_lib.organisms.load import default_safety_hash

    return default_safety_hash()


register_spec(DEFAULT_SAFETY_SPEC, _load, _hash,
              "SmolLM2-135M-Instruct with trace's packaged safety LoRA merged in (a model organism)",
              sae_pack=DEFAULT_SAFETY_SAES)
