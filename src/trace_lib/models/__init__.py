"""Loading models and mapping their hook points; where they run (:mod:`trace_lib.models.device`)."""

from trace_lib.models.arch import ArchAdapter, adapt, supported_architectures
from trace_lib.models.device import resolve_device, resolve_dtype, to_device
from trace_lib.models.load import Loaded, from_model, load_model

__all__ = ["ArchAdapter", "Loaded", "adapt", "from_model", "load_model", "resolve_device", "resolve_dtype",
           "supported_architectures", "to_device"]
