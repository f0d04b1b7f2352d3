"""One family of errors for everything a user can get wrong.

Every error trace raises on bad input is a :class:`TraceError`. Its message is one line that says what
was wrong and what to do; the CLI prints it without a traceback and exits with status 2.
"""

from __future__ import annotations


class TraceError(Exception):
    """Base class: a problem with the user's input or environment, reported in one line."""


class ModelNotFoundError(TraceError):
    """A model spec that names no file, folder or known model."""


class ModelFormatError(TraceError):
    """A file or folder that is not a loadable model (no config, truncated or non-GGUF file)."""


class UnsupportedArchitectureError(TraceError):
    """A model whose architecture trace has no hook-point adapter for."""


class HookError(TraceError):
    """An unknown hook name, a layer out of range, or activations that cannot be used (NaN/Inf)."""


class DeviceError(TraceError):
    """A device or dtype that is unknown or not usable on this machine (no GPU, float16 on the CPU)."""


class QuantizationError(TraceError):
    """A quantization config that is invalid or cannot run on this machine."""


class DatasetError(TraceError):
    """An unknown, empty or malformed dataset."""


class SAEError(TraceError):
    """An SAE that cannot be loaded or does not fit the model it is applied to."""


class ResultFormatError(TraceError):
    """A result file of another kind or from an incompatible version."""


class InvalidValueError(TraceError):
    """A number or choice outside its valid range (the message says the range)."""


class OutputPathError(TraceError):
    """An output path that cannot be written, or that would overwrite an input."""


class AttributionError(TraceError):
    """A localisation that cannot run: models that do not match, or a component that does not exist."""


class TranscoderError(TraceError):
    """A transcoder set that cannot be read, or that does not fit the model it is applied to (width, layers)."""


class GraphError(AttributionError):
    """An attribution graph that cannot be built or read: a prompt over the length limit, an empty target set,
    a graph JSON that breaks the schema."""


class NoGapError(AttributionError):
    """Nothing to attribute: the reference refuses none of the prompts, or the variant's gap is not
    distinguishable from zero (its bootstrap interval includes 0)."""
