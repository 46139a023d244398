"""FedIT: FedAvg on the LoRA factors, ``A = sum_u p_u A_u`` and ``B = sum_u p_u B_u`` (METHODS.md 5).

The baseline every other method is measured against. Inexact: ``mean(B) mean(A) != mean(B A)``; the
gap is reported per layer as ``divergence``.
"""

from __future__ import annotations

import torch

from coordinator.aggregators.base import Aggregator, ClientUpdate
from coordinator.divergence import lora_divergence
from export.state import State


class FedIT(Aggregator):
    name = "fedit"

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        p, out = self.begin_round(global_state, updates)
        for batch in self.lora_batches(global_state, updates):
            pf = p.to(batch.a.dtype)
            a_hat = torch.einsum("u,lurk->lrk", pf, batch.a)
            b_hat = torch.einsum("u,ludr->ldr", pf, batch.b)
            batch.store(out, a_hat, b_hat)
            self.record_divergence(batch.prefixes, lora_divergence(b_hat, a_hat, batch.b, batch.a, p))
        return out
