"""JSON for everything trace writes: one cleaner, one ``json.dumps`` hook, one float helper.

JSON has no NaN or infinity and knows nothing of tensors, numpy values, paths or dataclasses. Results turn
their fields into plain data with :func:`json_clean` (NaN/inf -> ``None``, recursively); files and cache keys
are written with :func:`to_jsonable` as ``json.dumps``'s ``default`` hook (it converts what JSON does not
know and leaves NaN alone); :func:`json_float` is the scalar case of the cleaner that always gives a float.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

__all__ = ["dumps", "json_clean", "json_float", "to_jsonable"]


def to_jsonable(o: Any) -> Any:
    """What JSON can hold for an object it does not know (``json.dumps(..., default=to_jsonable)``).

    ``to_dict()`` of objects that have one; paths as strings; dataclasses as dicts; tensors, numpy arrays
    and numpy scalars as (nested lists of) Python numbers. Anything else raises ``TypeError``, as
    ``json.dumps`` expects.
    """
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, PurePath):
        return str(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist"):  # torch tensors, numpy arrays and numpy scalars
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def json_float(x: Any) -> float | None:
    """A float for JSON: ``None`` for ``None``, NaN and infinities, else ``float(x)``."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def json_clean(x: Any) -> Any:
    """Plain JSON data, recursively: NaN and infinities become ``None``, dict keys strings, tuples lists, and
    everything :func:`to_jsonable` knows its JSON form; any other object becomes its ``str``."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return json_float(x)
    if isinstance(x, Mapping):
        return {k if isinstance(k, str) else str(k): json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_clean(v) for v in x]
    try:
        plain = to_jsonable(x)
    except TypeError:
        return str(x)
    return json_clean(plain)


def dumps(obj: Any) -> str:
    """The text trace writes for a JSON file: indented, with :func:`to_jsonable` for what JSON does not know."""
    return json.dumps(obj, indent=2, default=to_jsonable)
