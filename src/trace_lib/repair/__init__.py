"""Repairs of a damaged variant: per-module precision search, steering vectors, weight edits.

:mod:`.search` (:func:`repair`: which quantized Linears to keep at a higher precision, ranked by weight-error
attribution against four baselines, confirmed on the test split; :mod:`.precision`, :mod:`.accept`,
:mod:`.result`),
:mod:`.steer` (:class:`SteeringVector`: difference-in-means directions added to the residual stream, as a
context manager or a variant), :mod:`.strength` (the steering strength chosen on the train split by the
refusal / over-refusal trade-off), :mod:`.edit` (Arditi et al.'s weight orthogonalisation and its inverse).
"""

from trace_lib.repair.accept import Acceptance, accept
from trace_lib.repair.edit import (
    EditError,
    EditUnsupportedError,
    Writer,
    remove_direction,
    residual_writers,
    restore_direction,
)
from trace_lib.repair.result import RepairResult
from trace_lib.repair.search import repair
from trace_lib.repair.steer import SteeringVector, steer_variant
from trace_lib.repair.strength import (
    CandidateCheck,
    Outcomes,
    StrengthChoice,
    choose_strength,
    measure_outcomes,
    select_strength,
)

__all__ = [
    "Acceptance",
    "RepairResult",
    "accept",
    "repair",
    "CandidateCheck",
    "EditError",
    "EditUnsupportedError",
    "Outcomes",
    "SteeringVector",
    "StrengthChoice",
    "Writer",
    "choose_strength",
    "measure_outcomes",
    "remove_direction",
    "residual_writers",
    "restore_direction",
    "select_strength",
    "steer_variant",
]
