"""Commands of the ``trace`` CLI that sit above the library: they may import :mod:`trace_lib.report` (for
``--html``), which the layers they drive (:mod:`trace_lib.redteam`, :mod:`trace_lib.tracer`) never import."""
