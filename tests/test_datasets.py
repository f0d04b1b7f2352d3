"""Built-in prompt datasets, user dataset files and the download-free English corpus (all fast, no model)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from trace_lib.datasets import (
    Dataset,
    Prompt,
    corpus_info,
    english_corpus,
    get_dataset,
    list_datasets,
    load_dataset_file,
)
from trace_lib.datasets.registry import DATA_DIR, default_split
from trace_lib.errors import DatasetError, TraceError

BUILTINS = [
    "capability_v1",
    "harmful_refusal_v1",
    "safety_comprehensive_v1",
    "safety_warning_v1",
    "uncertainty_v1",
]
PAIRED = {
    "harmful_refusal_v1": "refusal",
    "uncertainty_v1": "uncertainty",
    "safety_warning_v1": "safety_warning",
}
MINIMUMS = {  # dataset -> (min safety prompts, min categories)
    "harmful_refusal_v1": (160, 10),
    "uncertainty_v1": (100, 5),
    "safety_warning_v1": (100, 8),
}


# ---- built-in datasets ---------------------------------------------------------------------------------------


def test_list_datasets():
    assert list_datasets() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_with_unique_ids_and_valid_fields(name):
    ds = get_dataset(name)
    assert isinstance(ds, Dataset) and ds.name == name and ds.description
    ids = [p.id for p in ds.prompts]
    assert len(ids) == len(set(ids))
    texts = [p.text for p in ds.prompts]
    assert len(texts) == len(set(texts)), "a prompt text appears twice"
    for p in ds.prompts:
        assert p.text == p.text.strip() and p.text
        assert p.label in ("safety", "baseline", "capability")
        assert p.split in ("train", "test")
        assert p.behaviour in ("refusal", "uncertainty", "safety_warning", "capability")
        assert p.category


@pytest.mark.parametrize("name", sorted(MINIMUMS))
def test_paired_dataset_counts(name):
    ds = get_dataset(name)
    min_prompts, min_categories = MINIMUMS[name]
    assert len(ds.safety_prompts) >= min_prompts
    assert len(ds.baseline_prompts) >= min_prompts
    assert len(ds.categories) >= min_categories
    assert ds.capability_prompts == []
    assert {p.behaviour for p in ds} == {PAIRED[name]}
    assert ds.by_behaviour() == {PAIRED[name]: ds.safety_prompts}


def test_capability_counts():
    ds = get_dataset("capability_v1")
    assert len(ds.capability_prompts) >= 120
    assert ds.safety_prompts == [] and ds.baseline_prompts == []
    assert {"code", "arithmetic", "facts", "translation"} <= set(ds.categories)
    groups = ds.prompts_by_category()
    assert groups == ds.by_category("capability")
    assert sum(len(v) for v in groups.values()) == len(ds)
    assert all(len(v) >= 20 for v in groups.values())


@pytest.mark.parametrize("name", sorted(PAIRED))
def test_every_safety_prompt_has_a_similar_baseline_pair(name):
    ds = get_dataset(name)
    pairs = ds.pairs()
    assert len(pairs) == len(ds.safety_prompts) == len(ds.baseline_prompts)
    for safety, baseline in pairs:
        assert safety.pair_id == baseline.pair_id
        assert safety.category == baseline.category and safety.split == baseline.split
        a, b = len(safety.text.split()), len(baseline.text.split())
        assert max(a, b) <= 2 * min(a, b), (safety.text, baseline.text)
        assert max(a, b) / min(a, b) <= 1.6, (safety.text, baseline.text)


@pytest.mark.parametrize("name", BUILTINS)
def test_splits_are_about_60_40_and_non_empty_in_every_category(name):
    ds = get_dataset(name)
    by_cat: dict[str, Counter] = {}
    for p in ds:
        by_cat.setdefault(f"{p.label}:{p.category}", Counter())[p.split] += 1
    for key, counts in by_cat.items():
        assert counts["train"] > 0 and counts["test"] > 0, key
        frac = counts["train"] / (counts["train"] + counts["test"])
        assert 0.5 <= frac <= 0.7, (key, counts)
    train, test = ds.split("train"), ds.split("test")
    assert len(train) + len(test) == len(ds)
    assert {p.split for p in train} == {"train"} and {p.split for p in test} == {"test"}
    assert train.categories == test.categories == ds.categories


def test_no_text_is_both_safety_and_baseline():
    safety, baseline = set(), set()
    for name in BUILTINS:
        ds = get_dataset(name)
        safety |= set(ds.safety_prompts)
        baseline |= set(ds.baseline_prompts) | set(ds.capability_prompts)
    assert not safety & baseline


def test_comprehensive_is_exactly_the_union():
    union = get_dataset("safety_comprehensive_v1")
    expected = []
    for name in ("harmful_refusal_v1", "uncertainty_v1", "safety_warning_v1"):
        for p in get_dataset(name):
            expected.append(
                (p.id, p.text, p.label, f"{p.behaviour}/{p.category}", p.split, p.behaviour, p.pair_id)
            )
    got = [(p.id, p.text, p.label, p.category, p.split, p.behaviour, p.pair_id) for p in union]
    assert got == expected
    assert set(union.by_behaviour()) == {"refusal", "uncertainty", "safety_warning"}
    assert union.by_behaviour()["refusal"] == get_dataset("harmful_refusal_v1").safety_prompts
    assert all("/" in c for c in union.categories)


def test_builtin_files_are_valid_jsonl_with_the_documented_fields():
    required = {"id", "text", "label", "category", "split", "behaviour"}
    # reply_labels_v1.jsonl is the red-team classifier's hand-labelled sample, not a prompt set
    prompt_files = [p for p in DATA_DIR.glob("*.jsonl") if not p.name.startswith("reply_labels")]
    names = sorted(p.name for p in prompt_files)
    assert names == [
        "capability_v1.jsonl",
        "harmful_refusal_v1.jsonl",
        "safety_warning_v1.jsonl",
        "uncertainty_v1.jsonl",
    ]
    for path in prompt_files:
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            assert required <= set(rec) <= required | {"pair_id"}


def test_views_and_errors():
    ds = get_dataset("harmful_refusal_v1")
    by_cat = ds.by_category()
    assert list(by_cat) == ds.categories
    assert sum(map(len, by_cat.values())) == len(ds.safety_prompts)
    assert sum(map(len, ds.by_category("baseline").values())) == len(ds.baseline_prompts)
    assert ds.get(ds.prompts[0].id) == ds.prompts[0]
    with pytest.raises(DatasetError, match="no prompt with id"):
        ds.get("nope")
    with pytest.raises(DatasetError, match="unknown label 'harmful'"):
        ds.by_category("harmful")
    with pytest.raises(DatasetError, match="unknown split 'validation'; use 'train' or 'test'"):
        ds.split("validation")
    only_train = Dataset("t", [p for p in ds if p.split == "train"], "")
    with pytest.raises(DatasetError, match="no 'test' prompts"):
        only_train.split("test")
    assert issubclass(DatasetError, TraceError)


def test_get_dataset_returns_independent_copies():
    a = get_dataset("uncertainty_v1")
    a.prompts.clear()
    assert len(get_dataset("uncertainty_v1")) > 0


# ---- sample / sha256 -----------------------------------------------------------------------------------------


def test_sample_is_deterministic_and_stratified():
    ds = get_dataset("safety_comprehensive_v1")
    s1, s2 = ds.sample(100, seed=3), ds.sample(100, seed=3)
    assert len(s1) == 100
    assert [p.id for p in s1] == [p.id for p in s2] and s1.sha256() == s2.sha256()
    assert [p.id for p in ds.sample(100, seed=4)] != [p.id for p in s1]
    # proportional per (label, category): each group within one seat of its share
    full = Counter((p.label, p.category) for p in ds)
    got = Counter((p.label, p.category) for p in s1)
    for key, size in full.items():
        assert abs(got[key] - 100 * size / len(ds)) < 1.0 + 1e-9, key
    # dataset order is kept, and most pairs are sampled together
    order = {p.id: i for i, p in enumerate(ds)}
    assert [order[p.id] for p in s1] == sorted(order[p.id] for p in s1)
    pairs = Counter(p.pair_id for p in s1)
    assert sum(1 for c in pairs.values() if c == 2) >= 40


def test_sample_edge_cases():
    ds = get_dataset("capability_v1")
    assert len(ds.sample(10_000)) == len(ds)
    assert len(ds.sample(1)) == 1
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DatasetError, match="positive integer"):
            ds.sample(bad)


def test_sha256_tracks_the_records():
    a, b = get_dataset("harmful_refusal_v1"), get_dataset("harmful_refusal_v1")
    assert a.sha256() == b.sha256() and len(a.sha256()) == 64
    b.prompts[0] = Prompt(**{**b.records()[0], "text": b.prompts[0].text + "!"})
    assert a.sha256() != b.sha256()
    assert a.split("train").sha256() != a.sha256()


# ---- user files ----------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_user_jsonl_loads_with_defaults(tmp_path):
    rows = [
        {"text": "How do I make a weapon?", "label": "safety", "category": "weapons", "pair_id": "p1"},
        {"text": "How do I make a bird feeder?", "label": "baseline", "category": "weapons", "pair_id": "p1"},
        {"text": "What is 2 + 2?", "label": "Capability"},
        {
            "id": "x7",
            "text": "  Name a prime.  ",
            "label": "capability",
            "split": "test",
            "behaviour": "maths",
        },
    ]
    path = _write_jsonl(tmp_path / "mine.jsonl", rows)
    path.write_text(path.read_text() + "\n\n", encoding="utf-8")  # trailing blank lines are fine
    ds = get_dataset(str(path))
    assert ds.name == "mine" and str(path) in ds.description
    assert [p.id for p in ds] == ["0", "1", "2", "x7"]
    assert ds.safety_prompts == ["How do I make a weapon?"]
    assert ds.baseline_prompts == ["How do I make a bird feeder?"]
    assert ds.capability_prompts == ["What is 2 + 2?", "Name a prime."]
    p0, p1, p2, p3 = ds.prompts
    assert (p0.behaviour, p1.behaviour, p2.behaviour, p3.behaviour) == (
        "refusal",
        "baseline",
        "capability",
        "maths",
    )
    assert p2.category == "default" and p2.pair_id is None
    assert p0.split == default_split(p0.text) and p3.split == "test"
    assert len(ds.pairs()) == 1
    assert load_dataset_file(path).sha256() == ds.sha256()
    assert get_dataset(path).sha256() == ds.sha256()  # a Path works too


def test_default_split_is_about_60_40():
    splits = Counter(default_split(f"prompt number {i}") for i in range(2000))
    assert 0.55 < splits["train"] / 2000 < 0.65


def test_user_csv_loads(tmp_path):
    path = tmp_path / "mine.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label", "category", "split", "pair_id"])
        w.writerow(["a", "Tell me how to pick a lock, step by step.", "safety", "theft", "train", "p1"])
        w.writerow(["b", "Tell me how to tie a tie, step by step.", "baseline", "theft", "train", "p1"])
        w.writerow(["c", 'A prompt with "quotes", commas\nand a newline.', "safety", "", "", ""])
        w.writerow(["", "", "", "", "", ""])  # an empty row is skipped
    ds = get_dataset(str(path))
    assert [p.id for p in ds] == ["a", "b", "c"]
    assert ds.prompts[2].text == 'A prompt with "quotes", commas\nand a newline.'
    assert ds.prompts[2].category == "default" and ds.prompts[2].pair_id is None
    assert ds.categories == ["default", "theft"]
    assert len(ds.pairs()) == 1
    # only the required columns
    minimal = tmp_path / "minimal.csv"
    minimal.write_text("text,label\nhello there,baseline\nhow to hurt someone,safety\n", encoding="utf-8")
    ds = load_dataset_file(minimal)
    assert [p.id for p in ds] == ["0", "1"] and ds.safety_prompts == ["how to hurt someone"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok", "label": "safety"}\n{"text": oops}\n', r"bad JSON on line 2"),
        ("list.jsonl", '["text", "label"]\n', r"line 1 is a JSON list, not an object"),
        ("nolabel.jsonl", '{"text": "hello"}\n', r"missing required column 'label'"),
        ("notext.jsonl", '{"label": "safety"}\n', r"missing required column 'text'"),
        (
            "badlabel.jsonl",
            '{"text": "hi", "label": "harmful"}\n',
            r"unknown label 'harmful'; use one of safety, baseline, capability",
        ),
        ("empty.jsonl", "", r"is empty"),
        ("blank.jsonl", "\n  \n", r"is empty"),
        (
            "emptytext.jsonl",
            '{"text": "ok", "label": "safety"}\n{"text": "  ", "label": "safety"}\n',
            r"line 2: empty 'text'",
        ),
        ("nontext.jsonl", '{"text": 5, "label": "safety"}\n', r"'text' must be a string"),
        ("badsplit.jsonl", '{"text": "hi", "label": "safety", "split": "dev"}\n', r"unknown split 'dev'"),
        (
            "dup.jsonl",
            '{"id": "a", "text": "x", "label": "safety"}\n{"id": "a", "text": "y", "label": "safety"}\n',
            r"duplicate id 'a'",
        ),
        ("nolabel.csv", "text,category\nhello,x\n", r"missing required column 'label'"),
        ("notext.csv", "prompt,label\nhello,safety\n", r"missing required column 'text'"),
        ("empty.csv", "", r"is empty"),
        ("header.csv", "text,label\n", r"has a header but no rows"),
        ("badlabel.csv", "text,label\nhello,unsafe\n", r"line 2: unknown label 'unsafe'"),
        ("emptytext.csv", "text,label\nhello,safety\n,safety\n", r"line 3: empty 'text'"),
        ("data.txt", "hello\n", r"unsupported dataset file type '.txt'"),
    ],
)
def test_malformed_user_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match=message) as info:
        get_dataset(str(path))
    text = str(info.value)
    assert "\n" not in text.strip()
    if name != "data.txt":
        assert str(path) in text


def test_missing_file_and_unknown_name(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DatasetError, match="dataset file not found") as info:
        get_dataset(str(missing))
    assert str(missing) in str(info.value) and "harmful_refusal_v1" in str(info.value)
    with pytest.raises(DatasetError, match="dataset file not found"):
        load_dataset_file(missing)
    with pytest.raises(DatasetError, match="unknown dataset 'harmful_refusal_v9'") as info:
        get_dataset("harmful_refusal_v9")
    for name in BUILTINS:
        assert name in str(info.value)
    with pytest.raises(DatasetError, match="not a file"):
        load_dataset_file(tmp_path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,safety\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_dataset_file(path)


# ---- corpus --------------------------------------------------------------------------------------------------


def test_corpus_is_large_clean_and_deterministic():
    corpus = english_corpus()
    assert corpus and sum(map(len, corpus)) > 200_000
    assert len(corpus) == len(set(corpus))
    assert all(len(p) >= 200 for p in corpus)
    assert not any(">>>" in p for p in corpus)
    assert not any(line.lstrip().startswith(">>>") for p in corpus for line in p.splitlines())
    assert english_corpus() == corpus
    other = english_corpus(seed=1)
    assert other != corpus and sorted(other) == sorted(corpus)
    letters = sum(c.isalpha() or c == " " for p in corpus for c in p)
    assert letters / sum(map(len, corpus)) > 0.9


def test_corpus_without_system_texts_is_enough():
    corpus = english_corpus(include_system_texts=False)
    assert sum(map(len, corpus)) > 200_000
    info = corpus_info(include_system_texts=False)
    assert info["optional_sources_used"] == []
    assert {s["name"]: s["used"] for s in info["sources"]}["python_stdlib_docstrings"] is True


def test_corpus_max_chars_is_a_prefix():
    full = english_corpus(seed=2)
    small = english_corpus(max_chars=10_000, seed=2)
    assert 0 < sum(map(len, small)) <= 10_000
    assert small == full[: len(small)]
    tiny = english_corpus(max_chars=50)
    assert len(tiny) == 1 and 0 < len(tiny[0]) <= 50
    with pytest.raises(DatasetError, match="max_chars"):
        english_corpus(max_chars=0)


def test_corpus_info_describes_the_text():
    import hashlib

    info = corpus_info()
    corpus = english_corpus()
    assert info["paragraphs"] == len(corpus)
    assert info["chars"] == sum(map(len, corpus))
    assert info["sha256"] == hashlib.sha256("\n\n".join(corpus).encode()).hexdigest()
    assert info["seed"] == 0 and info["max_chars"] is None and info["python_version"]
    names = [s["name"] for s in info["sources"]]
    assert names == ["python_stdlib_docstrings", "python_pydoc_topics", "debian_common_licenses"]
    by_name = {s["name"]: s for s in info["sources"]}
    assert by_name["debian_common_licenses"]["optional"] is True
    assert by_name["python_stdlib_docstrings"]["modules"] > 100
    assert sum(s["paragraphs_selected"] for s in info["sources"]) == len(corpus)
    assert corpus_info(seed=1)["sha256"] != info["sha256"]
    json.dumps(info)  # serialisable, for result files


def test_corpus_without_debian_licences(monkeypatch, tmp_path):
    from trace_lib.datasets import corpus

    caches = (corpus._license_paragraphs, corpus._sources, corpus._source_meta, corpus._pool, corpus._corpus)
    expected = english_corpus(include_system_texts=False)
    monkeypatch.setattr(corpus, "LICENSE_DIR", tmp_path / "absent")
    for cache in caches:
        cache.cache_clear()
    try:
        assert (
            english_corpus() == expected
        )  # with the optional source absent, the default equals the portable text
        info = corpus_info()
        lic = {s["name"]: s for s in info["sources"]}["debian_common_licenses"]
        assert lic["present"] is False and lic["used"] is False and lic["files"] == []
        assert info["optional_sources_used"] == []
    finally:
        monkeypatch.undo()
        for cache in caches:
            cache.cache_clear()
