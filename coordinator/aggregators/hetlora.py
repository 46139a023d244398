"""HetLoRA: zero-pad heterogeneous ranks, sparsity-weighted average of the factors (METHODS.md 5).

A rank-``r_k`` client downloads the first ``r_k`` components of the global rank-``r`` adapter and
uploads its own rank-``r_k`` pair; the server zero-pads every pair to ``r`` (which keeps each
client's product) and averages the factors with weights ``w_k ∝ ||B_k A_k||_F`` per layer (the
spec's rule; data sizes do not enter, and ``w = p`` when every product is zero). Inexact: the
divergence compares with the data-weighted ``sum_k p_k B_k A_k`` like every method's. The clients'
rank self-pruning regulariser is not implemented (the server side does not depend on it).
"""

from __future__ import annotations

import torch

from coordinator.aggregators.base import ClientUpdate
from coordinator.aggregators.ranks import HeterogeneousRankAggregator, pad_updates
from coordinator.divergence import lora_divergence, lowrank_fro2
from export.state import State


def sparsity_weights(bs: torch.Tensor, as_: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``w[l, u] = ||B_u A_u||_F / sum_v ||B_v A_v||_F`` for (L, U, d, r) and (L, U, r, k); rows sum to 1.

    A layer whose products are all zero gets ``fallback`` (U,).
    """
    norms = lowrank_fro2(bs, as_).sqrt()  # (L, U)
    total = norms.sum(1, keepdim=True)
    return torch.where(total > 0, norms / total.clamp_min(torch.finfo(torch.float64).tiny), fallback.double())


class HetLoRA(HeterogeneousRankAggregator):
    name = "hetlora"

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        p, out = self.begin_round(global_state, updates)
        for batch in self.lora_batches(global_state, pad_updates(global_state, updates)):
            w = sparsity_weights(batch.b, batch.a, p)
            a_new = torch.einsum("lu,lurk->lrk", w, batch.a.double())
            b_new = torch.einsum("lu,ludr->ldr", w, batch.b.double())
            batch.store(out, a_new, b_new)
            self.record_divergence(batch.prefixes, lora_divergence(b_new, a_new, batch.b, batch.a, p))
        return out
