"""Model organisms: the base model made safety-tuned by a LoRA, so an audit has a real refusal mechanism to lose.

>>> from trace_lib.models import load_model
>>> organism = load_model("default-safety")      # SmolLM2-135M-Instruct + the packaged safety LoRA, merged

Build one with ``trace organism build`` (:func:`build_organism`); see ``docs/organism.md``.
"""

from __future__ import annotations

from trace_lib.organisms.data import MixConfig, TrainingMix, build_mix
from trace_lib.organisms.evaluate import EvalConfig, evaluate_organism
from trace_lib.organisms.load import (
    DEFAULT_SAFETY_DIR,
    DEFAULT_SAFETY_NAME,
    apply_adapter,
    check_adapter,
    load_default_safety,
    load_organism,
)
from trace_lib.organisms.refusals import check_all_refusals, refusal_for
from trace_lib.organisms.train import TrainConfig, build_organism, read_build

__all__ = [
    "DEFAULT_SAFETY_DIR",
    "DEFAULT_SAFETY_NAME",
    "EvalConfig",
    "MixConfig",
    "TrainConfig",
    "TrainingMix",
    "apply_adapter",
    "build_mix",
    "build_organism",
    "check_adapter",
    "check_all_refusals",
    "evaluate_organism",
    "load_default_safety",
    "load_organism",
    "read_build",
    "refusal_for",
]
