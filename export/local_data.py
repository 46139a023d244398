"""A device's own labelled text: local files, read with bounded memory, tokenized once and cached.

Formats (chosen by the path):

- ``*.jsonl``: one JSON object per line, ``{"text": "...", "label": "acq"}``;
- ``*.csv``: a header row with ``text`` and ``label`` columns (other columns are ignored);
- a folder: one sub-folder per label, one UTF-8 ``.txt`` file per example (``data/acq/0001.txt``).

Labels are names. They map to the class indices of the bundle the device trains (its ``labels``); a
file with a label the bundle does not know is refused, with the labels, their counts and where the
first one stands, before anything trains. The rows are read a chunk at a time and tokenized chunk by
chunk, so the texts are never all in memory; the tokens are cached as safetensors, keyed by the
file's bytes, the tokenizer, the sequence length and the label names, so later starts read only the
cache. The examples are then split (seeded) into a local training part and a small local validation
part, on which the device evaluates each global adapter it receives (federated evaluation).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from export.data import (
    DataError,
    TokenizedSplit,
    default_cache_dir,
    save_atomically,
    tokenize_texts,
    tokenizer_fingerprint,
)

FORMAT = 1  # of the cached tokens; bump when their layout changes
FORMATS = ("jsonl", "csv", "folder")
CHUNK = 1024  # rows tokenized at once: what bounds the memory of a read
VALIDATION_FRACTION = 0.1
VALIDATION_MAX = 500  # a device evaluates every global on this many examples at most
SPLIT_SEED = 0


@dataclass(frozen=True)
class Row:
    """One example and where it stands (``file:line``), for error messages."""

    text: str
    label: str
    where: str


def data_format(path: Path) -> str:
    """``jsonl``, ``csv`` or ``folder`` from the path; :class:`DataError` for anything else."""
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise DataError(f"data not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise DataError(f"{path}: unknown data format {suffix!r}; use .jsonl, .csv or a folder per label")


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not a JSON object: {e}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{where}: expected {{"text": "...", "label": "..."}}, got {line[:80]!r}')
            label = record.get("label")
            if not isinstance(label, str | int) or isinstance(label, bool):
                raise DataError(f"{where}: the label must be a name (a string), got {label!r}")
            yield Row(record["text"], str(label), where)


def _csv_rows(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "text" not in columns or "label" not in columns:
            raise DataError(f"{path}: the header row needs the columns text and label, got {columns}")
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if record["text"] is None or record["label"] is None:
                raise DataError(f"{where}: a row without its text or label")
            yield Row(record["text"], record["label"].strip(), where)


def _folder_rows(path: Path) -> Iterator[Row]:
    labels = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not labels:
        raise DataError(f"{path}: a data folder holds one sub-folder per label, found none")
    for folder in labels:
        for file in sorted(folder.glob("*.txt")):
            yield Row(file.read_text(encoding="utf-8"), folder.name, str(file))


def read_rows(path: str | Path) -> Iterator[Row]:
    """The examples of a data file or folder, one at a time (see the module docstring)."""
    p = Path(path)
    kind = data_format(p)
    rows = {"jsonl": _jsonl_rows, "csv": _csv_rows, "folder": _folder_rows}[kind]
    try:
        yield from rows(p)
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise DataError(f"{p}: not valid CSV: {e}") from None


def data_digest(path: str | Path) -> str:
    """SHA-256 of a data file's bytes (a folder: of its label folders' file names and bytes)."""
    p = Path(path)
    h = hashlib.sha256(data_format(p).encode())
    files = [p] if p.is_file() else sorted(p.glob("*/*.txt"))
    for file in files:
        h.update(str(file.relative_to(p) if file != p else "").encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _check_labels(path: Path, classes: Sequence[str]) -> Counter[str]:
    """Count the examples per label; refuse labels outside ``classes``, naming them."""
    counts: Counter[str] = Counter()
    first: dict[str, str] = {}
    for row in read_rows(path):
        counts[row.label] += 1
        first.setdefault(row.label, row.where)
    unknown = sorted(set(counts) - set(classes))
    if unknown:
        named = ", ".join(f"{x!r} ({counts[x]} examples, first at {first[x]})" for x in unknown)
        raise DataError(
            f"{path}: labels the bundle does not have: {named}; the bundle's labels are {list(classes)}"
        )
    if sum(counts.values()) < 2:
        raise DataError(f"{path}: {sum(counts.values())} examples; a device needs at least 2")
    return counts


def _tokenize_rows(path: Path, tokenizer: Any, max_len: int, classes: Sequence[str]) -> TokenizedSplit:
    index = {name: i for i, name in enumerate(classes)}
    parts: list[TokenizedSplit] = []
    texts: list[str] = []
    labels: list[int] = []

    def flush() -> None:
        parts.append(tokenize_texts(tokenizer, texts, np.array(labels, dtype=np.int64), max_len))
        texts.clear()
        labels.clear()

    for row in read_rows(path):
        texts.append(row.text)
        labels.append(index[row.label])
        if len(texts) == CHUNK:
            flush()
    if texts:
        flush()
    return TokenizedSplit(
        torch.cat([p.input_ids for p in parts]),
        torch.cat([p.attention_mask for p in parts]),
        torch.cat([p.labels for p in parts]),
    )


@dataclass
class LocalData:
    """A device's examples: ``train`` and ``validation`` (disjoint), and how many of each label."""

    path: Path
    classes: tuple[str, ...]
    train: TokenizedSplit
    validation: TokenizedSplit
    counts: dict[str, int]

    def describe(self) -> str:
        labels = ", ".join(f"{name} {n}" for name, n in sorted(self.counts.items()))
        sizes = f"{len(self.train)} training + {len(self.validation)} validation examples"
        return f"{self.path}: {sizes} ({labels})"


def validation_indices(n: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``(train, validation)`` indices of ``n`` examples: a seeded draw of ``VALIDATION_FRACTION``
    (at least one, at most ``VALIDATION_MAX``) for validation, the rest for training, both sorted."""
    size = min(VALIDATION_MAX, max(1, round(n * VALIDATION_FRACTION)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[size:]), np.sort(order[:size])


def load_examples(
    path: str | Path,
    tokenizer: Any,
    max_len: int,
    classes: Sequence[str],
    *,
    cache_dir: Path | None = None,
) -> TokenizedSplit:
    """Every example of a data file or folder: read, checked, tokenized, or read from the cache.

    ``classes``: the bundle's label names, in class-index order. Raises :class:`DataError` naming
    the file (and the line) for anything it cannot use.
    """
    p = Path(path)
    if not classes:
        raise DataError(
            f"{p}: the labels of local data are names, and no label names are known here: "
            "export the bundle with --labels (or give the client --labels)"
        )
    if max_len < 1:
        raise DataError(f"max_len must be >= 1, got {max_len}")
    key_fields = {
        "format": str(FORMAT),
        "data_sha256": data_digest(p),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "max_len": str(max_len),
        "classes": json.dumps(list(classes)),
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]
    directory = cache_dir if cache_dir is not None else default_cache_dir()
    cache = directory / f"tokens-local-{p.stem[:40]}-{max_len}-{key}.safetensors"
    if cache.is_file():
        tensors = load_file(cache)
        split = TokenizedSplit(tensors["input_ids"], tensors["attention_mask"], tensors["labels"])
    else:
        _check_labels(p, classes)
        split = _tokenize_rows(p, tokenizer, max_len, classes)
        directory.mkdir(parents=True, exist_ok=True)
        save_atomically(
            {"input_ids": split.input_ids, "attention_mask": split.attention_mask, "labels": split.labels},
            cache,
            key_fields,
        )
    return split


def load_local_data(
    path: str | Path,
    tokenizer: Any,
    max_len: int,
    classes: Sequence[str],
    *,
    cache_dir: Path | None = None,
) -> LocalData:
    """A device's data (see :func:`load_examples`), split into training and validation parts."""
    split = load_examples(path, tokenizer, max_len, classes, cache_dir=cache_dir)
    counts = np.bincount(split.labels.numpy(), minlength=len(classes))
    train, validation = validation_indices(len(split))
    return LocalData(
        Path(path),
        tuple(classes),
        split.subset(train),
        split.subset(validation),
        {name: int(n) for name, n in zip(classes, counts, strict=True) if n},
    )


def write_jsonl(path: str | Path, texts: Sequence[str], labels: Sequence[str]) -> Path:
    """Write examples in the JSON-lines format :func:`read_rows` reads (one ``{"text", "label"}`` a line)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for text, label in zip(texts, labels, strict=True):
            f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    return out
