"""Read any trace result file (audit, sweep, compare, redteam, tracer) into its result object.

>>> result = load_result("trace-out/audit.json")     # AuditResult, SweepResult, CompareResult or a red-team result
>>> tracer = load_result("trace-out/tracer.json")   # a TracerData (the ModelTracer.to_dict() dict)

Every problem (no such file, not JSON, not a trace result, a result of another version, a malformed one)
is a :class:`~trace_lib.errors.ResultFormatError` whose one-line message says what to do.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from trace_lib.errors import ResultFormatError, TraceError

# kind -> (version this trace reads, the command that writes it)
KINDS: dict[str, tuple[int, str]] = {
    "trace.audit": (1, "trace audit"),
    "trace.sweep": (1, "trace sweep"),
    "trace.compare": (1, "trace compare"),
    "trace.redteam": (1, "trace redteam"),
    "trace.tracer": (1, "trace tracer"),  # trace_lib.tracer.tracer.RESULT_KIND / RESULT_VERSION
    "trace.localize": (1, "trace localize"),
}


class RedteamData(dict):
    """A ``trace.redteam`` result kept as its dict, for when ``trace_lib.redteam`` offers no ``from_dict``.

    The report reads it with ``.get`` throughout, so a missing field shows as "n/a" and never breaks the page.
    """

    kind = "trace.redteam"


class TracerData(dict):
    """A ``trace.tracer`` result (``ModelTracer.to_dict()``) kept as its dict: the tracer has no ``from_dict``.

    The report reads it with ``.get`` throughout; only the list of forward passes is required.
    """

    kind = "trace.tracer"

    def __init__(self, d: Mapping) -> None:
        super().__init__(d)
        if "forwards" not in self:
            raise KeyError("forwards")
        if not isinstance(self["forwards"], list) or not all(isinstance(f, Mapping) for f in self["forwards"]):
            raise TypeError("'forwards' is not a list of forward passes")


def _tracer_loader() -> Callable[[dict], Any]:
    """A tracer ``from_dict`` when ``trace_lib.tracer`` provides one, else :class:`TracerData`."""
    try:
        import trace_lib.tracer as tr
    except ImportError:
        return TracerData
    for name in ("TracerResult", "ModelTracer"):
        cls = getattr(tr, name, None)
        if cls is not None and hasattr(cls, "from_dict"):
            return cls.from_dict
    return TracerData


def _redteam_loader() -> Callable[[dict], Any]:
    """``trace_lib.redteam``'s result ``from_dict`` when that package provides one, else :class:`RedteamData`."""
    try:
        import trace_lib.redteam as rt
    except ImportError:
        return RedteamData
    for name in ("RedteamResult", "RedTeamResult", "RedteamReport", "RedTeamReport"):
        cls = getattr(rt, name, None)
        if cls is not None and hasattr(cls, "from_dict"):
            return cls.from_dict
    return RedteamData


def _from_dict(kind: str) -> Callable[[dict], Any]:
    if kind == "trace.audit":
        from trace_lib.audit import AuditResult

        return AuditResult.from_dict
    if kind == "trace.sweep":
        from trace_lib.sweep import SweepResult

        return SweepResult.from_dict
    if kind == "trace.compare":
        from trace_lib.compare import CompareResult

        return CompareResult.from_dict
    if kind == "trace.tracer":
        return _tracer_loader()
    if kind == "trace.localize":
        from trace_lib.attribution.localize import LocalizeResult

        return LocalizeResult.from_dict
    return _redteam_loader()


def result_kind(result: Any) -> str:
    """``trace.audit`` / ``trace.sweep`` / ``trace.compare`` / ``trace.redteam`` / ``trace.tracer`` of a loaded
    result."""
    from trace_lib.audit import AuditResult
    from trace_lib.compare import CompareResult
    from trace_lib.sweep import SweepResult

    if isinstance(result, AuditResult):
        return "trace.audit"
    if isinstance(result, SweepResult):
        return "trace.sweep"
    if isinstance(result, CompareResult):
        return "trace.compare"
    if type(result).__name__ == "LocalizeResult":
        return "trace.localize"
    if isinstance(result, Mapping) and result.get("kind") in KINDS:
        return str(result["kind"])
    kind = getattr(result, "kind", None) or getattr(type(result), "RESULT_KIND", None)
    if kind == "trace.tracer" or type(result).__module__.startswith("trace_lib.tracer"):
        return "trace.tracer"
    if kind == "trace.redteam" or type(result).__module__.startswith("trace_lib.redteam"):
        return "trace.redteam"
    raise ResultFormatError(f"cannot make a report of a {type(result).__name__}; pass a trace result file "
                            "(audit, sweep, compare, redteam or tracer JSON) or its result object")


def load_result(source: str | Path | Mapping) -> Any:
    """The result object of a result file (or of its already-parsed dict), chosen by its ``kind``."""
    where = "the result" if isinstance(source, Mapping) else str(source)
    if isinstance(source, Mapping):
        d = dict(source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ResultFormatError(f"no result file at {path}; pass the JSON file that trace audit, sweep, compare, "
                                    "redteam or tracer wrote (--out folder, e.g. trace-out/audit.json)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ResultFormatError(f"{path} is not a readable JSON result file ({msg}); pass the JSON file that "
                                    "trace audit, sweep, compare, redteam or tracer wrote") from e
    if not isinstance(d, dict) or "kind" not in d:
        raise ResultFormatError(f"{where} is not a trace result (it has no 'kind'); pass the JSON file that trace "
                                "audit, sweep, compare, redteam or tracer wrote")
    kind, version = d.get("kind"), d.get("version")
    if kind not in KINDS:
        raise ResultFormatError(f"{where} is a {kind!r} result, which trace report cannot show; it reads "
                                f"{', '.join(KINDS)} results")
    want, command = KINDS[kind]
    if version != want:
        wrote = f" (written by trace {d['trace_version']})" if d.get("trace_version") else ""
        raise ResultFormatError(f"{where} is a {kind} result of version {version}{wrote}, but this trace reads "
                                f"version {want}; re-run `{command}` with this version of trace")
    try:
        return _from_dict(kind)(d)
    except (TraceError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else (str(e).splitlines()[0] if str(e) else
                                                                       type(e).__name__)
        raise ResultFormatError(f"{where} is not a well-formed {kind} v{want} result ({what}); re-run "
                                f"`{command}` to write it again") from e
