"""Result files: the registry of the kinds trace writes, and their shared ``to_json`` / ``save`` / ``load``.

Every result class states its kind and version once, where it is defined::

    @register_result(RESULT_KIND, RESULT_VERSION, rerun="the audit")   # RESULT_KIND = "trace.audit"
    @dataclass
    class AuditResult(ResultFile):
        def to_dict(self) -> dict:
            return {**self.result_header(), "reference": ...}   # kind, version, trace_version first

        @classmethod
        def from_dict(cls, d: dict) -> AuditResult:
            cls.check_format(d)   # the kind and version, or ResultFormatError
            ...

:class:`ResultFile` gives it ``to_json()`` (the text ``save`` writes), ``save(path)`` (atomic) and
``load(path)``. :func:`lookup_result` finds a kind's class by the ``kind`` field of a JSON file, importing
the module that defines it (:data:`RESULT_MODULES`) the first time; :mod:`trace_lib.report.load` reads
results through it.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from trace_lib.cache import atomic_write_json
from trace_lib.errors import ResultFormatError
from trace_lib.jsonutil import dumps

__all__ = ["RESULT_MODULES", "ResultFile", "ResultType", "lookup_result", "register_result", "registered_results"]

# Where each kind's result class is defined: looking a kind up imports its module, whose decorator registers it.
# The order is the one messages list the kinds in.
RESULT_MODULES: dict[str, str] = {
    "trace.audit": "trace_lib.audit",
    "trace.sweep": "trace_lib.sweep",
    "trace.compare": "trace_lib.compare",
    "trace.redteam": "trace_lib.redteam.redteam",
    "trace.localize": "trace_lib.attribution.localize",
    "trace.repair": "trace_lib.repair.result",
    "trace.graph": "trace_lib.attribution.graph_result",
    # The tracer's result class registers here once it exists (``@register_result("trace.tracer", 1)`` on
    # ``TracerResult`` in trace_lib/tracer/result.py); until then trace.report.load keeps the tracer's dict.
    "trace.tracer": "trace_lib.tracer.result",
}


@dataclass(frozen=True)
class ResultType:
    """A registered result kind: ``trace.audit`` version 1 is an ``AuditResult``, written by ``trace audit``."""

    kind: str
    version: int
    cls: type
    rerun: str  # what to re-run for a file of another version ("the audit")

    @property
    def noun(self) -> str:
        """``audit`` for ``trace.audit``: as messages name the kind."""
        return self.kind.rsplit(".", 1)[-1]

    @property
    def command(self) -> str:
        """The command that writes this kind: ``trace audit``."""
        return f"trace {self.noun}"

    @property
    def from_dict(self) -> Callable[[dict], Any]:
        return self.cls.from_dict

    def a_noun(self) -> str:
        return f"{'an' if self.noun[0] in 'aeiou' else 'a'} {self.noun}"

    def check(self, d: Any) -> None:
        """Raise :class:`ResultFormatError` unless ``d`` is a dict of this kind and version."""
        if not isinstance(d, Mapping) or d.get("kind") != self.kind:
            found = d.get("kind", "unknown") if isinstance(d, Mapping) else type(d).__name__
            raise ResultFormatError(f"this is a {found!r} result, not {self.a_noun()} result ({self.kind!r})")
        if d.get("version") != self.version:
            raise ResultFormatError(f"{self.noun} result version {d.get('version')} is not {self.version}; "
                                    f"re-run {self.rerun}")


_REGISTRY: dict[str, ResultType] = {}

R = TypeVar("R", bound=type)


def register_result(kind: str, version: int, *, rerun: str | None = None) -> Callable[[R], R]:
    """Class decorator: register ``cls`` (which has ``from_dict``) as the result of ``kind`` at ``version``.

    Sets ``cls.RESULT_KIND`` and ``cls.RESULT_VERSION``. ``rerun`` is what the version message tells the user
    to re-run (default: "trace <noun> with this version").
    """
    def register(cls: R) -> R:
        if not callable(getattr(cls, "from_dict", None)):
            raise TypeError(f"{cls.__name__} needs a from_dict classmethod to be registered as {kind!r}")
        noun = kind.rsplit(".", 1)[-1]
        _REGISTRY[kind] = ResultType(kind, version, cls, rerun or f"trace {noun} with this version")
        cls.RESULT_KIND = kind
        cls.RESULT_VERSION = version
        return cls

    return register


def lookup_result(kind: str) -> ResultType | None:
    """The registered result of ``kind``, importing the module :data:`RESULT_MODULES` names for it first; None
    when no class is registered for it (an unknown kind, or one whose module does not exist yet)."""
    if kind not in _REGISTRY and kind in RESULT_MODULES:
        module = RESULT_MODULES[kind]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return _REGISTRY.get(kind)


def registered_results() -> dict[str, ResultType]:
    """Every kind of :data:`RESULT_MODULES` that has a registered class, in that order."""
    found = {kind: lookup_result(kind) for kind in RESULT_MODULES}
    return {kind: rt for kind, rt in found.items() if rt is not None}


def _type_of(cls: type) -> ResultType:
    rt = _REGISTRY.get(getattr(cls, "RESULT_KIND", None))
    if rt is None or rt.cls is not cls:
        raise TypeError(f"{cls.__name__} is not registered: decorate it with @register_result(kind, version)")
    return rt


class ResultFile:
    """``to_json`` / ``save`` / ``load`` and the kind-and-version check of a registered result class."""

    RESULT_KIND: ClassVar[str]
    RESULT_VERSION: ClassVar[int]

    def to_dict(self) -> dict:
        raise NotImplementedError

    def result_header(self) -> dict:
        """``kind``, ``version`` and the ``trace_version`` that wrote it: the first fields of every result."""
        from trace_lib import __version__

        return {"kind": self.RESULT_KIND, "version": self.RESULT_VERSION, "trace_version": __version__}

    @classmethod
    def check_format(cls, d: Any) -> None:
        """Raise :class:`ResultFormatError` unless ``d`` is a dict of this class's kind and version."""
        _type_of(cls).check(d)

    def to_json(self) -> str:
        """The JSON text :meth:`save` writes (less its final newline)."""
        return dumps(self.to_dict())

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Any:
        """The result saved at ``path``; a :class:`ResultFormatError` for an unreadable file or another kind."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError) as e:
            raise ResultFormatError(f"cannot read {_type_of(cls).a_noun()} result from {path}: {e}") from e

    @classmethod
    def from_dict(cls, d: dict) -> Any:
        raise NotImplementedError
