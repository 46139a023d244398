"""Heterogeneous LoRA ranks on the coordinator: validate, pad and slice clients' factors.

A rank-``r_k`` client uploads ``A_k`` (r_k x k) and ``B_k`` (d x r_k) with ``1 <= r_k <= r``, the
global rank. Zero-padding to ``r`` keeps every client's product ``B_k A_k`` (METHODS.md 6, HetLoRA),
so methods that average factors can use the batched same-shape path; FLoRA stacks the native ranks
so that its download carries no zero columns.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from coordinator.aggregators.base import AggregationError, Aggregator, ClientInfo, ClientUpdate
from export.adapters import rank_view
from export.state import State, layout


def client_rank(update: ClientUpdate, a_key: str, b_key: str, global_state: State) -> int:
    """The rank of a client's pair under ``a_key`` / ``b_key``, checked against the global pair."""
    for key in (a_key, b_key):
        if key not in update.state:
            raise AggregationError(f"client {update.client_id}: upload lacks {key}")
    a, b = update.state[a_key], update.state[b_key]
    r_max, k = global_state[a_key].shape
    d = global_state[b_key].shape[0]
    rank = a.shape[0] if a.dim() == 2 else -1
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != k or b.shape[0] != d or b.shape[1] != rank:
        raise AggregationError(
            f"client {update.client_id}: factors {tuple(b.shape)} @ {tuple(a.shape)} do not fit "
            f"the global ({d}, r) @ (r, {k}) layer"
        )
    if not 1 <= rank <= r_max:
        raise AggregationError(f"client {update.client_id}: rank {rank} outside 1..{r_max} for {a_key}")
    return rank


def pad_updates(global_state: State, updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """Every update with its LoRA factors zero-padded to the global rank (validated first)."""
    pairs = layout(global_state).lora.values()
    out = []
    for u in updates:
        state = dict(u.state)
        for a_key, b_key in pairs:
            rank = client_rank(u, a_key, b_key, global_state)
            if rank < global_state[a_key].shape[0]:
                a = torch.zeros_like(global_state[a_key], dtype=u.state[a_key].dtype)
                b = torch.zeros_like(global_state[b_key], dtype=u.state[b_key].dtype)
                a[:rank] = u.state[a_key]
                b[:, :rank] = u.state[b_key]
                state[a_key], state[b_key] = a, b
        out.append(ClientUpdate(u.client_id, state, u.num_examples, u.rank, u.meta))
    return out


@dataclass
class NativeLayer:
    """One layer's clients' factors at their own ranks, float64 on the coordinator's device."""

    prefix: str
    a_key: str
    b_key: str
    bs: list[torch.Tensor]  # (d, r_u)
    as_: list[torch.Tensor]  # (r_u, k)

    def padded(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B (U, d, rank), A (U, rank, k))`` zero-padded, for the divergence's batched forms."""
        d, k = self.bs[0].shape[0], self.as_[0].shape[1]
        b = self.bs[0].new_zeros(len(self.bs), d, rank)
        a = self.as_[0].new_zeros(len(self.as_), rank, k)
        for u, (bu, au) in enumerate(zip(self.bs, self.as_, strict=True)):
            b[u, :, : bu.shape[1]] = bu
            a[u, : au.shape[0]] = au
        return b, a


def native_layers(
    global_state: State, updates: list[ClientUpdate], device: torch.device
) -> Iterator[NativeLayer]:
    """The round's LoRA layers with every client's factors at its own rank (validated)."""
    if not updates:
        raise AggregationError("cannot aggregate zero updates")
    for prefix, (a_key, b_key) in layout(global_state).lora.items():
        for u in updates:
            client_rank(u, a_key, b_key, global_state)
        yield NativeLayer(
            prefix,
            a_key,
            b_key,
            [u.state[b_key].to(device, torch.float64) for u in updates],
            [u.state[a_key].to(device, torch.float64) for u in updates],
        )


def rank_payload(client: ClientInfo, global_state: State) -> State:
    """The global adapter truncated to the client's rank (its first ``rank`` components): the slice
    the device itself takes of the one announced global (:func:`export.adapters.rank_view`)."""
    try:
        return rank_view(global_state, client.rank)
    except ValueError as e:
        raise ValueError(f"client {client.client_id}: {e}") from None


class HeterogeneousRankAggregator(Aggregator):
    """Base of the methods whose clients train the rank their budget affords (FLoRA, FlexLoRA, HetLoRA):
    each client downloads the global adapter cut to its rank."""

    heterogeneous_ranks = True

    def payload_for(self, client: ClientInfo, global_state: State) -> State:
        return rank_payload(client, global_state)
