"""Real English text that needs no download, for SAE training and KL evaluation.

The text is gathered from what every Python installation already has:

1. ``python_stdlib_docstrings``: the docstrings of a fixed, sorted list of standard-library modules and of the
   classes, methods and functions they define;
2. ``python_pydoc_topics``: the language-reference topics that ``pydoc`` shows for ``help('topics')``
   (``pydoc_data.topics``), when the installation ships them;
3. ``debian_common_licenses`` (optional): the licence texts in ``/usr/share/common-licenses`` on Debian-based
   systems. Nothing depends on them; :func:`corpus_info` says whether they were used, and
   ``include_system_texts=False`` leaves them out so the text depends only on the Python version.

Only paragraphs that look like prose are kept: at least :data:`MIN_CHARS` characters, mostly letters and spaces,
no indented (code or listing) lines and no interpreter prompts (``>>>``). Paragraphs are deduplicated, sorted,
then shuffled with the seed, so the result is deterministic for a given Python version, seed and source set.
:func:`corpus_info` records the sources, counts and a sha256 of the exact text, for results to cite.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import platform
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from trace_lib.errors import DatasetError

CORPUS_VERSION = 1
MIN_CHARS = 200
PROSE_RATIO = 0.88  # share of letters and spaces a paragraph needs
LICENSE_DIR = Path("/usr/share/common-licenses")
_MAX_LICENSE_BYTES = 1_000_000

# Fixed, sorted list; modules missing from an installation are skipped and listed in corpus_info().
# Modules with import side effects (antigravity, this, rlcompleter, tkinter, turtle, idlelib) and modules
# removed from recent Python versions are deliberately absent.
STDLIB_MODULES: tuple[str, ...] = tuple(
    sorted(
        """
        abc argparse ast asyncio asyncio.base_events asyncio.events asyncio.futures asyncio.locks
        asyncio.queues asyncio.streams asyncio.subprocess asyncio.tasks base64 bdb binascii bisect builtins bz2
        calendar cmd code codecs codeop collections collections.abc colorsys compileall concurrent.futures
        concurrent.futures.process concurrent.futures.thread configparser contextlib contextvars copy copyreg csv
        dataclasses datetime decimal difflib dis doctest email email.charset email.generator email.header
        email.headerregistry email.message email.parser email.policy email.utils enum filecmp fileinput fnmatch
        fractions ftplib functools gc getopt getpass gettext glob gzip hashlib heapq hmac html html.parser http
        http.client http.cookiejar http.cookies http.server imaplib importlib importlib.abc importlib.machinery
        importlib.metadata importlib.resources importlib.util inspect io ipaddress itertools json json.decoder
        json.encoder keyword linecache locale logging logging.config logging.handlers lzma mailbox marshal math
        mimetypes modulefinder multiprocessing multiprocessing.connection multiprocessing.managers
        multiprocessing.pool multiprocessing.process multiprocessing.queues multiprocessing.shared_memory
        multiprocessing.synchronize netrc numbers operator optparse os pathlib pdb pickle pickletools pkgutil
        platform plistlib poplib posixpath pprint profile pstats py_compile pyclbr pydoc queue quopri random re
        reprlib runpy sched secrets select selectors shelve shlex shutil signal smtplib socket socketserver
        sqlite3 ssl stat statistics string struct subprocess symtable sys sysconfig tabnanny tarfile tempfile
        textwrap threading time timeit token tokenize trace traceback tracemalloc types typing unicodedata
        unittest unittest.case unittest.mock unittest.result unittest.runner unittest.suite urllib.error
        urllib.parse urllib.request urllib.response urllib.robotparser uuid warnings wave weakref
        wsgiref.handlers wsgiref.simple_server wsgiref.util xml.dom xml.dom.minidom xml.dom.pulldom
        xml.etree.ElementTree xml.sax xml.sax.handler xml.sax.saxutils xml.sax.xmlreader xmlrpc.client
        xmlrpc.server zipapp zipfile zipimport zlib zoneinfo
        """.split()
    )
)

_BLANK_LINES = re.compile(r"\n[ \t]*\n")
_WS = re.compile(r"\s+")
_RULE = re.compile(r"^[\s\-=*_~#+.]+$")  # underlines and rules: '-----', '*****', '= = ='


def english_corpus(
    max_chars: int | None = None, seed: int = 0, include_system_texts: bool = True
) -> list[str]:
    """Paragraphs of real English prose, shuffled deterministically with ``seed``.

    ``max_chars`` caps the total length: paragraphs are taken in shuffled order while they fit, so a smaller cap
    gives a prefix of a larger one (with the same seed). ``include_system_texts=False`` leaves out the optional
    system licence texts, so the result depends only on the Python installation.
    """
    return list(_corpus(max_chars, seed, include_system_texts))


def corpus_info(
    max_chars: int | None = None, seed: int = 0, include_system_texts: bool = True
) -> dict[str, Any]:
    """What :func:`english_corpus` returns for these arguments: sources, counts and a sha256 of the text.

    The hash is of the paragraphs joined with blank lines, in the returned order.
    """
    paragraphs = _corpus(max_chars, seed, include_system_texts)
    source_of = dict(_pool(include_system_texts))
    selected: dict[str, list[int]] = {}
    for p in paragraphs:
        counts = selected.setdefault(source_of[p], [0, 0])
        counts[0] += 1
        counts[1] += len(p)
    sources = []
    for meta in _source_meta():
        entry = dict(meta)
        used = entry["present"] and (include_system_texts or not entry["optional"])
        entry["used"] = bool(used)
        if not used:
            entry["paragraphs"] = entry["chars"] = 0
        n, c = selected.get(entry["name"], [0, 0])
        entry["paragraphs_selected"], entry["chars_selected"] = n, c
        sources.append(entry)
    text = "\n\n".join(paragraphs)
    return {
        "name": "english_corpus",
        "version": CORPUS_VERSION,
        "python_version": platform.python_version(),
        "seed": seed,
        "max_chars": max_chars,
        "include_system_texts": include_system_texts,
        "paragraphs": len(paragraphs),
        "chars": sum(len(p) for p in paragraphs),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "sources": sources,
        "optional_sources_used": [s["name"] for s in sources if s["optional"] and s["used"]],
    }


# ---- assembly ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _corpus(max_chars: int | None, seed: int, include_system_texts: bool) -> tuple[str, ...]:
    if max_chars is not None and (
        isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1
    ):
        raise DatasetError(f"max_chars must be a positive integer or None, got {max_chars!r}")
    paragraphs = [p for p, _ in _pool(include_system_texts)]
    random.Random(seed).shuffle(paragraphs)
    if max_chars is None:
        return tuple(paragraphs)
    out: list[str] = []
    total = 0
    for p in paragraphs:
        if total + len(p) > max_chars:
            break
        out.append(p)
        total += len(p)
    if not out and paragraphs:  # the cap is smaller than one paragraph: cut the first at a word boundary
        cut = paragraphs[0][:max_chars]
        out.append(cut.rsplit(" ", 1)[0] if " " in cut else cut)
    return tuple(out)


@functools.lru_cache(maxsize=2)
def _pool(include_system_texts: bool) -> tuple[tuple[str, str], ...]:
    """Sorted, deduplicated (paragraph, source name) pairs; a paragraph belongs to the first source giving it."""
    source_of: dict[str, str] = {}
    for name, paragraphs in _sources():
        if name == "debian_common_licenses" and not include_system_texts:
            continue
        for p in paragraphs:
            source_of.setdefault(p, name)
    return tuple(sorted(source_of.items()))


@functools.lru_cache(maxsize=1)
def _sources() -> tuple[tuple[str, tuple[str, ...]], ...]:
    return (
        ("python_stdlib_docstrings", _stdlib_docstring_paragraphs()[0]),
        ("python_pydoc_topics", _pydoc_topic_paragraphs()),
        ("debian_common_licenses", _license_paragraphs()[0]),
    )


@functools.lru_cache(maxsize=1)
def _source_meta() -> tuple[dict[str, Any], ...]:
    docs, n_modules, missing = _stdlib_docstring_paragraphs()
    topics = _pydoc_topic_paragraphs()
    licenses, files = _license_paragraphs()
    return (
        {
            "name": "python_stdlib_docstrings",
            "optional": False,
            "present": bool(docs),
            "modules": n_modules,
            "modules_missing": list(missing),
            "paragraphs": len(docs),
            "chars": sum(map(len, docs)),
        },
        {
            "name": "python_pydoc_topics",
            "optional": False,
            "present": bool(topics),
            "paragraphs": len(topics),
            "chars": sum(map(len, topics)),
        },
        {
            "name": "debian_common_licenses",
            "optional": True,
            "present": bool(licenses),
            "path": str(LICENSE_DIR),
            "files": list(files),
            "paragraphs": len(licenses),
            "chars": sum(map(len, licenses)),
        },
    )


# ---- sources -------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _stdlib_docstring_paragraphs() -> tuple[tuple[str, ...], int, tuple[str, ...]]:
    found: dict[str, None] = {}
    missing: list[str] = []
    imported = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in STDLIB_MODULES:
            try:
                module = importlib.import_module(modname)
            except Exception:  # absent or broken in this build (e.g. no _ssl, no _sqlite3)
                missing.append(modname)
                continue
            imported += 1
            for doc in _module_docstrings(module, modname):
                for p in _docstring_paragraphs(doc):
                    found.setdefault(p, None)
    return tuple(found), imported, tuple(missing)


def _module_docstrings(module: Any, modname: str) -> list[str]:
    docs = [module.__doc__]
    owners = {modname, "_" + modname.rsplit(".", 1)[-1]}

    def own(owner: object) -> bool:
        return isinstance(owner, str) and (owner in owners or owner.startswith(modname + "."))

    for _, obj in sorted(vars(module).items()):
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if not own(getattr(obj, "__module__", None)):
            continue
        docs.append(getattr(obj, "__doc__", None))
        if inspect.isclass(obj):
            for _, member in sorted(vars(obj).items()):
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if not (inspect.isroutine(member) or isinstance(member, property)):
                    continue
                # A method another package patched into a stdlib class (transformers adds
                # ``logging.Logger.warning_once``) would make the text depend on what was imported first;
                # C methods carry no ``__module__`` and are the class's own.
                member_owner = getattr(getattr(member, "fget", member), "__module__", None)
                if member_owner is None or (isinstance(member_owner, str)
                                            and member_owner.split(".")[0] in sys.stdlib_module_names):
                    docs.append(getattr(member, "__doc__", None))
    return [d for d in docs if isinstance(d, str) and d.strip()]


def _docstring_paragraphs(doc: str) -> list[str]:
    out = []
    for block in _BLANK_LINES.split(inspect.cleandoc(doc)):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or any(line[:1] in (" ", "\t") for line in lines):  # indented: code, listing, table
            continue
        p = _clean_block(lines)
        if p is not None:
            out.append(p)
    return out


@functools.lru_cache(maxsize=1)
def _pydoc_topic_paragraphs() -> tuple[str, ...]:
    try:
        from pydoc_data.topics import topics
    except Exception:
        return ()
    found: dict[str, None] = {}
    for key in sorted(topics):
        for block in _BLANK_LINES.split(topics[key]):
            lines = [line for line in block.split("\n") if line.strip()]
            if not lines or any(line[:1] in (" ", "\t") for line in lines):
                continue
            p = _clean_block(lines)
            if p is not None:
                found.setdefault(p, None)
    return tuple(found)


@functools.lru_cache(maxsize=1)
def _license_paragraphs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    if not LICENSE_DIR.is_dir():
        return (), ()
    found: dict[str, None] = {}
    files: list[str] = []
    seen_targets: set[Path] = set()
    for path in sorted(LICENSE_DIR.iterdir()):
        try:
            target = path.resolve()
            if not target.is_file() or target in seen_targets or target.stat().st_size > _MAX_LICENSE_BYTES:
                continue
            text = target.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        seen_targets.add(target)
        files.append(path.name)
        for block in _BLANK_LINES.split(text):
            lines = [line for line in block.split("\n") if line.strip()]
            if lines:
                p = _clean_block(lines)
                if p is not None:
                    found.setdefault(p, None)
    return tuple(found), tuple(files)


# ---- filtering -----------------------------------------------------------------------------------------------


def _clean_block(lines: list[str]) -> str | None:
    """Join a block's lines into one paragraph, or None when it does not look like prose."""
    stripped = [line.strip() for line in lines]
    if any(s.startswith((">>>", "...", "$ ", "%", "#", "|", "+-")) or _RULE.match(s) for s in stripped):
        return None
    p = _WS.sub(" ", " ".join(stripped)).strip()
    return p if looks_like_prose(p) else None


def looks_like_prose(p: str) -> bool:
    """True for a paragraph of at least MIN_CHARS characters that is mostly letters and spaces."""
    if len(p) < MIN_CHARS or ">>>" in p or "\ufffd" in p:
        return False
    letters = sum(1 for c in p if c.isalpha() or c == " ")
    if letters / len(p) < PROSE_RATIO:
        return False
    words = p.split()
    if len(words) < 30 or not 3.0 <= sum(map(len, words)) / len(words) <= 9.0:
        return False
    code_marks = sum(p.count(c) for c in "{}[]=<>\\|")
    if code_marks > 4:
        return False
    return p[-1] in ".!?:;)\"'\u201d"
