"""FLoRA: stack the clients' factors, merge the exact product into a versioned base (METHODS.md 5).

``B_st = [B_1 .. B_K]`` (d x sum r_k) and ``A_st = [p_1 A_1; ..; p_K A_K]`` give
``B_st A_st = sum_k p_k B_k A_k`` exactly, whatever the clients' ranks. The product (times the
common ``gamma = alpha / r``) is merged into the frozen base, kept on the coordinator as a versioned
delta (:mod:`coordinator.versioned_base`) that travels with every download; then every client starts
a fresh LoRA the next round: ``A`` uniform in ``+-1/sqrt(k)`` (peft's Kaiming bound) from a seed of
the spec's seed, the layer and the base version, ``B = 0``. A client of rank ``r_k`` downloads the
first ``r_k`` rows of that ``A`` (and zero ``B``) plus the cumulative base delta, which is
``min(R (d + k), d k)`` scalars per layer with ``R`` the ranks stacked so far.
"""

from __future__ import annotations

import math

import torch

from coordinator.aggregators.base import ClientUpdate
from coordinator.aggregators.ranks import HeterogeneousRankAggregator, native_layers
from coordinator.divergence import lora_divergence
from coordinator.versioned_base import bump_version, merge_into_base
from export.base_delta import base_version
from export.ravan import layer_seed
from export.state import State


def fresh_lora_a(seed: int, prefix: str, version: int, rank: int, k: int) -> torch.Tensor:
    """The fresh ``A`` (rank x k) every client starts from after base version ``version``."""
    gen = torch.Generator().manual_seed(layer_seed(seed, f"{prefix}@base{version}"))
    bound = 1.0 / math.sqrt(k)
    return (torch.rand(rank, k, generator=gen, dtype=torch.float64) * 2 - 1) * bound


class FLoRA(HeterogeneousRankAggregator):
    name = "flora"
    changes_base = True

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        p, out = self.begin_round(global_state, updates)
        version = base_version(global_state) + 1
        p64 = p.double()
        for layer in native_layers(global_state, updates, self.device):
            b_st = torch.cat(layer.bs, dim=1)
            a_st = torch.cat([w * a for w, a in zip(p64, layer.as_, strict=True)], dim=0)
            merge_into_base(out, layer.prefix, self.spec.scaling * b_st, a_st)
            rank, k = global_state[layer.a_key].shape
            d = global_state[layer.b_key].shape[0]
            out[layer.a_key] = (
                fresh_lora_a(self.spec.seed, layer.prefix, version, rank, k).float().to(self.device)
            )
            out[layer.b_key] = torch.zeros(d, rank, device=self.device)
            bs, as_ = layer.padded(max(a.shape[0] for a in layer.as_))
            # The new effective update is this round's base change (the fresh adapter's B is 0).
            self.record_divergence(
                [layer.prefix], lora_divergence(b_st[None], a_st[None], bs[None], as_[None], p)
            )
        bump_version(out, global_state)
        return out
