"""trace: mechanistic interpretability under precision constraints.

Import as ``import trace_lib as trace`` (``trace`` is a standard-library module).
"""

from __future__ import annotations

__version__ = "0.1.0"

from trace_lib.errors import TraceError

__all__ = ["TraceError", "__version__"]
