"""FedRPCA: robust-PCA aggregation of the LoRA factors (METHODS.md 3).

Per adapted layer and separately for ``X in {A, B}``: the client deltas ``X_u - X^t`` are the columns
of ``M`` (``D x K``), principal component pursuit splits ``M = L + S`` into a low-rank common part
and a sparse client-specific part, and ``X^{t+1} = X^t + sum_u p_u L_u + beta sum_u p_u S_u``.
With ``beta = 1`` this is exactly FedIT. All same-shaped problems of a round (both factors of every
layer when ``r k = d r``) are solved in one batched PCP (:mod:`coordinator.rpca`), in batches bounded
by ``chunk_bytes``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from coordinator.aggregators.base import AggregationError, Aggregator, ClientUpdate, MethodOptions
from coordinator.divergence import lora_divergence
from coordinator.rpca import pcp
from export.state import State

Beta = float | Callable[[int], float] | Literal["adaptive"]


@dataclass(frozen=True)
class FedRPCAOptions(MethodOptions):
    """FedRPCA's options.

    Parameters
    ----------
    lam : float or None
        PCP weight of the sparse term; ``None`` = ``1 / sqrt(max(D, K))`` per problem [ours].
    beta : float, callable or "adaptive"
        Scale of the sparse part's mean: a constant, ``beta(round_index)``, or the FedExP-style rule
        ``max(1, sum_u p_u ||S_u||^2 / (||sum_u p_u S_u||^2 + eps))`` per layer and factor [ours].
        The default 2 is one point of METHODS.md's grid {1, 2, 4, 8, K}; 1 is FedIT.
    tol, max_iter : float, int
        PCP stopping rule: ``||M - L - S||_F / ||M||_F < tol`` or ``max_iter`` iterations.
    """

    lam: float | None = None
    beta: Beta = 2.0
    tol: float = 1e-7
    max_iter: int = 1000

    def __post_init__(self) -> None:
        if self.lam is not None and not self.lam > 0:
            raise ValueError(f"lam must be positive, got {self.lam}")
        if isinstance(self.beta, str) and self.beta != "adaptive":
            raise ValueError(f"beta must be a number, a callable or 'adaptive', got {self.beta!r}")
        if not self.tol > 0 or self.max_iter < 1:
            raise ValueError(f"need tol > 0 and max_iter >= 1, got {self.tol}, {self.max_iter}")


class FedRPCA(Aggregator):
    """FedRPCA on the coordinator, with :class:`FedRPCAOptions`."""

    name = "fedrpca"
    work_copies = 10.0  # M, L, S, W, E and temporaries of the PCP, float64
    Options = FedRPCAOptions
    options: FedRPCAOptions

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        p, out = self.begin_round(global_state, updates)
        self._ranks: list[float] = []
        self._sparsity: list[float] = []
        iterations: list[float] = []
        betas: list[float] = []
        for batch in self.lora_batches(global_state, updates):
            n_layers, n_clients = batch.a.shape[:2]
            # Deltas as (L, D, K) matrices whose columns are the clients' flattened deltas.
            m_a = (batch.a - batch.a_global.unsqueeze(1)).reshape(n_layers, n_clients, -1).transpose(1, 2)
            m_b = (batch.b - batch.b_global.unsqueeze(1)).reshape(n_layers, n_clients, -1).transpose(1, 2)
            if m_a.shape == m_b.shape:  # square layers: both factors in one batched solve
                step_a, step_b = self._steps(torch.cat([m_a, m_b]), p, iterations, betas).split(n_layers)
            else:
                step_a = self._steps(m_a, p, iterations, betas)
                step_b = self._steps(m_b, p, iterations, betas)
            a_new = batch.a_global.double() + step_a.reshape(batch.a_global.shape)
            b_new = batch.b_global.double() + step_b.reshape(batch.b_global.shape)
            batch.store(out, a_new, b_new)
            self.record_divergence(batch.prefixes, lora_divergence(b_new, a_new, batch.b, batch.a, p))
        if iterations:
            self.metrics["rpca/iterations"] = sum(iterations) / len(iterations)
            self.metrics["rpca/beta"] = sum(betas) / len(betas)
            self.metrics["rpca/rank"] = sum(self._ranks) / len(self._ranks)
            self.metrics["rpca/sparse_share"] = sum(self._sparsity) / len(self._sparsity)
        self.round_index += 1
        return out

    def _steps(
        self, m: torch.Tensor, p: torch.Tensor, iterations: list[float], betas: list[float]
    ) -> torch.Tensor:
        """``sum_u p_u L_u + beta sum_u p_u S_u`` for each (D, K) problem of ``m`` (P, D, K): (P, D)."""
        opts = self.options
        result = pcp(m, opts.lam, tol=opts.tol, max_iter=opts.max_iter)
        p64 = p.double()
        low_mean = result.low_rank @ p64
        sparse_mean = result.sparse @ p64
        beta = self._beta(result.sparse, sparse_mean, p64)
        iterations.extend(result.iterations.double().tolist())
        betas.extend(beta.tolist())
        # The split, for the dashboard: the rank of each L (torch's default tolerance, max(D, K) * eps
        # * sigma_max) and the share of S's entries that are not zero (soft thresholding zeroes exactly).
        self._ranks.extend(torch.linalg.matrix_rank(result.low_rank).double().tolist())
        self._sparsity.extend((result.sparse != 0).double().mean(dim=(1, 2)).tolist())
        return low_mean + beta[:, None] * sparse_mean

    def _beta(self, sparse: torch.Tensor, sparse_mean: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        n = sparse.shape[0]
        beta = self.options.beta
        if beta == "adaptive":
            spread = sparse.square().sum(1) @ p  # sum_u p_u ||S_u||^2
            mean2 = sparse_mean.square().sum(1)
            eps = 1e-12 * spread + torch.finfo(torch.float64).tiny
            return torch.clamp(spread / (mean2 + eps), min=1.0)
        value = beta(self.round_index) if callable(beta) else beta
        if not isinstance(value, int | float):
            raise AggregationError(f"beta({self.round_index}) returned {value!r}, not a number")
        return torch.full((n,), float(value), dtype=torch.float64, device=sparse.device)
