"""The aggregator interface: pure math on trainable states, never transport.

An aggregator owns the global adapter's evolution. The coordinator (or the simulator) calls
``init_global`` once, ``payload_for`` for each sampled client, and ``aggregate`` once per round with
the accepted updates. All tensors live on ``self.device`` (CUDA when present, else CPU).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from export.spec import AdapterSpec
from export.state import State, layout

Weighting = Literal["examples", "uniform"]


@dataclass(frozen=True)
class ClientInfo:
    """What the server knows of a client when it prepares its download.

    ``rank``: the LoRA rank the client's budget affords (``None`` = the spec's rank).
    ``heads``: Ravan heads the client will train (``None`` = all).
    """

    client_id: str
    rank: int | None = None
    heads: tuple[int, ...] | None = None


@dataclass
class ClientUpdate:
    """One client's accepted upload for a round: a trainable state (or a slice of one).

    ``state`` for LoRA holds A and B (of the client's rank, which may be below the spec's); for Ravan,
    ``s_i H_i`` of the heads the client trained plus their indices (``*.ravan_heads``).
    """

    client_id: str
    state: State
    num_examples: int
    rank: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Aggregator(ABC):
    """Base class of every aggregation method; one subclass per module, registered by name.

    Parameters
    ----------
    spec : AdapterSpec
        The adapter every client trains.
    device : str or torch.device
        Where the math runs; ``"auto"`` picks CUDA when present.
    weighting : {"examples", "uniform"}
        Client weights ``p_u``: proportional to local examples, or ``1/U``.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "lora"  # the adapter family this method aggregates

    def __init__(
        self, spec: AdapterSpec, device: str | torch.device = "auto", weighting: Weighting = "examples"
    ):
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
        self.spec = spec
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.weighting = weighting
        self.metrics: dict[str, float] = {}  # filled by aggregate(): divergence etc.

    def init_global(self, initial: State) -> State:
        """The round-0 global adapter, from the freshly attached model's trainable state."""
        return {k: v.detach().to(self.device, torch.float32).clone() for k, v in initial.items()}

    def payload_for(self, client: ClientInfo, global_state: State) -> State:
        """What this client downloads (by default the whole global adapter)."""
        return global_state

    @abstractmethod
    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        """The next global adapter from the current one and this round's updates."""

    # -- helpers shared by the methods -------------------------------------------------------------

    def weights(self, updates: list[ClientUpdate]) -> torch.Tensor:
        """``p_u`` (sum 1) on ``self.device`` in float64."""
        if not updates:
            raise ValueError("cannot aggregate zero updates")
        if self.weighting == "uniform":
            w = torch.ones(len(updates), dtype=torch.float64)
        else:
            w = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
            if (w <= 0).any():
                raise ValueError("every update needs num_examples > 0 for example weighting")
        return (w / w.sum()).to(self.device)

    def stacked(self, updates: list[ClientUpdate], key: str) -> torch.Tensor:
        """The clients' tensors under ``key`` stacked on a new first axis, float32 on the device."""
        return torch.stack([u.state[key].to(self.device, torch.float32) for u in updates])

    def average_dense(self, global_state: State, updates: list[ClientUpdate], p: torch.Tensor) -> State:
        """FedAvg of every non-adapter tensor (e.g. a fresh classification head)."""
        out: State = {}
        for key in layout(updates[0].state).dense:
            x = self.stacked(updates, key)
            out[key] = torch.tensordot(p.to(x.dtype), x, dims=1)
        return out
