"""A device's own data files: formats, label checks, chunked tokenization, the cache and the split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from export import local_data
from export.data import DataError, check_tokenizer, tokenize_texts, tokenizer_settings
from export.local_data import load_local_data, read_rows, validation_indices, write_jsonl
from export.models import load_tokenizer

CLASSES = ("acq", "crude", "earn")
TEXTS = [f"example number {i} about {CLASSES[i % 3]}" for i in range(30)]
LABELS = [CLASSES[i % 3] for i in range(30)]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer()


def write_csv(path: Path, texts: list[str], labels: list[str]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "text"])  # other columns and any order are fine
        for i, (t, label) in enumerate(zip(texts, labels, strict=True)):
            w.writerow([i, label, t])
    return path


def write_folder(root: Path, texts: list[str], labels: list[str]) -> Path:
    for i, (t, label) in enumerate(zip(texts, labels, strict=True)):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i:04d}.txt").write_text(t, encoding="utf-8")
    return root


def test_jsonl_csv_and_folder_give_the_same_examples(tokenizer: Any, tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "d.jsonl", TEXTS, LABELS)
    csv_file = write_csv(tmp_path / "d.csv", TEXTS, LABELS)
    folder = write_folder(tmp_path / "folder", TEXTS, LABELS)
    loaded = [
        load_local_data(p, tokenizer, 16, CLASSES, cache_dir=tmp_path / "cache") for p in (jsonl, csv_file)
    ]
    assert all(torch.equal(loaded[0].train.input_ids, d.train.input_ids) for d in loaded)
    assert loaded[0].counts == {"acq": 10, "crude": 10, "earn": 10}
    # A folder is read label by label: the same examples in another order.
    by_folder = sorted((r.label, r.text) for r in read_rows(folder))
    assert by_folder == sorted(zip(LABELS, TEXTS, strict=True))


def test_labels_outside_the_bundle_are_refused_by_name(tokenizer: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*TEXTS, "x", "y", "z"], [*LABELS, "ship", "grain", "ship"])
    with pytest.raises(DataError) as info:
        load_local_data(path, tokenizer, 16, CLASSES, cache_dir=tmp_path)
    message = str(info.value)
    assert "labels the bundle does not have: 'grain' (1 examples, first at" in message
    assert "'ship' (2 examples, first at " + f"{path}:31)" in message
    assert "the bundle's labels are ['acq', 'crude', 'earn']" in message
    assert not list(tmp_path.glob("tokens-*"))  # nothing cached


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("d.jsonl", '{"text": "a", "label": "acq"}\nnot json\n', r"d.jsonl:2: not a JSON object"),
        ("d.jsonl", '{"label": "acq"}\n', r'd.jsonl:1: expected {"text": "...", "label": "..."}'),
        ("d.jsonl", '{"text": "a", "label": true}\n', r"d.jsonl:1: the label must be a name"),
        ("d.csv", "text,category\na,acq\n", r"the header row needs the columns text and label"),
        ("d.txt", "a\n", r"unknown data format '.txt'"),
        ("d.jsonl", '{"text": "a", "label": "acq"}\n', r"1 examples; a device needs at least 2"),
    ],
)
def test_bad_files_are_named_with_the_line(
    tokenizer: Any, tmp_path: Path, name: str, content: str, expected: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        load_local_data(path, tokenizer, 16, CLASSES, cache_dir=tmp_path)


def test_missing_data_and_missing_label_names(tokenizer: Any, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data not found"):
        load_local_data(tmp_path / "nope.jsonl", tokenizer, 16, CLASSES, cache_dir=tmp_path)
    path = write_jsonl(tmp_path / "d.jsonl", TEXTS, LABELS)
    with pytest.raises(DataError, match="export the bundle with --labels"):
        load_local_data(path, tokenizer, 16, (), cache_dir=tmp_path)


def test_tokenized_in_chunks_once_then_read_from_the_cache(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_data, "CHUNK", 7)  # 30 rows: 5 chunks, the texts never all in memory
    calls: list[int] = []

    def counting(tok: Any, texts: list[str], labels: np.ndarray, max_len: int) -> Any:
        calls.append(len(texts))
        return tokenize_texts(tok, texts, labels, max_len)

    monkeypatch.setattr(local_data, "tokenize_texts", counting)
    path = write_jsonl(tmp_path / "d.jsonl", TEXTS, LABELS)
    first = load_local_data(path, tokenizer, 16, CLASSES, cache_dir=tmp_path / "cache")
    assert calls == [7, 7, 7, 7, 2]
    whole = tokenize_texts(tokenizer, TEXTS, np.array([CLASSES.index(x) for x in LABELS]), 16)
    again = load_local_data(path, tokenizer, 16, CLASSES, cache_dir=tmp_path / "cache")
    assert calls == [7, 7, 7, 7, 2]  # the second start read the cache
    train, validation = validation_indices(30)
    assert torch.equal(again.train.input_ids, whole.input_ids[train])
    assert torch.equal(first.validation.labels, whole.labels[validation])
    path.write_text(path.read_text().replace("number 3 ", "number three "))  # other bytes: another key
    load_local_data(path, tokenizer, 16, CLASSES, cache_dir=tmp_path / "cache")
    assert len(calls) == 10


def test_validation_is_a_small_disjoint_part() -> None:
    for n in (2, 9, 30, 1000, 20_000):
        train, validation = validation_indices(n)
        assert len(validation) == min(local_data.VALIDATION_MAX, max(1, round(n * 0.1)))
        assert sorted([*train, *validation]) == list(range(n))


def test_a_bundle_records_its_tokenizer_and_a_device_checks_it(tokenizer: Any) -> None:
    settings = tokenizer_settings(tokenizer, 64)
    assert settings["max_length"] == 64 and len(settings["fingerprint"]) == 64
    check_tokenizer(settings, tokenizer, "bundles/r8")
    with pytest.raises(DataError, match="bundles/r8: this device's tokenizer is not the one"):
        check_tokenizer({**settings, "fingerprint": "0" * 64}, tokenizer, "bundles/r8")
    check_tokenizer({}, tokenizer, "an old bundle")  # nothing recorded: nothing to check


def test_written_files_are_json_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sub" / "d.jsonl", ["caf\u00e9"], ["acq"])
    assert json.loads(path.read_text(encoding="utf-8")) == {"text": "caf\u00e9", "label": "acq"}
