"""Loading models and mapping their hook points."""

from trace_lib.models.arch import ArchAdapter, adapt, supported_architectures
from trace_lib.models.load import Loaded, from_model, load_model

__all__ = ["ArchAdapter", "Loaded", "adapt", "from_model", "load_model", "supported_architectures"]
