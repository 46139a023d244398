"""Ravan: per-head weighted mean of the uploaded ``s_i H_i`` (METHODS.md 2.2).

``H_i <- sum_{c in C_i} p_c s_i^c H_i^c / sum_{c in C_i} p_c`` over the clients ``C_i`` that trained
head ``i``; a head nobody trained keeps its value; ``s`` returns to ones (it is folded into ``H``).
Because every client shares the frozen bases, this equals the exact average whenever every client
trained every head. A client's upload holds ``<prefix>.ravan_H`` (K_c, r_h, r_h) and
``<prefix>.ravan_heads`` (K_c,) int64; without the indices it holds all heads in order.

The divergence compares ``sum_i B_i H_i A_i`` with the exact average of the clients' full adapters
(a client's untrained heads are the previous global ones), in the small head space: for a head with
trained weight ``P_i`` the gap is ``(1 - P_i)(H_i^new - H_i^old)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from coordinator.aggregators.base import AggregationError, Aggregator, ClientUpdate, MethodOptions
from coordinator.divergence import ravan_divergence
from export.ravan import layer_seed, make_bases
from export.state import RAVAN_H, RAVAN_HEADS, RAVAN_S, State, layout


@dataclass(frozen=True)
class RavanOptions(MethodOptions):
    """Ravan's options.

    Parameters
    ----------
    layer_dims : mapping of prefix to (d_out, d_in), optional
        Needed only with ``basis_init="normal"``: the divergence then needs the bases' Gram
        matrices, rebuilt from the spec's seed and the layer's name. Gram-Schmidt bases are
        orthonormal, so no shapes are needed.
    """

    layer_dims: Mapping[str, tuple[int, int]] | None = None


class Ravan(Aggregator):
    """Ravan on the coordinator, with :class:`RavanOptions`."""

    name = "ravan"
    family = "ravan"
    Options = RavanOptions
    options: RavanOptions

    def setup(self) -> None:
        if self.spec.basis_init == "normal" and self.options.layer_dims is None:
            raise ValueError("Ravan with basis_init='normal' needs layer_dims={prefix: (d_out, d_in)}")
        self.layer_dims = dict(self.options.layer_dims or {})
        self._grams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        p, out = self.begin_round(global_state, updates)
        groups: dict[tuple[int, ...], list[str]] = {}
        for prefix, h_key in layout(global_state).ravan.items():
            groups.setdefault(tuple(global_state[h_key].shape), []).append(prefix)
        for shape, prefixes in groups.items():
            step = self.layers_per_batch(len(updates) * shape[0] * shape[1] * shape[2])
            for start in range(0, len(prefixes), step):
                self._aggregate_batch(global_state, updates, p, prefixes[start : start + step], out)
        return out

    def _aggregate_batch(
        self,
        global_state: State,
        updates: list[ClientUpdate],
        p: torch.Tensor,
        prefixes: list[str],
        out: State,
    ) -> None:
        h_keys = [prefix + RAVAN_H for prefix in prefixes]
        old = torch.stack(
            [global_state[key].to(self.device, torch.float64) for key in h_keys]
        )  # (L, h, r, r)
        n_layers, heads = old.shape[:2]
        # All uploaded heads of the batch in one tensor; slot = layer * heads + head.
        values, slots, weights = [], [], []
        for layer, (prefix, key) in enumerate(zip(prefixes, h_keys, strict=True)):
            for u, update in enumerate(updates):
                h_up, idx = self._upload(update, prefix, key, old.shape[1:])
                values.append(h_up)
                slots.append(idx + layer * heads)
                weights.append(p[u].expand(idx.numel()))
        slot = torch.cat(slots)
        w = torch.cat(weights).double()
        flat_shape = (n_layers * heads, *old.shape[2:])
        total = torch.zeros(flat_shape, dtype=torch.float64, device=self.device)
        total.index_add_(0, slot, torch.cat(values).double() * w[:, None, None])
        mass = torch.zeros(n_layers * heads, dtype=torch.float64, device=self.device).index_add_(0, slot, w)
        total, mass = total.view_as(old), mass.view(n_layers, heads)
        trained = (mass > 0)[..., None, None]
        new = torch.where(
            trained, total / mass.clamp_min(torch.finfo(torch.float64).tiny)[..., None, None], old
        )
        exact = total + (1 - mass)[..., None, None] * old  # untrained heads of a client stay at the old value
        gram_b, gram_a = self._bases_grams(prefixes, old.shape[1], old.shape[2])
        self.record_divergence(prefixes, ravan_divergence(new, exact, gram_b, gram_a))
        for i, (prefix, key) in enumerate(zip(prefixes, h_keys, strict=True)):
            out[key] = new[i].float()
            out[prefix + RAVAN_S] = torch.ones(heads, dtype=torch.float32, device=self.device)

    def _upload(
        self, update: ClientUpdate, prefix: str, key: str, head_shape: torch.Size
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One client's uploaded heads of a layer and their indices, validated."""
        if key not in update.state:
            raise AggregationError(f"client {update.client_id}: upload lacks {key}")
        h_up = update.state[key].to(self.device)
        heads = head_shape[0]
        idx_key = prefix + RAVAN_HEADS
        if idx_key in update.state:
            idx = update.state[idx_key].to(self.device)
            if idx.dtype != torch.int64 or idx.dim() != 1:
                raise AggregationError(f"client {update.client_id}: {idx_key} must be a 1-D int64 tensor")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= heads):
                raise AggregationError(
                    f"client {update.client_id}: {idx_key} has indices outside 0..{heads - 1}"
                )
            if idx.unique().numel() != idx.numel():
                raise AggregationError(f"client {update.client_id}: {idx_key} repeats a head")
        else:
            idx = torch.arange(heads, device=self.device)
        if tuple(h_up.shape) != (idx.numel(), *head_shape[1:]):
            raise AggregationError(
                f"client {update.client_id}: {key} has shape {tuple(h_up.shape)}, "
                f"expected {(idx.numel(), *head_shape[1:])}"
            )
        return h_up, idx

    def _bases_grams(
        self, prefixes: list[str], heads: int, head_rank: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-layer ``B_i^T B_j`` and ``A_i A_j^T`` (L, h, h, r, r); ``None`` for orthonormal bases."""
        if self.spec.basis_init == "gram_schmidt":
            return None, None
        grams = []
        for prefix in prefixes:
            if prefix not in self._grams:
                if prefix not in self.layer_dims:
                    raise AggregationError(f"layer_dims has no entry for Ravan layer {prefix}")
                d_out, d_in = self.layer_dims[prefix]
                b, a = make_bases(d_out, d_in, heads, head_rank, layer_seed(self.spec.seed, prefix), "normal")
                b64, a64 = b.double().to(self.device), a.double().to(self.device)
                self._grams[prefix] = (
                    torch.einsum("idr,jds->ijrs", b64, b64),
                    torch.einsum("irk,jsk->ijrs", a64, a64),
                )
            grams.append(self._grams[prefix])
        return torch.stack([g[0] for g in grams]), torch.stack([g[1] for g in grams])
