"""LoRA-FAIR: FedAvg on the factors plus a ridge correction of B toward the exact product.

METHODS.md 5, closed-form ridge version [ours]: with ``E = sum_u p_u B_u A_u - B_bar A_bar``,
``Delta B = E A_bar^T (A_bar A_bar^T + lambda I)^{-1}`` and clients continue from
``(B_bar + Delta B, A_bar)``. ``E A_bar^T = sum_u p_u B_u (A_u A_bar^T) - B_bar (A_bar A_bar^T)``
never forms a ``d x k`` matrix. Because ``Delta B`` minimises ``||E - Delta B A_bar||^2 + lambda
||Delta B||^2`` and ``Delta B = 0`` is a candidate, the divergence never exceeds FedIT's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coordinator.aggregators.base import Aggregator, ClientUpdate, MethodOptions
from coordinator.divergence import lora_divergence
from export.state import State


@dataclass(frozen=True)
class LoRAFAIROptions(MethodOptions):
    """LoRA-FAIR's options.

    Parameters
    ----------
    ridge : float
        ``lambda`` relative to the mean eigenvalue of ``A_bar A_bar^T`` (scale-free; the paper's
        lambda is "small" and not retrieved). 0 is the plain least-squares correction.
    """

    ridge: float = 1e-3

    def __post_init__(self) -> None:
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")


class LoRAFAIR(Aggregator):
    """LoRA-FAIR on the coordinator, with :class:`LoRAFAIROptions`."""

    name = "lora_fair"
    Options = LoRAFAIROptions
    options: LoRAFAIROptions

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        p, out = self.begin_round(global_state, updates)
        p64 = p.double()
        for batch in self.lora_batches(global_state, updates):
            a64, b64 = batch.a.double(), batch.b.double()
            a_hat = torch.einsum("u,lurk->lrk", p64, a64)
            b_hat = torch.einsum("u,ludr->ldr", p64, b64)
            gram = a_hat @ a_hat.transpose(1, 2)  # (L, r, r)
            cross = torch.einsum("u,ludr,lurs->lds", p64, b64, a64 @ a_hat.transpose(1, 2).unsqueeze(1))
            e_at = cross - b_hat @ gram  # E A_bar^T, (L, d, r)
            rank = gram.shape[-1]
            scale = gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
            eye = torch.eye(rank, dtype=torch.float64, device=gram.device)
            lam = (self.options.ridge * scale + torch.finfo(torch.float64).eps * scale)[:, None, None]
            # Delta B G = E A_bar^T with symmetric G: solve G X = (E A_bar^T)^T.
            delta_b = torch.linalg.solve(gram + lam * eye, e_at.transpose(1, 2)).transpose(1, 2)
            b_new = b_hat + delta_b
            batch.store(out, a_hat, b_new)
            self.record_divergence(batch.prefixes, lora_divergence(b_new, a_hat, b64, a64, p))
        return out
