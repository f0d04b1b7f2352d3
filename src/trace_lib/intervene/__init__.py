"""Interventions that build a changed copy of a model: directional ablation (more to come: steering, repair)."""

from trace_lib.intervene.ablate import ablate_directions

__all__ = ["ablate_directions"]
