"""FLoRA-NA: nearly accurate aggregation by learned client coefficients (METHODS.md 4).

Per adapted layer the server finds ``p, q`` minimising ``||(sum p_u B_u)(sum q_u A_u) - T||_F^2``
with ``T = sum_u pi_u B_u A_u`` and broadcasts ``B_hat = sum p_u B_u``, ``A_hat = sum q_u A_u``:
the same download size as FedIT, and never a larger divergence. The solvers are in
:mod:`coordinator.flora_na_solver`; same-shaped layers are solved together in batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from coordinator.aggregators.base import Aggregator, ClientUpdate, MethodOptions
from coordinator.divergence import exact_fro2, lora_divergence
from coordinator.flora_na_solver import Coefficients, solve_als, solve_dense
from export.state import State

Solver = Literal["als", "dense"]
Gauge = Literal["sum_q", "balanced", "none"]


@dataclass(frozen=True)
class FloraNAOptions(MethodOptions):
    """FLoRA-NA's options.

    Parameters
    ----------
    solver : {"als", "dense"}
        ``als``: alternating least squares in trace form [ours]; ``dense``: Adam on (p, q) against
        the dense ``d x k`` residual (the slow reference).
    sweeps, tol : int, float
        ALS stops after ``sweeps`` (p, q) sweeps or when the objective falls by less than ``tol``
        (relative) in a sweep (METHODS.md: 5-20 sweeps, 1e-6).
    ridge : float
        Ridge ``ridge * mean(diag G)`` added to the normal equations, which are singular when
        clients are alike [ours].
    gauge : {"sum_q", "balanced", "none"}
        ``(c p, q / c)`` gives the same product; ``sum_q`` picks ``sum q_u = 1`` (so identical
        clients get back their own factors), ``balanced`` ``||B_hat||_F = ||A_hat||_F`` [ours].
    dense_steps, dense_lr : int, float
        Adam steps and relative step size of the ``dense`` solver.
    """

    solver: Solver = "als"
    sweeps: int = 10
    tol: float = 1e-6
    ridge: float = 1e-10
    gauge: Gauge = "sum_q"
    dense_steps: int = 300
    dense_lr: float = 1e-2

    def __post_init__(self) -> None:
        if self.solver not in ("als", "dense"):
            raise ValueError(f"solver must be 'als' or 'dense', got {self.solver!r}")
        if self.gauge not in ("sum_q", "balanced", "none"):
            raise ValueError(f"gauge must be 'sum_q', 'balanced' or 'none', got {self.gauge!r}")
        if (
            self.sweeps < 1
            or self.dense_steps < 0
            or not self.tol >= 0
            or not self.ridge >= 0
            or not self.dense_lr > 0
        ):
            raise ValueError("need sweeps >= 1, dense_steps >= 0, tol >= 0, ridge >= 0, dense_lr > 0")


class FloraNA(Aggregator):
    """FLoRA-NA on the coordinator, with :class:`FloraNAOptions`."""

    name = "flora_na"
    work_copies = 4.0
    Options = FloraNAOptions
    options: FloraNAOptions

    def setup(self) -> None:
        self.last_coefficients: list[Coefficients] = []  # per batch, for inspection and tests

    def extra_scalars_per_layer(self, d: int, k: int) -> int:
        """The dense solver holds the target, the residual and a product, each ``d x k``."""
        return 3 * d * k if self.options.solver == "dense" else 0

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        p, out = self.begin_round(global_state, updates)
        self.last_coefficients = []
        ratios: list[float] = []
        for batch in self.lora_batches(global_state, updates):
            bs, as_, pi = batch.b.double(), batch.a.double(), p.double()
            target2 = exact_fro2(bs, as_, pi)
            opts = self.options
            if opts.solver == "als":
                coef = solve_als(bs, as_, pi, target2, sweeps=opts.sweeps, tol=opts.tol, ridge=opts.ridge)
            else:
                coef = solve_dense(bs, as_, pi, steps=opts.dense_steps, lr=opts.dense_lr)
            self.last_coefficients.append(coef)
            b_hat, a_hat = self._gauged(coef, bs, as_)
            batch.store(out, a_hat, b_hat)
            self.record_divergence(batch.prefixes, lora_divergence(b_hat, a_hat, bs, as_, pi, target2))
            fedit = coef.history[0].clamp_min(torch.finfo(torch.float64).tiny)
            ratios.extend((coef.objective / fedit).tolist())
        if ratios:
            self.metrics["flora_na/objective_vs_fedit"] = sum(ratios) / len(ratios)
        return out

    def _gauged(
        self, coef: Coefficients, bs: torch.Tensor, as_: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``B_hat, A_hat`` after fixing the free scale ``c`` of ``(c p, q / c)``."""
        b_hat = torch.einsum("lu,ludr->ldr", coef.p, bs)
        a_hat = torch.einsum("lu,lurk->lrk", coef.q, as_)
        if self.options.gauge == "none":
            return b_hat, a_hat
        if self.options.gauge == "sum_q":
            c = coef.q.sum(-1)
            ok = c.abs() > 1e-12
        else:
            norm_b, norm_a = b_hat.flatten(1).norm(dim=1), a_hat.flatten(1).norm(dim=1)
            ok = (norm_b > 0) & (norm_a > 0)
            c = (norm_a / torch.where(ok, norm_b, 1.0)).sqrt()
        # a degenerate scale (sum q = 0, a zero factor) leaves the factors as they are
        c = torch.where(ok, c, torch.ones_like(c))
        return b_hat * c[:, None, None], a_hat / c[:, None, None]
