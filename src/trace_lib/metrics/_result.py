"""The base of metric result dataclasses (dict-style access, JSON) and the number formats of their summaries."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import fields
from typing import Any

from trace_lib.jsonutil import json_clean


def _label(fid: int, names: Mapping[int, str]) -> str:
    name = names.get(fid)
    return f"Feature #{fid} ({name})" if name else f"Feature #{fid}"


def _pct(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.0f}%" if abs(x) >= 10 else f"{x:.1f}%"


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"



class _ResultBase:
    """Dict-style access, ``to_dict()`` and ``to_json()`` for result dataclasses.

    ``result["num_smeared_pairs"]`` and ``result.num_smeared_pairs`` are the same thing. Keys are the
    dataclass fields plus the derived properties named in ``_extra_keys``.
    """

    _extra_keys: tuple[str, ...] = ()

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)] + list(self._extra_keys)  # type: ignore[arg-type]

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: tensors become lists, NaN/Inf become ``None``."""
        return {k: json_clean(getattr(self, k)) for k in self.keys()}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)
