"""FedEx-LoRA: FedAvg on the factors plus the residual folded into a versioned base (METHODS.md 5).

``A_bar = sum_u p_u A_u``, ``B_bar = sum_u p_u B_u`` and the residual ``R = sum_u p_u B_u A_u -
B_bar A_bar``, kept factored as ``[B_1 .. B_U, B_bar] [p_1 A_1; ..; p_U A_U; -A_bar]`` (rank at
most ``(U + 1) r``), is added to the frozen base as ``gamma R`` (``gamma = alpha / r``). The base
delta travels with the adapter (export.state's ``base_delta`` keys, compacted to dense ``d x k``
once that is smaller) and clients continue from ``(A_bar, B_bar)``. The effective weight
``W0' + gamma B_bar A_bar`` then equals the exact average, so the recorded divergence (adapter plus
this round's base change against ``sum_u p_u B_u A_u``) is zero up to float error.
The reference code uses plain means: ``weighting="uniform"``.
"""

from __future__ import annotations

import torch

from coordinator.aggregators.base import Aggregator, ClientUpdate
from coordinator.divergence import lora_divergence, stacked_factors
from coordinator.versioned_base import bump_version, merge_into_base
from export.state import State


def residual_factors(
    b_hat: torch.Tensor, a_hat: torch.Tensor, bs: torch.Tensor, as_: torch.Tensor, p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``R = sum_u p_u B_u A_u - b_hat a_hat`` as ``(L, d, (U+1) r) @ (L, (U+1) r, k)`` factors."""
    b_cat, a_cat = stacked_factors(bs, as_, p)
    return torch.cat([b_cat, b_hat.double()], dim=2), torch.cat([a_cat, -a_hat.double()], dim=1)


class FedExLoRA(Aggregator):
    name = "fedex_lora"
    changes_base = True

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        p, out = self.begin_round(global_state, updates)
        for batch in self.lora_batches(global_state, updates):
            p64 = p.double()
            a64, b64 = batch.a.double(), batch.b.double()
            a_hat = torch.einsum("u,lurk->lrk", p64, a64)
            b_hat = torch.einsum("u,ludr->ldr", p64, b64)
            b_res, a_res = residual_factors(b_hat, a_hat, b64, a64, p64)
            batch.store(out, a_hat, b_hat)
            for i, prefix in enumerate(batch.prefixes):
                merge_into_base(out, prefix, self.spec.scaling * b_res[i], a_res[i])
            effective_b = torch.cat([b_hat, b_res], dim=2)
            effective_a = torch.cat([a_hat, a_res], dim=1)
            self.record_divergence(batch.prefixes, lora_divergence(effective_b, effective_a, b64, a64, p))
        bump_version(out, global_state)
        return out
