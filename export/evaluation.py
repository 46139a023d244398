"""A model on batches: its keyword arguments from a batch, and accuracy and loss over held-out batches.

Shared by every side that evaluates an adapted model: the device's trainers (federated evaluation of
the received global), the coordinator (``--eval-data``) and the simulator, so that all of them count
an example, a correct prediction and a loss the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


def model_inputs(batch: Batch) -> dict[str, torch.Tensor | int]:
    """The model's keyword arguments from a batch (raw tokens, or cached hidden states + start layer)."""
    if "hidden" in batch:
        return {
            "hidden": batch["hidden"],
            "attention_mask": batch["attention_mask"],
            "start_layer": int(batch["start_layer"]),
        }
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@dataclass(frozen=True)
class EvalMetrics:
    """Accuracy and mean loss over ``examples`` held-out examples."""

    accuracy: float
    loss: float
    examples: int


class EvalTally:
    """Sums of correct predictions and losses, batch by batch (every backend evaluates with it)."""

    def __init__(self) -> None:
        self.correct, self.total, self.loss_sum = 0, 0, 0.0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        self.correct += int((logits.argmax(-1) == labels).sum())
        self.total += int(labels.shape[0])

    def merge(self, other: EvalTally) -> None:
        """Adds ``other``'s sums: merging per-batch tallies in batch order gives the very numbers
        :meth:`add` gives batch by batch."""
        self.loss_sum += other.loss_sum
        self.correct += other.correct
        self.total += other.total

    def result(self) -> EvalMetrics:
        if self.total == 0:
            raise ValueError("cannot evaluate on zero examples")
        return EvalMetrics(self.correct / self.total, self.loss_sum / self.total, self.total)


@torch.no_grad()
def evaluate_metrics(model: nn.Module, batches: Iterable[Batch]) -> EvalMetrics:
    """Accuracy, mean loss and count of ``model`` over ``batches``."""
    tally = EvalTally()
    for batch in batches:
        tally.add(model(**model_inputs(batch)), batch["labels"])
    return tally.result()


@torch.no_grad()
def batch_tallies(model: nn.Module, batches: Iterable[Batch]) -> list[EvalTally]:
    """One tally per batch (for scoring shares of the batches on several threads)."""
    tallies = []
    for batch in batches:
        tally = EvalTally()
        tally.add(model(**model_inputs(batch)), batch["labels"])
        tallies.append(tally)
    return tallies


def evaluate(model: nn.Module, batches: Iterable[Batch]) -> tuple[float, float]:
    """(accuracy, mean loss) of ``model`` over ``batches``."""
    metrics = evaluate_metrics(model, batches)
    return metrics.accuracy, metrics.loss
