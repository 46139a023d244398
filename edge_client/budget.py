"""What a device can afford in one round: local steps, batch size, LoRA rank, Ravan heads.

This module runs on the device itself, so it uses the standard library only (no torch, no numpy).

A :class:`DeviceProfile` holds the published or measured figures of one device, a :class:`ModelCost`
what one training example of the model costs, a :class:`BudgetPolicy` the limits the coordinator sets
for a round, and :func:`compute_budget` maps the three to a :class:`Budget`.

The budget is monotone by construction: a device whose throughput, memory, uplink and downlink are all
at least another's never gets fewer steps, a smaller batch, a lower rank or fewer heads. Two choices
make that hold (see :func:`compute_budget`): the time reserved for transfers is that of the largest
payload of the round, whatever rank the device ends up with, and steps are sized for the full batch, so
that more memory (a bigger batch) never costs steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Literal

Kind = Literal["jetson", "sbc", "phone", "laptop", "server"]
KINDS: tuple[str, ...] = ("jetson", "sbc", "phone", "laptop", "server")
Family = Literal["lora", "ravan"]

MIB = 1024 * 1024
#: Size of an update envelope's JSON header and safetensors framing, charged once per transfer.
ENVELOPE_OVERHEAD_BYTES = 2048


class ProfileError(ValueError):
    """A device profile with a missing, mistyped or out-of-range figure.

    The message names the file (when known) and the key, e.g.
    ``pixel_8.toml: train_gflops: must be a number > 0, got -3``.
    """

    def __init__(self, reason: str, *, key: str | None = None, source: str | None = None) -> None:
        self.reason = reason
        self.key = key
        self.source = source
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {reason}" if where else reason)


class BudgetError(ValueError):
    """A device that cannot train at all, or a model cost or policy that makes no sense."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive(owner: object, name: str, error: type[ValueError], *, allow_zero: bool = False) -> float:
    """Read field ``name`` of ``owner`` as a finite number > 0 (or >= 0), raising ``error`` otherwise."""
    value = getattr(owner, name)
    ok = _is_number(value) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        if error is ProfileError:
            raise ProfileError(f"must be a finite number {bound}, got {value!r}", key=name)
        raise error(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DeviceProfile:
    """Published or measured figures of one real device.

    Parameters
    ----------
    name : str
        Identifier, equal to the profile file's stem for shipped profiles (``jetson_orin_nano_8gb``).
    kind : {"jetson", "sbc", "phone", "laptop", "server"}
        Device family.
    train_gflops : float
        Sustained fp32 training throughput actually reachable (GFLOP/s): well below the datasheet peak.
    train_memory_mb : float
        Memory the training process may use (MiB), after the OS and the runtime.
    uplink_mbps, downlink_mbps : float
        Typical network bandwidth (Mbit/s).
    availability : float
        Probability that the device is online and eligible for a round, in [0, 1].
    dropout : float
        Probability that a device that started a round drops out before reporting, in [0, 1].
    energy_j_per_gflop : float, optional
        Energy per GFLOP of training (J), where known.
    description : str
        One human-readable line (full product name, configuration, runtime assumed).
    sources : mapping of str to str
        Where each figure comes from, keyed by field name.
    """

    name: str
    kind: Kind
    train_gflops: float
    train_memory_mb: float
    uplink_mbps: float
    downlink_mbps: float
    availability: float
    dropout: float
    energy_j_per_gflop: float | None = None
    description: str = ""
    sources: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ProfileError(f"must be a non-empty string, got {self.name!r}", key="name")
        if self.kind not in KINDS:
            raise ProfileError(f"must be one of {KINDS}, got {self.kind!r}", key="kind")
        for name in ("train_gflops", "train_memory_mb", "uplink_mbps", "downlink_mbps"):
            object.__setattr__(self, name, _positive(self, name, ProfileError))
        for name in ("availability", "dropout"):
            value = getattr(self, name)
            if not (_is_number(value) and 0.0 <= value <= 1.0):
                raise ProfileError(f"must be a probability in [0, 1], got {value!r}", key=name)
            object.__setattr__(self, name, float(value))
        if self.energy_j_per_gflop is not None:
            object.__setattr__(
                self, "energy_j_per_gflop", _positive(self, "energy_j_per_gflop", ProfileError)
            )
        if not isinstance(self.description, str):
            raise ProfileError(f"must be a string, got {self.description!r}", key="description")
        if not isinstance(self.sources, Mapping):
            raise ProfileError(f"must be a table of figure = source, got {self.sources!r}", key="sources")
        figures = {f.name for f in fields(self)} - {"name", "sources"}
        for key, text in self.sources.items():
            if key not in figures:
                raise ProfileError(f"names no figure of a profile (figures: {sorted(figures)})", key=key)
            if not isinstance(text, str) or not text.strip():
                raise ProfileError(f"source must be a non-empty string, got {text!r}", key=f"sources.{key}")
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))


@dataclass(frozen=True)
class ModelCost:
    """What training on one example costs, and how many bytes an adapter of a given size is.

    Parameters
    ----------
    train_flops_per_example : float
        FLOPs of one forward + backward pass over one example (see :meth:`estimate`).
    base_memory_mb : float
        Memory of the frozen model and the runtime, paid once whatever the batch (MiB).
    activation_mb_per_example : float
        Activations kept for the backward pass, per example (MiB).
    adapter_bytes_per_rank : float
        Bytes of a LoRA update per unit of rank (``A`` and ``B`` rows/columns of every adapted module).
    adapter_bytes_per_head : float
        Bytes of one trained Ravan head (its ``H_i`` and ``s_i`` in every adapted module).
    fixed_bytes : float
        Bytes sent every transfer whatever the rank: trainable extras (a classification head) and the
        envelope header.
    """

    train_flops_per_example: float
    base_memory_mb: float
    activation_mb_per_example: float
    adapter_bytes_per_rank: float
    adapter_bytes_per_head: float
    fixed_bytes: float = ENVELOPE_OVERHEAD_BYTES

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _positive(self, f.name, BudgetError, allow_zero=True))
        for name in ("train_flops_per_example", "activation_mb_per_example"):
            _positive(self, name, BudgetError)

    @classmethod
    def estimate(
        cls,
        n_params: int,
        seq_len: int,
        hidden: int,
        layers: int,
        adapted_scalars_per_rank: int,
        *,
        attention_heads: int = 0,
        embedding_params: int = 0,
        extra_trainable_scalars: int = 0,
        ravan_rank: int = 8,
        ravan_heads: int = 4,
        param_bytes: int = 4,
        activation_bytes: int = 4,
        runtime_overhead_mb: float = 0.0,
    ) -> ModelCost:
        """Estimate the cost of a transformer encoder with a frozen base from published formulas.

        Compute, per token (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", table 1):
        a forward pass costs ``2 N + 2 L s d`` FLOPs, where ``N = n_params - embedding_params`` are the
        parameters that take part in matrix products (embeddings are looked up, not multiplied) and
        ``2 L s d`` is attention's ``QK^T`` and ``AV``. A full backward pass costs twice the forward
        (gradients of activations and of weights); with a frozen base the weight gradients of the base
        are skipped, leaving about one forward's worth. So one training example costs about
        ``2 x forward = s (4 N + 4 L s d)``, i.e. ``4 x params x tokens``; the adapter's own FLOPs are
        below 1% at the ranks used here and are left out.

        Memory: frozen weights ``n_params x param_bytes`` plus ``runtime_overhead_mb``. Activations per
        example from Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
        Models", eq. 1): ``s d (34 + 5 a s / d)`` bytes per layer with 16-bit activations, scaled by
        ``activation_bytes / 2``. It counts everything a fully trained layer keeps, so it is an upper
        bound for a frozen base (inputs of frozen linear layers are not needed for weight gradients).

        Bytes: a rank-1 slice of LoRA over all adapted modules has ``adapted_scalars_per_rank``
        (``sum (d_in + d_out)``) scalars. A Ravan head matches the LoRA budget ``N = r (d + k)`` of the
        spec's ``ravan_rank`` split over ``ravan_heads`` heads (METHODS.md section 2.1), i.e.
        ``adapted_scalars_per_rank x ravan_rank / ravan_heads`` scalars per head (an upper bound: the
        head rank is rounded down).

        Parameters
        ----------
        n_params : int
            All parameters of the frozen base, embeddings included.
        seq_len : int
            Tokens per example.
        hidden : int
            Model width ``d``.
        layers : int
            Transformer blocks ``L``.
        adapted_scalars_per_rank : int
            ``sum over adapted modules of (d_in + d_out)``.
        attention_heads : int
            Attention heads ``a``; 0 takes ``hidden // 64``.
        embedding_params : int
            Parameters of the embedding tables (excluded from the matmul FLOPs).
        extra_trainable_scalars : int
            Trainable scalars sent every round besides the adapter (a classification head).
        ravan_rank, ravan_heads : int
            The adapter spec's rank and number of Ravan heads.
        param_bytes, activation_bytes : int
            Bytes per stored weight and per activation (4 for fp32).
        runtime_overhead_mb : float
            Memory of the runtime itself, paid once.

        Examples
        --------
        all-MiniLM-L6-v2 (22.7M parameters, 11.9M of them embeddings), LoRA on query/key/value of its
        6 layers, 64 tokens:

        >>> cost = ModelCost.estimate(22_700_000, 64, 384, 6, 18 * (384 + 384), embedding_params=11_917_824)
        >>> round(cost.train_flops_per_example / 1e9, 2)
        2.8
        """
        ints = {
            "n_params": n_params,
            "seq_len": seq_len,
            "hidden": hidden,
            "layers": layers,
            "adapted_scalars_per_rank": adapted_scalars_per_rank,
            "ravan_rank": ravan_rank,
            "ravan_heads": ravan_heads,
            "param_bytes": param_bytes,
            "activation_bytes": activation_bytes,
        }
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BudgetError(f"{name} must be an integer >= 1, got {value!r}")
        for name, value in (
            ("attention_heads", attention_heads),
            ("embedding_params", embedding_params),
            ("extra_trainable_scalars", extra_trainable_scalars),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BudgetError(f"{name} must be an integer >= 0, got {value!r}")
        if embedding_params >= n_params:
            raise BudgetError(f"embedding_params ({embedding_params}) must be below n_params ({n_params})")
        heads = attention_heads or max(1, hidden // 64)
        matmul_params = n_params - embedding_params
        flops_per_token = 4 * matmul_params + 4 * layers * seq_len * hidden
        activation_bytes_per_layer = seq_len * hidden * (34 + 5 * heads * seq_len / hidden)
        activation_mb = layers * activation_bytes_per_layer * (activation_bytes / 2) / MIB
        return cls(
            train_flops_per_example=float(seq_len * flops_per_token),
            base_memory_mb=n_params * param_bytes / MIB + runtime_overhead_mb,
            activation_mb_per_example=activation_mb,
            adapter_bytes_per_rank=float(adapted_scalars_per_rank * param_bytes),
            adapter_bytes_per_head=adapted_scalars_per_rank * ravan_rank / ravan_heads * param_bytes,
            fixed_bytes=float(extra_trainable_scalars * param_bytes + ENVELOPE_OVERHEAD_BYTES),
        )

    def upload_bytes(self, family: Family, rank: int, heads: int) -> float:
        """Bytes of one update of a client training ``rank`` (LoRA) or ``heads`` (Ravan)."""
        adapter = (
            self.adapter_bytes_per_head * heads if family == "ravan" else self.adapter_bytes_per_rank * rank
        )
        return adapter + self.fixed_bytes


@dataclass(frozen=True)
class BudgetPolicy:
    """The limits the coordinator sets for a round.

    Parameters
    ----------
    max_steps, min_steps : int
        Local SGD steps per round: no device does more than ``max_steps``; every device does at least
        ``min_steps`` even when that runs past the deadline (its budget's ``round_s`` then says so).
    max_batch : int
        Largest batch size; steps are sized for this batch.
    max_rank : int
        The adapter spec's LoRA rank: the rank the strongest devices train.
    rank_choices : tuple of int
        Ranks a weaker device may train instead; those at or above ``max_rank`` are replaced by it.
    max_heads : int
        The spec's number of Ravan heads: the most a device trains.
    target_round_s : float
        The round deadline: download, local training and upload should fit in it.
    reference_gflops : float
        Throughput at which a device trains the full rank and all heads; a device with a fraction
        ``c`` of it trains about ``c x max_rank`` (rounded down to a choice) and ``c x max_heads``.
    family : {"lora", "ravan"}
        Which payload size the transfers are charged for.
    max_upload_fraction : float
        Rank and heads are also capped so that the upload takes at most this fraction of the deadline.
    """

    max_steps: int = 20
    min_steps: int = 1
    max_batch: int = 16
    max_rank: int = 8
    rank_choices: tuple[int, ...] = (2, 4, 8, 16)
    max_heads: int = 4
    target_round_s: float = 30.0
    reference_gflops: float = 100.0
    family: Family = "lora"
    max_upload_fraction: float = 0.25

    def __post_init__(self) -> None:
        for name in ("max_steps", "min_steps", "max_batch", "max_rank", "max_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BudgetError(f"{name} must be an integer >= 1, got {value!r}")
        if self.min_steps > self.max_steps:
            raise BudgetError(f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})")
        choices = tuple(self.rank_choices)
        if not choices or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in choices):
            raise BudgetError(f"rank_choices must be integers >= 1, got {self.rank_choices!r}")
        object.__setattr__(self, "rank_choices", choices)
        _positive(self, "target_round_s", BudgetError)
        _positive(self, "reference_gflops", BudgetError)
        if self.family not in ("lora", "ravan"):
            raise BudgetError(f"family must be 'lora' or 'ravan', got {self.family!r}")
        fraction = self.max_upload_fraction
        if not (_is_number(fraction) and 0.0 < fraction <= 1.0):
            raise BudgetError(f"max_upload_fraction must be in (0, 1], got {fraction!r}")

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks a device may train, ascending, ending with ``max_rank``."""
        return tuple(sorted({r for r in self.rank_choices if r < self.max_rank} | {self.max_rank}))


@dataclass(frozen=True)
class Budget:
    """What one device does in one round, and how long it should take.

    Parameters
    ----------
    local_steps, batch_size : int
        Local SGD steps and examples per step.
    rank : int
        LoRA rank to train (LoRA families).
    heads : int
        Ravan heads to train.
    compute_s, upload_s, download_s : float
        Estimated seconds of local training, of sending the update and of receiving the global adapter.
    round_s : float
        Their sum: the estimated wall time of the round on that device.
    deadline_s : float
        The round deadline the budget was sized for.
    energy_j : float, optional
        Energy of the local training (J), when the profile gives an energy per GFLOP.
    """

    local_steps: int
    batch_size: int
    rank: int
    heads: int
    compute_s: float
    upload_s: float
    download_s: float
    round_s: float
    deadline_s: float
    energy_j: float | None = None

    @property
    def examples(self) -> int:
        """Examples processed in the round (``local_steps x batch_size``)."""
        return self.local_steps * self.batch_size

    @property
    def fits_deadline(self) -> bool:
        return self.round_s <= self.deadline_s


def transfer_seconds(n_bytes: float, mbps: float) -> float:
    """Seconds to move ``n_bytes`` over a link of ``mbps`` Mbit/s."""
    return n_bytes * 8 / (mbps * 1e6)


def compute_budget(profile: DeviceProfile, cost: ModelCost, policy: BudgetPolicy) -> Budget:
    """Map a device to its budget for a round.

    1. Batch cap from memory: ``(train_memory - base - adapter state) / activations per example``;
       below 1 the device cannot train and :class:`BudgetError` is raised.
    2. Transfer time is reserved for the largest payload of the round (full rank, all heads) both ways,
       whatever rank the device is given, so that a higher rank never takes compute time away.
    3. ``E``, the examples the device can process in the rest of the deadline at its throughput.
       Steps are ``E / max_batch`` clamped to ``[min_steps, max_steps]``, so they depend on throughput
       and bandwidth only; the batch is the memory cap, ``max_batch``, or ``E / steps``, whichever is
       smallest. Only a device that cannot afford ``min_steps`` full batches gets a smaller batch
       for lack of time.
    4. Rank and heads scale with ``capability = gflops / reference_gflops`` (capped at 1): the largest
       rank choice at or below ``capability x max_rank`` and ``floor(capability x max_heads)`` heads
       (at least the smallest choice and one head), further capped so that the upload takes at most
       ``max_upload_fraction`` of the deadline.

    Every quantity is a non-decreasing function of throughput, memory, uplink and downlink.

    Raises
    ------
    BudgetError
        When the device's memory cannot hold the frozen model and one example.
    """
    family = policy.family
    adapter_state_mb = (
        3
        * max(  # weights, gradients and momentum of the largest adapter of the round
            cost.adapter_bytes_per_rank * policy.max_rank, cost.adapter_bytes_per_head * policy.max_heads
        )
        / MIB
    )
    fixed_mb = cost.base_memory_mb + adapter_state_mb
    batch_cap = math.floor((profile.train_memory_mb - fixed_mb) / cost.activation_mb_per_example)
    if batch_cap < 1:
        raise BudgetError(
            f"device {profile.name!r} cannot train one example: it has {profile.train_memory_mb:.0f} MiB "
            f"for training, the model needs {fixed_mb:.0f} MiB (frozen base and adapter state) plus "
            f"{cost.activation_mb_per_example:.1f} MiB per example"
        )

    full_payload = cost.upload_bytes(family, policy.max_rank, policy.max_heads)
    download_s = transfer_seconds(full_payload, profile.downlink_mbps)
    reserved_upload_s = transfer_seconds(full_payload, profile.uplink_mbps)
    compute_window_s = max(0.0, policy.target_round_s - download_s - reserved_upload_s)
    affordable_examples = compute_window_s * profile.train_gflops * 1e9 / cost.train_flops_per_example
    steps = min(policy.max_steps, max(policy.min_steps, math.floor(affordable_examples / policy.max_batch)))
    batch = min(policy.max_batch, batch_cap, max(1, math.floor(affordable_examples / steps)))

    capability = min(1.0, profile.train_gflops / policy.reference_gflops)
    upload_allowance = policy.max_upload_fraction * policy.target_round_s * profile.uplink_mbps * 1e6 / 8
    adapter_allowance = upload_allowance - cost.fixed_bytes
    ranks = policy.ranks
    rank = max(
        [
            r
            for r in ranks
            if r <= capability * policy.max_rank and r * cost.adapter_bytes_per_rank <= adapter_allowance
        ],
        default=ranks[0],
    )
    heads_by_upload = (
        math.floor(adapter_allowance / cost.adapter_bytes_per_head)
        if cost.adapter_bytes_per_head
        else policy.max_heads
    )
    heads = max(1, min(policy.max_heads, math.floor(capability * policy.max_heads), heads_by_upload))

    flops = steps * batch * cost.train_flops_per_example
    compute_s = flops / (profile.train_gflops * 1e9)
    upload_s = transfer_seconds(cost.upload_bytes(family, rank, heads), profile.uplink_mbps)
    energy = None if profile.energy_j_per_gflop is None else flops / 1e9 * profile.energy_j_per_gflop
    return Budget(
        local_steps=steps,
        batch_size=batch,
        rank=rank,
        heads=heads,
        compute_s=compute_s,
        upload_s=upload_s,
        download_s=download_s,
        round_s=download_s + compute_s + upload_s,
        deadline_s=policy.target_round_s,
        energy_j=energy,
    )
