"""Prompt datasets: the built-in ones shipped with trace, and user files in JSONL or CSV.

A dataset is a list of :class:`Prompt` records. Each record has a ``label``:

* ``"safety"``: a prompt that should trigger the safety behaviour under audit (a harmful request that should be
  refused, a question with no knowable answer, a request whose answer needs a warning);
* ``"baseline"``: a harmless prompt of similar form and length, usually linked to a safety prompt by ``pair_id``;
* ``"capability"``: a general prompt (code, arithmetic, facts, ...) for checking that quantization kept the
  model's ordinary abilities.

Every record also has a ``split`` (``"train"`` or ``"test"``), a ``category`` and a ``behaviour``
(``refusal``, ``uncertainty``, ``safety_warning`` or ``capability`` for the built-ins). See ``docs/datasets.md``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trace_lib.errors import DatasetError

LABELS = ("safety", "baseline", "capability")
SPLITS = ("train", "test")
SAFETY_BEHAVIOURS = ("refusal", "uncertainty", "safety_warning")
TRAIN_FRACTION = 0.6
DEFAULT_CATEGORY = "default"
# The audit's default dataset: all three safety behaviours the seed names (refusal, uncertainty, safety warnings).
AUDIT_DATASET = "safety_comprehensive_v1"

DATA_DIR = Path(__file__).resolve().parent / "data"

# name -> (file in DATA_DIR, or None for a composed dataset; description)
_BUILTINS: dict[str, tuple[str | None, str]] = {
    "harmful_refusal_v1": (
        "harmful_refusal_v1.jsonl",
        "Harmful requests a safety-tuned assistant refuses, each paired with a harmless request of the same "
        "form and length (behaviour: refusal).",
    ),
    "uncertainty_v1": (
        "uncertainty_v1.jsonl",
        "Questions with no knowable answer (future, private, unknowable quantities, counterfactuals, false "
        "premises), each paired with an answerable question of the same form (behaviour: uncertainty).",
    ),
    "safety_warning_v1": (
        "safety_warning_v1.jsonl",
        "Requests whose responsible answer carries a safety warning, each paired with a neutral request of "
        "the same form (behaviour: safety_warning).",
    ),
    "capability_v1": (
        "capability_v1.jsonl",
        "General prompts (code, arithmetic, facts, translation, reasoning) for checking ordinary capability "
        "(label: capability).",
    ),
    "safety_comprehensive_v1": (
        None,
        "Union of harmful_refusal_v1, uncertainty_v1 and safety_warning_v1; categories are prefixed with the "
        "behaviour, e.g. 'refusal/weapons'.",
    ),
}
_COMPOSED = {"safety_comprehensive_v1": ("harmful_refusal_v1", "uncertainty_v1", "safety_warning_v1")}
_FILE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``pair_id`` links a safety prompt with the baseline prompt it is matched with."""

    id: str
    text: str
    label: str
    category: str
    split: str
    behaviour: str
    pair_id: str | None = None


@dataclass
class Dataset:
    """A named list of prompts with views by label, category, behaviour and split."""

    name: str
    prompts: list[Prompt]
    description: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    # ---- views -------------------------------------------------------------------------------------------
    def texts(self, label: str | None = None) -> list[str]:
        """Prompt texts, all or those with ``label``."""
        if label is not None:
            _check_label(label)
        return [p.text for p in self.prompts if label is None or p.label == label]

    @property
    def safety_prompts(self) -> list[str]:
        return self.texts("safety")

    @property
    def baseline_prompts(self) -> list[str]:
        return self.texts("baseline")

    @property
    def capability_prompts(self) -> list[str]:
        return self.texts("capability")

    @property
    def categories(self) -> list[str]:
        """Sorted categories of the safety prompts (of all prompts when there are no safety prompts)."""
        cats = {p.category for p in self.prompts if p.label == "safety"}
        if not cats:
            cats = {p.category for p in self.prompts}
        return sorted(cats)

    @property
    def behaviours(self) -> list[str]:
        return sorted({p.behaviour for p in self.prompts})

    def by_category(self, label: str = "safety") -> dict[str, list[str]]:
        """Texts with ``label`` grouped by category (sorted keys, dataset order within a category)."""
        _check_label(label)
        out: dict[str, list[str]] = {}
        for p in self.prompts:
            if p.label == label:
                out.setdefault(p.category, []).append(p.text)
        return dict(sorted(out.items()))

    def prompts_by_category(self) -> dict[str, list[str]]:
        """Texts of every label grouped by category (handy for capability_v1)."""
        out: dict[str, list[str]] = {}
        for p in self.prompts:
            out.setdefault(p.category, []).append(p.text)
        return dict(sorted(out.items()))

    def by_behaviour(self) -> dict[str, list[str]]:
        """Safety prompt texts grouped by behaviour (refusal, uncertainty, safety_warning)."""
        out: dict[str, list[str]] = {}
        for p in self.prompts:
            if p.label == "safety":
                out.setdefault(p.behaviour, []).append(p.text)
        return dict(sorted(out.items()))

    def pairs(self) -> list[tuple[Prompt, Prompt]]:
        """(safety, baseline) prompt pairs linked by ``pair_id``, in dataset order; unpaired prompts are skipped."""
        safety: dict[str, Prompt] = {}
        baseline: dict[str, Prompt] = {}
        for p in self.prompts:
            if p.pair_id is None:
                continue
            if p.label == "safety":
                safety.setdefault(p.pair_id, p)
            elif p.label == "baseline":
                baseline.setdefault(p.pair_id, p)
        return [(s, baseline[pid]) for pid, s in safety.items() if pid in baseline]

    def get(self, prompt_id: str) -> Prompt:
        """The prompt with id ``prompt_id``."""
        for p in self.prompts:
            if p.id == prompt_id:
                return p
        raise DatasetError(
            f"dataset {self.name!r} has no prompt with id {prompt_id!r}; check the id against the dataset file"
        )

    # ---- subsets -----------------------------------------------------------------------------------------
    def split(self, split: str) -> Dataset:
        """The prompts of one split, ``"train"`` or ``"test"``."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; use 'train' or 'test'")
        chosen = [p for p in self.prompts if p.split == split]
        if not chosen:
            raise DatasetError(
                f"dataset {self.name!r} has no {split!r} prompts; give some records split={split!r} "
                "or leave the split column out so it is assigned automatically"
            )
        return Dataset(f"{self.name}[{split}]", chosen, self.description)

    def sample(self, n: int, seed: int = 0) -> Dataset:
        """A deterministic subset of ``n`` prompts, stratified by (label, category).

        Seats go to each (label, category) group in proportion to its size (largest remainder). Within a group,
        prompts are ranked by a hash of ``seed`` and their ``pair_id`` (or id), so the safety and baseline
        halves of a pair are picked together. The order of the dataset is kept.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DatasetError(f"sample size must be a positive integer, got {n!r}")
        if n >= len(self.prompts):
            return Dataset(f"{self.name}[sample n={n} seed={seed}]", list(self.prompts), self.description)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, p in enumerate(self.prompts):
            groups.setdefault((p.label, p.category), []).append(i)
        total = len(self.prompts)
        quotas = {key: n * len(idx) / total for key, idx in groups.items()}
        seats = {key: math.floor(q) for key, q in quotas.items()}
        left = n - sum(seats.values())
        # Largest remainder first; ties broken by a seeded hash of the category, then by label, so that the
        # safety and baseline groups of one category sit next to each other.
        order = sorted(
            groups,
            key=lambda k: (-(quotas[k] - seats[k]), _hash(f"{seed}:{k[1]}"), k[1], k[0]),
        )
        for key in order[:left]:
            seats[key] += 1
        chosen: set[int] = set()
        for key, idx in groups.items():
            ranked = sorted(
                idx, key=lambda i: (_hash(f"{seed}:{self.prompts[i].pair_id or self.prompts[i].id}"), i)
            )
            chosen.update(ranked[: seats[key]])
        picked = [p for i, p in enumerate(self.prompts) if i in chosen]
        return Dataset(f"{self.name}[sample n={n} seed={seed}]", picked, self.description)

    # ---- provenance --------------------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        """The prompts as plain dicts (the JSONL schema)."""
        return [asdict(p) for p in self.prompts]

    def sha256(self) -> str:
        """Hash of the records (ids, texts, labels, categories, splits, behaviours, pairs) in order."""
        blob = json.dumps(self.records(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---- public functions ----------------------------------------------------------------------------------------


def list_datasets() -> list[str]:
    """Names of the built-in datasets, sorted."""
    return sorted(_BUILTINS)


def get_dataset(name_or_path: str | Path | Dataset) -> Dataset:
    """A built-in dataset by name, or a user dataset from a ``.jsonl`` / ``.csv`` path (a Dataset passes through)."""
    if isinstance(name_or_path, Dataset):
        return name_or_path
    key = str(name_or_path).strip()
    if not isinstance(name_or_path, Path) and key in _BUILTINS:
        prompts = _builtin_prompts(key)
        return Dataset(key, list(prompts), _BUILTINS[key][1])
    path = Path(key).expanduser()
    if (
        isinstance(name_or_path, Path)
        or path.suffix.lower() in _FILE_SUFFIXES
        or "/" in key
        or "\\" in key
        or path.exists()
    ):
        return load_dataset_file(path)
    raise DatasetError(
        f"unknown dataset {key!r}; use one of {', '.join(list_datasets())} or a path to a .jsonl/.csv file"
    )


def load_dataset_file(path: str | Path) -> Dataset:
    """Load a user dataset from JSONL (one object per line) or CSV (header row); see ``docs/datasets.md``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(
            f"dataset file not found: {path}; pass an existing .jsonl/.csv file or a built-in name "
            f"({', '.join(list_datasets())})"
        )
    if not path.is_file():
        raise DatasetError(f"dataset path is not a file: {path}; pass a .jsonl or .csv file")
    kind = _FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DatasetError(
            f"unsupported dataset file type {path.suffix or '(none)'!r} for {path}; use .jsonl (one JSON object "
            "per line) or .csv (with a header row)"
        )
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"dataset file {path} is not UTF-8 text ({exc.reason}); save it as UTF-8"
        ) from None
    rows = _read_jsonl(raw, path) if kind == "jsonl" else _read_csv(raw, path)
    prompts = _parse_records(rows, path, builtin=False)
    return Dataset(path.stem, prompts, f"user dataset loaded from {path}")


# ---- parsing -------------------------------------------------------------------------------------------------


def _read_jsonl(raw: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{path}: bad JSON on line {lineno} ({exc.msg}); each line must be one JSON object"
            ) from None
        if not isinstance(obj, dict):
            raise DatasetError(
                f"{path}: line {lineno} is a JSON {type(obj).__name__}, not an object; write one "
                '{"text": ..., "label": ...} object per line'
            )
        rows.append((lineno, obj))
    if not rows:
        raise DatasetError(
            f"dataset file {path} is empty; add one JSON object per line with 'text' and 'label'"
        )
    return rows


def _read_csv(raw: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not raw.strip():
        raise DatasetError(
            f"dataset file {path} is empty; add a header row with 'text' and 'label' columns and one row per prompt"
        )
    reader = csv.DictReader(io.StringIO(raw, newline=""))
    fields = [f.strip() for f in (reader.fieldnames or []) if f is not None]
    for column in ("text", "label"):
        if column not in fields:
            raise DatasetError(
                f"{path}: missing required column {column!r} (found {', '.join(fields) or 'none'}); "
                "the header row must name 'text' and 'label'"
            )
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        for record in reader:
            clean = {(k.strip() if isinstance(k, str) else k): v for k, v in record.items() if k is not None}
            if all(v is None or str(v).strip() == "" for v in clean.values()):
                continue
            rows.append((reader.line_num, clean))
    except csv.Error as exc:
        raise DatasetError(f"{path}: bad CSV on line {reader.line_num} ({exc}); check the quoting") from None
    if not rows:
        raise DatasetError(f"dataset file {path} has a header but no rows; add one row per prompt")
    return rows


def _parse_records(rows: list[tuple[int, dict[str, Any]]], path: Path, builtin: bool) -> list[Prompt]:
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for index, (lineno, rec) in enumerate(rows):
        where = f"{path}: line {lineno}"
        for column in ("text", "label"):
            if column not in rec:
                raise DatasetError(
                    f"{where}: missing required column {column!r}; every record needs 'text' and 'label'"
                )
        text = rec["text"]
        if not isinstance(text, str):
            raise DatasetError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        text = text.strip()
        if not text:
            raise DatasetError(
                f"{where}: empty 'text'; give every record a non-empty prompt text or remove it"
            )
        label = _str_or_none(rec["label"])
        label = label.lower() if label else label
        if label not in LABELS:
            raise DatasetError(f"{where}: unknown label {rec['label']!r}; use one of {', '.join(LABELS)}")
        category = _str_or_none(rec.get("category")) or DEFAULT_CATEGORY
        split = _str_or_none(rec.get("split"))
        if split is None:
            if builtin:
                raise DatasetError(f"{where}: built-in record has no split; regenerate the dataset file")
            split = default_split(text)
        split = split.lower()
        if split not in SPLITS:
            raise DatasetError(
                f"{where}: unknown split {rec.get('split')!r}; use 'train' or 'test' or leave it empty"
            )
        pid = _str_or_none(rec.get("id"))
        pid = pid if pid is not None else str(index)
        if pid in seen:
            raise DatasetError(
                f"{where}: duplicate id {pid!r} (first used on line {seen[pid]}); give every record a unique id"
            )
        seen[pid] = lineno
        behaviour = _str_or_none(rec.get("behaviour")) or ("refusal" if label == "safety" else label)
        pair_id = _str_or_none(rec.get("pair_id"))
        prompts.append(Prompt(pid, text, label, category, split, behaviour, pair_id))
    return prompts


def default_split(text: str) -> str:
    """The split given to a record without one: ``train`` for 60% of texts, by a hash of the text."""
    return "train" if int(_hash(text)[:8], 16) % 100 < round(TRAIN_FRACTION * 100) else "test"


def _str_or_none(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    s = str(value).strip()
    return s or None


def _check_label(label: str) -> None:
    if label not in LABELS:
        raise DatasetError(f"unknown label {label!r}; use one of {', '.join(LABELS)}")


def _hash(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


@functools.cache
def _builtin_prompts(name: str) -> tuple[Prompt, ...]:
    filename, _ = _BUILTINS[name]
    if filename is None:
        out: list[Prompt] = []
        for part in _COMPOSED[name]:
            for p in _builtin_prompts(part):
                out.append(
                    Prompt(
                        p.id, p.text, p.label, f"{p.behaviour}/{p.category}", p.split, p.behaviour, p.pair_id
                    )
                )
        return tuple(out)
    path = DATA_DIR / filename
    if not path.is_file():
        raise DatasetError(f"built-in dataset file missing: {path}; reinstall trace-interp")
    rows = _read_jsonl(path.read_text(encoding="utf-8"), path)
    return tuple(_parse_records(rows, path, builtin=True))
