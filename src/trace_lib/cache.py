"""Where trace keeps what it computes once (converted models, SAEs, activations) and how it writes it.

Caches live under ``$TRACE_CACHE`` (default ``~/.cache/trace-lib``). Every write is atomic: the data go to a
temporary file in the same folder, which is then renamed over the target, so an interrupted run never
leaves a half-written file behind. Temporaries carry their process id (``.NAME.p<pid>.<random>.tmp``); a
process killed before it could remove its own (SIGKILL, a power cut) leaves them behind, and the first
process that opens the cache removes those of processes that no longer run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trace_lib.jsonutil import dumps, to_jsonable

_TMP = re.compile(r"^\..+\.p(\d+)\.[^.]+\.tmp$")  # .NAME.p<pid>.<random>.tmp
_LEGACY_TMP = re.compile(r"^\..+\.tmp$")  # before temporaries carried a pid
_LEGACY_AGE_S = 24 * 3600
_cleaned: set[Path] = set()


def cache_root() -> Path:
    return Path(os.environ.get("TRACE_CACHE", Path.home() / ".cache" / "trace-lib")).expanduser()


def cache_dir(*parts: str) -> Path:
    """Return (and create) ``$TRACE_CACHE/<parts...>``; the first call per cache root cleans stale temporaries."""
    root = cache_root()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    if root not in _cleaned:
        _cleaned.add(root)
        remove_stale_temporaries(root)
    return path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def remove_stale_temporaries(root: str | Path, legacy_age_s: float = _LEGACY_AGE_S) -> list[Path]:
    """Remove the temporaries under ``root`` whose writing process no longer runs (and pid-less ones from
    older versions once they are a day old). Returns what was removed."""
    removed: list[Path] = []
    now = time.time()
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            m = _TMP.match(name)
            p = Path(folder) / name
            if m:
                stale = not _pid_alive(int(m.group(1)))
            elif _LEGACY_TMP.match(name):
                try:
                    stale = now - p.lstat().st_mtime > legacy_age_s
                except OSError:
                    continue
            else:
                continue
            if stale:
                try:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                    removed.append(p)
                except OSError:
                    pass
        dirs[:] = [d for d in dirs if not _LEGACY_TMP.match(d)]  # never walk into a temporary
    return removed


def temp_prefix(path: Path) -> str:
    """Prefix of a temporary next to ``path``: it names this process, so a stale one can be recognised."""
    return f".{path.name}.p{os.getpid()}."


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``path`` (same filesystem, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; results should be readable as usual
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, dumps(obj) + "\n")


def atomic_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Build a whole folder in a temporary sibling, then rename it into place.

    If ``path`` already exists (another process won the race) the new copy is discarded.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def stable_hash(obj: Any, n: int = 16) -> str:
    """Short sha256 of a JSON-serialisable object (keys sorted), for cache keys."""
    blob = json.dumps(obj, sort_keys=True, default=to_jsonable).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_manifest_files(folder: Path, files: dict[str, str], what: str, fix: str,
                         error: type[Exception]) -> None:
    """``error`` unless every ``folder/rel`` of ``files`` ({rel: sha256}, a manifest's record) is present with that
    sha256; the message names the ``what`` file and how to ``fix`` it."""
    for rel, digest in sorted(files.items()):
        path = Path(folder) / rel
        if not path.is_file():
            raise error(f"{what} {path} is missing; {fix}")
        if file_sha256(path) != digest:
            raise error(f"{what} {path} fails its checksum; {fix}")
