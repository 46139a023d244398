"""The aggregator interface: pure math on trainable states, never transport.

An aggregator owns the global adapter's evolution. The coordinator (or the simulator) calls
``init_global`` once, ``payload_for`` for each sampled client, and ``aggregate`` once per round with
the accepted updates. All tensors live on ``self.device`` (CUDA when present, else CPU).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Self

import torch

from export.spec import AdapterSpec
from export.state import State, layout

Weighting = Literal["examples", "work", "uniform"]
WEIGHTINGS: tuple[str, ...] = ("examples", "work", "uniform")

DEFAULT_CHUNK_BYTES = 1 << 30


class AggregationError(ValueError):
    """Updates that cannot be aggregated together (missing keys, mismatched shapes, bad indices)."""


class OptionsError(ValueError):
    """A method option the method does not have, or a value it refuses; the message names both."""


@dataclass(frozen=True)
class MethodOptions:
    """A method's own options as data (as peft's ``LoraConfig``): a frozen dataclass per method.

    A method with options subclasses this with its fields and checks them in ``__post_init__``; a
    method without any has this empty one. Every entry point reads the same class:
    ``aggregators.create(name, spec, **params)``, ``--method-params`` of ``fleetlora sim`` and
    ``fleetlora coordinator serve``, and a run config's ``[method_params.NAME]`` table.
    """

    @classmethod
    def from_params(cls, method: str, params: Mapping[str, Any]) -> Self:
        """The options from a mapping (JSON, TOML); an unknown key or a refused value is named."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            offered = ", ".join(known) if known else "none"
            raise OptionsError(f"method {method!r} has no option {unknown[0]!r} (its options: {offered})")
        try:
            return cls(**params)
        except (TypeError, ValueError) as e:  # a value of the wrong type fails a comparison in the checks
            raise OptionsError(f"method {method!r}: {e}") from None


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
    examples_seen: int = 0  # examples processed in this round's training (local steps x batch)


class Aggregator(ABC):
    """Base class of every aggregation method; one subclass per module, registered by name.

    Parameters
    ----------
    spec : AdapterSpec
        The adapter every client trains.
    device : str or torch.device
        Where the math runs; ``"auto"`` picks CUDA when present.
    weighting : {"examples", "work", "uniform"}
        Client weights ``p_u``: proportional to local examples, to the examples processed this round
        (a device that trained one step weighs less than one that trained twenty), or ``1/U``.
    chunk_bytes : int
        Working-memory bound of one batch: same-shaped layers are stacked and processed together up
        to about this many bytes (a method declares its float64 working copies per stacked scalar),
        so peak memory depends on the clients' uploads, never on ``K x d x k``.
    **options
        The method's own options: the fields of its :attr:`Options` dataclass, kept as ``options``.

    ``round_index`` counts the rounds aggregated so far (methods with a schedule read it).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "lora"  # the adapter family this method aggregates
    work_copies: ClassVar[float] = 2.0  # float64 working copies of the stacked uploads a batch needs
    # Clients train the LoRA rank their budget affords (payload_for then hands each what it can take).
    heterogeneous_ranks: ClassVar[bool] = False
    # Key suffixes of tensors each client keeps between rounds and never sends (FedSA-LoRA's B).
    local_suffixes: ClassVar[tuple[str, ...]] = ()
    # Its globals carry a change of the frozen base (FLoRA, FedEx-LoRA): an ExecuTorch device needs a
    # program with base-delta inputs (``fleetlora export --base-delta``).
    changes_base: ClassVar[bool] = False
    Options: ClassVar[type[MethodOptions]] = MethodOptions  # the method's own options
    options: MethodOptions

    @classmethod
    def client_spec(cls, spec: AdapterSpec) -> AdapterSpec:
        """The adapter clients of this method train, from the experiment's spec (FFA-LoRA freezes A)."""
        return spec

    def __init__(
        self,
        spec: AdapterSpec,
        device: str | torch.device = "auto",
        weighting: Weighting = "examples",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        **options: Any,
    ):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.spec = spec
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.weighting = weighting
        self.chunk_bytes = chunk_bytes
        self.metrics: dict[str, float] = {}  # filled by aggregate(): divergence etc.
        self.options = self.Options.from_params(self.name, options)
        self.round_index = 0
        self.setup()

    def setup(self) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Per-instance state, and checks that need the spec as well as the options (default: none)."""

    def init_global(self, initial: State) -> State:
        """The round-0 global adapter, from the freshly attached model's trainable state."""
        return {k: v.detach().to(self.device, torch.float32).clone() for k, v in initial.items()}

    def payload_for(self, client: ClientInfo, global_state: State) -> State:
        """What this client downloads (by default the whole global adapter)."""
        return global_state

    def announced(self, global_state: State) -> State:
        """The one global a round announces (retained): what every sampled device downloads, the
        simulator's too; each device takes its own slice of it (its rank: ``run_local_round``)."""
        return self.payload_for(ClientInfo("*"), global_state)

    @abstractmethod
    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        """The next global adapter from the current one and this round's updates."""

    # -- helpers shared by the methods -------------------------------------------------------------

    def begin_round(self, global_state: State, updates: list[ClientUpdate]) -> tuple[torch.Tensor, State]:
        """``(p, out)``: the client weights, and the next global state begun as a copy of the current
        one with every non-adapter tensor averaged; clears the metrics of the last round."""
        p = self.weights(updates)
        self.metrics = {}
        out = dict(global_state)
        out.update(self.average_dense(global_state, updates, p))
        return p, out

    def weights(self, updates: list[ClientUpdate]) -> torch.Tensor:
        """``p_u`` (sum 1) on ``self.device`` in float64."""
        if not updates:
            raise ValueError("cannot aggregate zero updates")
        if self.weighting == "uniform":
            w = torch.ones(len(updates), dtype=torch.float64)
        else:
            work = self.weighting == "work"
            w = torch.tensor(
                [float(u.examples_seen if work else u.num_examples) for u in updates], dtype=torch.float64
            )
            if (w <= 0).any():
                field_name = "examples_seen" if work else "num_examples"
                raise ValueError(f"every update needs {field_name} > 0 for {self.weighting!r} weighting")
        return (w / w.sum()).to(self.device)

    def stacked(self, updates: list[ClientUpdate], key: str) -> torch.Tensor:
        """The clients' tensors under ``key`` stacked on a new first axis, float32 on the device."""
        missing = [u.client_id for u in updates if key not in u.state]
        if missing:
            raise AggregationError(f"updates of clients {missing[:5]} lack {key}")
        shapes = {tuple(u.state[key].shape) for u in updates}
        if len(shapes) > 1:
            raise AggregationError(f"{key}: clients uploaded different shapes {sorted(shapes)}")
        tensors = [u.state[key] for u in updates]
        if self.device.type != "cuda" or any(t.device.type != "cpu" for t in tensors):
            return torch.stack([t.to(self.device, torch.float32) for t in tensors])
        # Received uploads are host tensors: one stack into pinned memory and one copy, instead of a
        # copy and a synchronisation per client (on an H200, 27 of a 7B-shaped K = 100 round's 42 ms).
        host = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.float32, pin_memory=True)
        torch.stack([t.to(torch.float32) for t in tensors], out=host)
        return host.to(self.device, non_blocking=True)

    def layers_per_batch(self, scalars_per_layer: int, extra_scalars: int = 0) -> int:
        """How many same-shaped layers fit in one batch of ``chunk_bytes`` (at least one).

        ``scalars_per_layer`` counts a layer's stacked uploads (``work_copies`` float64 copies each);
        ``extra_scalars`` any further float64 scalars a layer needs (e.g. a dense reference).
        """
        per_layer = max(1.0, (scalars_per_layer * self.work_copies + extra_scalars) * 8)
        return max(1, int(self.chunk_bytes // per_layer))

    def extra_scalars_per_layer(self, d: int, k: int) -> int:
        """Working float64 scalars a method needs per ``d x k`` layer beyond its upload copies."""
        return 0

    def lora_batches(self, global_state: State, updates: list[ClientUpdate]) -> Iterator[LoraBatch]:
        """The round's LoRA layers, grouped by shape and stacked in batches of ``chunk_bytes``."""
        if not updates:
            raise AggregationError("cannot aggregate zero updates")
        groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[tuple[str, str, str]]] = {}
        for prefix, (a_key, b_key) in layout(updates[0].state).lora.items():
            for key in (a_key, b_key):
                if key not in updates[0].state:
                    raise AggregationError(f"{self.name} needs both LoRA factors, the update lacks {key}")
                if key not in global_state:
                    raise AggregationError(f"the global state lacks {key}")
            shape = (tuple(updates[0].state[a_key].shape), tuple(updates[0].state[b_key].shape))
            groups.setdefault(shape, []).append((prefix, a_key, b_key))
        for (a_shape, b_shape), members in groups.items():
            scalars = len(updates) * (a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1])
            step = self.layers_per_batch(scalars, self.extra_scalars_per_layer(b_shape[0], a_shape[1]))
            for start in range(0, len(members), step):
                part = members[start : start + step]
                yield LoraBatch(
                    prefixes=[m[0] for m in part],
                    a_keys=[m[1] for m in part],
                    b_keys=[m[2] for m in part],
                    a=torch.stack([self.stacked(updates, m[1]) for m in part]),
                    b=torch.stack([self.stacked(updates, m[2]) for m in part]),
                    a_global=torch.stack([global_state[m[1]].to(self.device, torch.float32) for m in part]),
                    b_global=torch.stack([global_state[m[2]].to(self.device, torch.float32) for m in part]),
                )

    def record_divergence(self, prefixes: list[str], values: torch.Tensor) -> None:
        """Store ``divergence/<prefix>`` per layer and refresh their mean ``divergence``."""
        for prefix, v in zip(prefixes, values.tolist(), strict=True):
            self.metrics[f"divergence/{prefix}"] = float(v)
        per_layer = [v for k, v in self.metrics.items() if k.startswith("divergence/")]
        self.metrics["divergence"] = sum(per_layer) / len(per_layer)

    def average_dense(self, global_state: State, updates: list[ClientUpdate], p: torch.Tensor) -> State:
        """FedAvg of every non-adapter tensor (e.g. a fresh classification head)."""
        out: State = {}
        for key in layout(updates[0].state).dense:
            x = self.stacked(updates, key)
            out[key] = torch.tensordot(p.to(x.dtype), x, dims=1)
        return out


@dataclass
class LoraBatch:
    """Same-shaped LoRA layers of one round, stacked: ``a`` (L, U, r, k), ``b`` (L, U, d, r) float32.

    ``a_global`` (L, r, k) and ``b_global`` (L, d, r) are the current global factors.
    """

    prefixes: list[str]
    a_keys: list[str]
    b_keys: list[str]
    a: torch.Tensor
    b: torch.Tensor
    a_global: torch.Tensor
    b_global: torch.Tensor

    def store(self, out: State, a_new: torch.Tensor, b_new: torch.Tensor) -> None:
        """Write the new global factors (L, r, k) and (L, d, r) into ``out`` as float32."""
        for i, (a_key, b_key) in enumerate(zip(self.a_keys, self.b_keys, strict=True)):
            out[a_key] = a_new[i].float()
            out[b_key] = b_new[i].float()
