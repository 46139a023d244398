"""Scaled averaging, FedRPCA's motivating baselines (METHODS.md 3.2, 5): ``X <- X + beta * mean(Delta X)``.

Per LoRA factor ``X in {A, B}`` of every layer, ``Delta X_u = X_u - X^t``. ``task_arithmetic`` uses a
constant (or scheduled) ``beta``; ``fedexp`` the FedExP rule computed over the whole adapter
update ``Delta`` (every LoRA factor of every layer, as FedExP does over the model vector)::

    beta_t = max(1, sum_u p_u ||Delta_u||^2 / (2 ||sum_u p_u Delta_u||^2 + eps))

which with ``p_u = 1/K`` is FedExP's ``sum_u ||Delta_u||^2 / (2 K ||Delta_bar||^2 + eps)``. Dense
tensors (a fresh classifier) are plain FedAvg, as for every method. ``beta = 1`` is FedIT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from coordinator.aggregators.base import AggregationError, Aggregator, ClientUpdate, MethodOptions
from coordinator.divergence import lora_divergence
from export.state import State


class ScaledAveraging(Aggregator):
    """``X + beta * sum_u p_u (X_u - X)`` on the LoRA factors; subclasses choose ``beta``."""

    def beta(self, global_state: State, updates: list[ClientUpdate], p: torch.Tensor) -> float:
        """This round's server step size."""
        raise NotImplementedError

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        p, out = self.begin_round(global_state, updates)
        beta = self.beta(global_state, updates, p)
        p64 = p.double()
        for batch in self.lora_batches(global_state, updates):
            a_old, b_old = batch.a_global.double(), batch.b_global.double()
            a_new = a_old + beta * torch.einsum("u,lurk->lrk", p64, batch.a.double() - a_old.unsqueeze(1))
            b_new = b_old + beta * torch.einsum("u,ludr->ldr", p64, batch.b.double() - b_old.unsqueeze(1))
            batch.store(out, a_new, b_new)
            self.record_divergence(batch.prefixes, lora_divergence(b_new, a_new, batch.b, batch.a, p))
        self.metrics["beta"] = beta
        self.round_index += 1
        return out


@dataclass(frozen=True)
class TaskArithmeticOptions(MethodOptions):
    """Task-Arithmetic's options.

    Parameters
    ----------
    beta : float or callable
        A constant, or ``beta(round_index)``. Default 2, one point of METHODS.md's grid {1, 2, 4, 8, K}.
    """

    beta: float | Callable[[int], float] = 2.0

    def __post_init__(self) -> None:
        if not callable(self.beta) and not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")


class TaskArithmetic(ScaledAveraging):
    """Task-Arithmetic scaled averaging, with :class:`TaskArithmeticOptions`."""

    name = "task_arithmetic"
    Options = TaskArithmeticOptions
    options: TaskArithmeticOptions

    def beta(self, global_state: State, updates: list[ClientUpdate], p: torch.Tensor) -> float:
        beta = self.options.beta
        value = beta(self.round_index) if callable(beta) else beta
        if not isinstance(value, int | float) or not value > 0:
            raise AggregationError(f"beta({self.round_index}) returned {value!r}, not a positive number")
        return float(value)


@dataclass(frozen=True)
class FedExPOptions(MethodOptions):
    """FedExP's options.

    Parameters
    ----------
    eps : float
        FedExP's ``epsilon`` (its paper's 1e-3), keeping ``beta`` bounded when the mean update vanishes.
    """

    eps: float = 1e-3

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")


class FedExP(ScaledAveraging):
    """FedExP's adaptive server step over the adapter update, with :class:`FedExPOptions`."""

    name = "fedexp"
    Options = FedExPOptions
    options: FedExPOptions

    def beta(self, global_state: State, updates: list[ClientUpdate], p: torch.Tensor) -> float:
        p64 = p.double()
        spread = torch.zeros((), dtype=torch.float64, device=self.device)
        mean2 = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in self.lora_batches(global_state, updates):  # a first pass: norms only
            for x, x_old in ((batch.a, batch.a_global), (batch.b, batch.b_global)):
                delta = (x.double() - x_old.double().unsqueeze(1)).flatten(2)  # (L, U, D)
                spread += (delta.square().sum(-1) @ p64).sum()
                mean2 += torch.einsum("u,lud->ld", p64, delta).square().sum()
        return max(1.0, float(spread / (2 * mean2 + self.options.eps)))
