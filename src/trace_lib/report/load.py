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
from trace_lib.results import RESULT_MODULES, lookup_result, registered_results


def _kinds() -> dict[str, tuple[int, str]]:
    """kind -> (version this trace reads, the command that writes it), from the result registry."""
    kinds = {kind: (rt.version, rt.command) for kind, rt in registered_results().items()}
    if "trace.tracer" not in kinds:  # no tracer result class registered yet: the tracer module's version
        from trace_lib.tracer.tracer import RESULT_VERSION as TRACER_VERSION

        kinds["trace.tracer"] = (TRACER_VERSION, "trace tracer")
    return {kind: kinds[kind] for kind in RESULT_MODULES if kind in kinds}


KINDS: dict[str, tuple[int, str]] = _kinds()


class RedteamData(dict):
    """A ``trace.redteam`` result kept as its dict, for when no class is registered for ``trace.redteam``.

    The report reads it with ``.get`` throughout, so a missing field shows as "n/a" and never breaks the page.
    """

    kind = "trace.redteam"


class TracerData(dict):
    """A ``trace.tracer`` result (``ModelTracer.to_dict()``) kept as its dict, byte for byte what the file holds.

    The report reads it with ``.get`` throughout; only the list of forward passes is required.
    """

    kind = "trace.tracer"

    def __init__(self, d: Mapping) -> None:
        super().__init__(d)
        if "forwards" not in self:
            raise KeyError("forwards")
        if not isinstance(self["forwards"], list) or not all(isinstance(f, Mapping) for f in self["forwards"]):
            raise TypeError("'forwards' is not a list of forward passes")


def _registered_or(kind: str, fallback: Callable[[dict], Any]) -> Callable[[dict], Any]:
    rt = lookup_result(kind)
    return rt.from_dict if rt is not None else fallback


def _tracer_loader() -> Callable[[dict], Any]:
    """:class:`TracerData`: the page reads the dict itself (``TracerResult.from_dict`` only for its summary)."""
    return TracerData


def _redteam_loader() -> Callable[[dict], Any]:
    """The registered red-team result's ``from_dict``, else :class:`RedteamData`."""
    return _registered_or("trace.redteam", RedteamData)


def _from_dict(kind: str) -> Callable[[dict], Any]:
    if kind == "trace.tracer":
        return _tracer_loader()
    if kind == "trace.redteam":
        return _redteam_loader()
    rt = lookup_result(kind)
    if rt is None:
        raise ResultFormatError(f"no result class is registered for {kind!r}")
    return rt.from_dict


def result_kind(result: Any) -> str:
    """``trace.audit`` / ``trace.sweep`` / ``trace.compare`` / ``trace.redteam`` / ``trace.tracer`` of a loaded
    result: a registered result object, a result dict, or a ``ModelTracer``."""
    if isinstance(result, Mapping) and result.get("kind") in KINDS:
        return str(result["kind"])
    kind = getattr(type(result), "RESULT_KIND", None) or getattr(result, "kind", None)
    if isinstance(kind, str) and kind in KINDS:
        return str(kind)
    if type(result).__module__.startswith("trace_lib.tracer"):  # a ModelTracer: its to_dict() is the result
        return "trace.tracer"
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
