"""Checks of what a user gives, run before any model loads: numeric ranges, output paths, input files.

Each check raises a :class:`~trace_lib.errors.TraceError` subclass with a one-line message that names the
value and what would be valid. The Python API runs them when it is called; the ``trace`` command runs the
same checks while it parses its arguments, so a mistake costs no computation and exits with status 2.
This module imports nothing heavy (no torch), so argument checks stay instant.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trace_lib.errors import InvalidValueError, OutputPathError, TraceError
from trace_lib.quant.config import QuantizationConfig, parse_config


@dataclass(frozen=True)
class Range:
    """A closed, open or half-open interval of numbers (or of integers), with a readable description."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.lo is not None and self.hi is not None:
            return f"{kind} in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {_num(self.hi)}"
        return f"a finite {kind[3:] if kind.startswith('an ') else kind[2:]}"

    def contains(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def check(self, name: str, value: float | None) -> float | None:
        """Return ``value`` if it lies in the range (``None`` passes: it means "not given")."""
        if value is None or self.contains(value):
            return value
        raise InvalidValueError(f"{name} must be {self.describe()}, not {value!r}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# Ranges used across the API and the CLI.
FRACTION = Range(0, 1, lo_open=True)  # bars on CPFR-like fractions: (0, 1]
POSITIVE_INT = Range(1, integer=True)
NON_NEGATIVE_INT = Range(0, integer=True)
POSITIVE = Range(0, lo_open=True)
CONTEXT = Range(4, 32768, integer=True)  # tokens per chunk; the second half is scored, so at least a few
MAX_NEW_TOKENS = Range(1, 4096, integer=True)


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    if value not in choices:
        raise InvalidValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def check_nonempty(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidValueError(f"{name} is empty: give a name or a path")
    return value


def check_variant_spec(spec: object, name: str = "variant") -> None:
    """A variant given by name must be a config name (``trace configs``), a mixed-precision config's ``.json``
    file (read and checked now) or an existing model path. Objects (a QuantizationConfig, a loaded model) pass;
    their own types check them."""
    if isinstance(spec, QuantizationConfig) or not isinstance(spec, str | os.PathLike):
        return
    check_nonempty(name, str(spec))
    if str(spec).strip().lower().endswith(".json"):
        parse_config(str(spec))  # a missing file, bad JSON or unknown names raise QuantizationError
        return
    if Path(spec).expanduser().exists():
        return
    parse_config(str(spec))  # an unknown or invalid name raises QuantizationError with the valid forms


def check_input_file(path: str | os.PathLike, what: str = "input file") -> Path:
    """An existing regular file that can be read."""
    p = Path(path).expanduser()
    if not str(path).strip():
        raise TraceError(f"the {what} path is empty")
    if not p.exists():
        raise TraceError(f"no {what} at {p}")
    if not p.is_file():
        raise TraceError(f"{p} is not a file (give the {what} itself)")
    if not os.access(p, os.R_OK):
        raise TraceError(f"{p} cannot be read (permission denied)")
    return p


def check_input_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    p = Path(path).expanduser()
    if not str(path).strip():
        raise TraceError(f"the {what} path is empty")
    if not p.exists():
        raise TraceError(f"no {what} at {p}")
    if not p.is_dir():
        raise TraceError(f"{p} is not a folder (give the {what})")
    return p


def read_utf8(path: str | os.PathLike, what: str = "text file") -> str:
    """A file's text, refusing bytes that are not UTF-8 instead of replacing them."""
    p = check_input_file(path, what)
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TraceError(f"{p} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "convert it to UTF-8 first") from None


def _writable_ancestor(p: Path, name: str) -> None:
    """The nearest existing ancestor of ``p`` must be a folder we can write into (``p`` is created there)."""
    anc = p.parent
    while not anc.exists():
        if anc == anc.parent:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise OutputPathError(f"{name} {p} cannot be created: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputPathError(f"{name} {p} cannot be created: {anc} is not writable")


def check_output_dir(path: str | os.PathLike, name: str = "--out") -> Path:
    """A folder for result files: an existing writable folder, or one that can be created. Nothing is created
    here, so a run that fails later leaves no empty folder behind."""
    p = Path(path).expanduser()
    if not str(path).strip():
        raise OutputPathError(f"{name} is empty: give a folder for the result files")
    if p.exists():
        if not p.is_dir():
            raise OutputPathError(f"{name} {p} is a file, not a folder: give a folder for the result files")
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputPathError(f"{name} {p} is not writable")
        return p
    _writable_ancestor(p, name)
    return p


def check_output_file(path: str | os.PathLike, name: str = "--html",
                      inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """A file to write: not a folder, in a writable place, and never one of the run's input files."""
    p = Path(path).expanduser()
    if not str(path).strip():
        raise OutputPathError(f"{name} is empty: give a file name")
    if p.is_dir():
        raise OutputPathError(f"{name} {p} is a folder: give a file name")
    for src in inputs:
        if src is not None and _same_file(p, Path(src).expanduser()):
            raise OutputPathError(f"{name} {p} is an input of this run; refusing to overwrite it")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise OutputPathError(f"{name} {p} is not writable")
    else:
        _writable_ancestor(p, name)
    return p


def check_distinct(outputs: dict[str, str | os.PathLike | None]) -> None:
    """Two outputs of one run must not be the same file (one would overwrite the other)."""
    seen: dict[Path, str] = {}
    for name, path in outputs.items():
        if path is None:
            continue
        p = Path(path).expanduser().resolve()
        if p in seen:
            raise OutputPathError(f"{name} and {seen[p]} name the same file {p}; give two different paths")
        seen[p] = name


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()
