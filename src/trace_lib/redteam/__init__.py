"""Behaviour and quantization jailbreaks: greedy replies of a reference and its variants, classified as
refusal / compliance / incoherent, compared pairwise with exact statistics, linked to safety features.

>>> from trace_lib.redteam import RedTeam
>>> result = RedTeam("default", ["int4-rtn-g32"]).run("harmful_refusal_v1")
>>> print(result.summary())

See ``docs/redteam.md``.
"""

from __future__ import annotations

from trace_lib.redteam.classify import (
    LABELS,
    REFUSAL_PHRASES,
    Agreement,
    ReplyLabel,
    classify_replies,
    classify_reply,
    measure_agreement,
)
from trace_lib.redteam.generate import GenerationRun, generate, generate_replies
from trace_lib.redteam.redteam import (
    ModelBehaviour,
    RedTeam,
    RedTeamResult,
    VariantFlips,
    mechanism_link,
    paired_flips,
)

__all__ = [
    "LABELS",
    "REFUSAL_PHRASES",
    "Agreement",
    "GenerationRun",
    "ModelBehaviour",
    "RedTeam",
    "RedTeamResult",
    "ReplyLabel",
    "VariantFlips",
    "classify_replies",
    "classify_reply",
    "generate",
    "generate_replies",
    "measure_agreement",
    "mechanism_link",
    "paired_flips",
]
