"""FlexLoRA: SVD of the exact average, each client gets its Eckart-Young rank-``r_k`` part (METHODS.md 5).

``Delta W = sum_k p_k B_k A_k = U S V^T``; the global adapter keeps the top ``r`` (the spec's rank)
components as ``B = U_r S_r^{1/2}``, ``A = S_r^{1/2} V_r^T``, ordered by singular value, so the
first ``r_k`` components that :func:`payload_for` hands a rank-``r_k`` client are its best rank-``r_k``
approximation. The SVD never forms ``d x k``: with ``[B_1..B_K] = Q_b R_b`` and
``[p_1 A_1; ..]^T = Q_a R_a``, ``Delta W = Q_b (R_b R_a^T) Q_a^T`` and only the small core is
decomposed. The divergence is Eckart-Young's ``sqrt(sum_{j > r} s_j^2 / sum_j s_j^2)``.
"""

from __future__ import annotations

import torch

from coordinator.aggregators.base import ClientUpdate
from coordinator.aggregators.ranks import HeterogeneousRankAggregator, pad_updates
from export.state import State


def lowrank_svd(b_cat: torch.Tensor, a_cat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, V^T`` of ``b_cat @ a_cat`` (L, d, m) @ (L, m, k), from QRs and the small core's SVD."""
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.transpose(1, 2))
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.transpose(1, 2), full_matrices=False)
    return q_b @ u_c, s, vh_c @ q_a.transpose(1, 2)


class FlexLoRA(HeterogeneousRankAggregator):
    name = "flexlora"

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        p, out = self.begin_round(global_state, updates)
        for batch in self.lora_batches(global_state, pad_updates(global_state, updates)):
            n_layers, n_clients, d, r = batch.b.shape
            b_cat = batch.b.double().permute(0, 2, 1, 3).reshape(n_layers, d, n_clients * r)
            a_cat = (batch.a.double() * p.double().view(1, -1, 1, 1)).reshape(n_layers, n_clients * r, -1)
            u, s, vh = lowrank_svd(b_cat, a_cat)
            keep = min(r, s.shape[1])
            root = s[:, :keep].sqrt()
            b_new = torch.zeros_like(batch.b_global, dtype=torch.float64)
            a_new = torch.zeros_like(batch.a_global, dtype=torch.float64)
            b_new[:, :, :keep] = u[:, :, :keep] * root[:, None, :]
            a_new[:, :keep] = root[:, :, None] * vh[:, :keep]
            batch.store(out, a_new, b_new)
            total = s.square().sum(1)
            tail = (total - s[:, :keep].square().sum(1)).clamp_min(0)
            self.record_divergence(
                batch.prefixes, (tail / total.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()
            )
        return out
