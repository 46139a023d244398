"""Trainer backends: what trains the adapter on a device.

Every backend offers ``set_trainable(state)``, ``train(batches, budget) -> TrainMetrics`` and
``get_trainable() -> state``. ``eager`` (this module) trains with torch and any optimizer;
``executorch`` (``edge_client.executorch_trainer``) runs the exported training program with the
runtime's SGD. Both compute the same numbers on the same inputs within float tolerance.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from export.base_delta import applied_base_delta
from export.evaluation import Batch, EvalMetrics, evaluate_metrics, model_inputs
from export.ravan import set_trainable_heads
from export.state import State, load_trainable_state, trainable_state


class StepBudget(Protocol):
    """The part of a device budget a trainer needs."""

    @property
    def local_steps(self) -> int: ...


@dataclass
class TrainMetrics:
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    # The received global on the local validation part, before training (federated evaluation).
    evaluation: EvalMetrics | None = None

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


class Trainer(Protocol):
    def set_trainable(self, state: State) -> None: ...

    def select_heads(self, heads: list[int] | None) -> None:
        """Ravan: train only these heads this round (``None``: all)."""

    def train(self, batches: Iterable[Batch], budget: StepBudget) -> TrainMetrics: ...

    def get_trainable(self) -> State: ...


@dataclass(frozen=True)
class OptimizerConfig:
    """Local optimizer. ``sgd`` matches what the ExecuTorch runtime offers (momentum, weight decay)."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.name!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


class EagerTrainer:
    """Trains a model's trainable parameters with torch.

    A fresh optimizer is made for every ``train`` call: a round starts from the global adapter, and
    momentum carried across rounds would leak one round's direction into the next global state.
    ``keep_optimizer`` keeps one optimizer for every call instead (centralized training in chunks).
    """

    def __init__(
        self, model: nn.Module, optimizer: OptimizerConfig | None = None, keep_optimizer: bool = False
    ):
        self.model = model
        self.opt_config = optimizer or OptimizerConfig()
        self.keep_optimizer = keep_optimizer
        self._kept: torch.optim.Optimizer | None = None

    def set_trainable(self, state: State) -> None:
        load_trainable_state(self.model, state)

    def get_trainable(self) -> State:
        return trainable_state(self.model)

    def select_heads(self, heads: list[int] | None) -> None:
        set_trainable_heads(self.model, heads)

    def base_delta(self, delta: State) -> AbstractContextManager[None]:
        """A coordinator-side change of the frozen base, applied for the ``with`` block."""
        return applied_base_delta(self.model, delta)

    def _optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        c = self.opt_config
        if c.name == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)

    def evaluate(self, batches: Iterable[Batch]) -> EvalMetrics:
        """The current adapter on ``batches`` (no training)."""
        return evaluate_metrics(self.model, batches)

    def train(self, batches: Iterable[Batch], budget: StepBudget) -> TrainMetrics:
        if self.keep_optimizer:
            self._kept = self._kept or self._optimizer()
        opt = self._kept or self._optimizer()
        metrics = TrainMetrics()
        start = time.perf_counter()
        it: Iterator[Batch] = iter(batches)
        for _ in range(budget.local_steps):
            batch = next(it, None)
            if batch is None:
                break
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(self.model(**model_inputs(batch)), batch["labels"])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at local step {metrics.steps}")
            loss.backward()
            opt.step()
            metrics.steps += 1
            metrics.examples += int(batch["labels"].shape[0])
            metrics.losses.append(float(loss.detach()))
        metrics.seconds = time.perf_counter() - start
        return metrics
