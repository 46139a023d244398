"""FedAvg of one LoRA factor while the other never travels: FFA-LoRA (A frozen) and FedSA-LoRA (B local).

FFA-LoRA (METHODS.md 5): A is drawn from the spec's seed, frozen and identical on every client, so
clients train and send B only and ``B_bar A = sum_u p_u B_u A`` is exact. FedSA-LoRA: both factors
train, only A is sent and averaged, each client keeps its own B (``local_suffixes``), so there is no
global product to compare with and no divergence is recorded (METHODS.md 5: "n/a (B local)").
"""

from __future__ import annotations

from typing import ClassVar

import torch

from coordinator.aggregators.base import AggregationError, Aggregator, ClientInfo, ClientUpdate
from coordinator.divergence import lora_divergence
from export.spec import AdapterSpec
from export.state import LORA_A, LORA_B, State, layout


class SingleFactorAverage(Aggregator):
    """Average the factor named ``sent`` key by key; refuse uploads of the factor that never travels."""

    sent: ClassVar[str]
    kept: ClassVar[str]

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        p, out = self.begin_round(global_state, updates)
        stray = [k for k in updates[0].state if k.endswith(self.kept)]
        if stray:
            raise AggregationError(
                f"{self.name}: {self.kept.split('.')[1]} never travels, the upload has {stray[0]}"
            )
        for prefix, (a_key, b_key) in layout(updates[0].state).lora.items():
            key = a_key if self.sent == LORA_A else b_key
            if key not in global_state:
                raise AggregationError(f"the global state lacks {key}")
            x = self.stacked(updates, key)
            out[key] = torch.tensordot(p.to(x.dtype), x, dims=1)
            self.after_average(prefix, global_state, out, x, p)
        return out

    def after_average(
        self, prefix: str, global_state: State, out: State, x: torch.Tensor, p: torch.Tensor
    ) -> None:
        """Per-layer bookkeeping once the sent factor is averaged (nothing by default)."""


class FFALoRA(SingleFactorAverage):
    """FFA-LoRA: clients train B on a frozen, seed-derived A; FedAvg on B is exact."""

    name = "ffa_lora"
    sent, kept = LORA_B, LORA_A

    @classmethod
    def client_spec(cls, spec: AdapterSpec) -> AdapterSpec:
        return spec.with_(freeze_a=True)

    def after_average(
        self, prefix: str, global_state: State, out: State, x: torch.Tensor, p: torch.Tensor
    ) -> None:
        # With the shared A known (it is in the state when the coordinator holds the model's A), this
        # is the usual divergence; without it, ||(B_bar - sum p_u B_u) A|| vanishes with the B residual.
        b_hat = out[prefix + LORA_B].to(self.device, torch.float32)
        a = global_state.get(prefix + LORA_A)
        if a is None:
            a = torch.eye(b_hat.shape[1], device=self.device)
        a = a.to(self.device, torch.float32)
        a_all = a.expand(x.shape[0], *a.shape)
        self.record_divergence([prefix], lora_divergence(b_hat[None], a[None], x[None], a_all[None], p))


class FedSALoRA(SingleFactorAverage):
    """FedSA-LoRA: FedAvg on A; B stays on each client (its download and upload are A only)."""

    name = "fedsa_lora"
    sent, kept = LORA_A, LORA_B
    local_suffixes = (LORA_B,)

    def payload_for(self, client: ClientInfo, global_state: State) -> State:
        return {k: v for k, v in global_state.items() if not k.endswith(LORA_B)}
