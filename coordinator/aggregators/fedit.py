"""FedIT: FedAvg on the LoRA factors, ``A = sum_u p_u A_u`` and ``B = sum_u p_u B_u`` (METHODS.md 5).

The baseline every other method is measured against. Inexact: ``mean(B) mean(A) != mean(B A)``; the
gap is reported per layer as ``divergence``.
"""

from __future__ import annotations

import torch

from coordinator.aggregators.base import Aggregator, ClientUpdate
from coordinator.divergence import lora_divergence
from export.state import State, layout


class FedIT(Aggregator):
    name = "fedit"

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        p = self.weights(updates)
        out = dict(global_state)
        out.update(self.average_dense(global_state, updates, p))
        divergences = []
        for prefix, (a_key, b_key) in layout(updates[0].state).lora.items():
            a_all, b_all = self.stacked(updates, a_key), self.stacked(updates, b_key)
            pf = p.to(a_all.dtype)
            out[a_key] = torch.tensordot(pf, a_all, dims=1)
            out[b_key] = torch.tensordot(pf, b_all, dims=1)
            div = lora_divergence(out[b_key], out[a_key], b_all, a_all, pf)
            self.metrics[f"divergence/{prefix}"] = float(div)
            divergences.append(float(div))
        if divergences:
            self.metrics["divergence"] = sum(divergences) / len(divergences)
        return out
