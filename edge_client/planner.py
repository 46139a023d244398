"""One planner: a device's profile and the round's deadline become its plan, in the simulator and on
the device alike.

A plan is the local steps, the batch size, the LoRA rank (HetLoRA, FlexLoRA, FLoRA: methods whose
announcement offers ``rank_choices``) and the Ravan heads a device trains this round. The budget
rules are :func:`edge_client.budget.compute_budget`; this module turns a budget into a
:class:`~edge_client.local_round.LocalPlan` (:func:`plan_from_budget`) the same way everywhere:

- the simulator sizes each virtual client's budget once (:func:`round_policy` with the run's
  deadline) and plans every round with :func:`plan_from_budget`;
- a device (:class:`DevicePlanner`, wired by ``fleetlora client``) sizes its budget at each
  announcement for the time left to the deadline, with the rank choices the announcement offers,
  and plans with the same :func:`plan_from_budget`.

The coordinator sends one global adapter per round (one retained message); each device takes its
slice of it in :func:`edge_client.local_round.run_local_round` (:func:`export.adapters.rank_view`:
the first ``r_k`` components of every LoRA pair, which is also FlexLoRA's truncation, since its
global is ordered by singular value; Ravan: the heads it trains), so the simulator and a device
train from the same tensors bit for bit.

Ravan heads are a SHA-256 draw (:func:`draw_heads`), reproducible in any language (``native/``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from edge_client.budget import Budget, BudgetPolicy, DeviceProfile, ModelCost, compute_budget
from edge_client.local_round import LocalPlan
from export.spec import AdapterSpec

MIN_ROUND_S = 1.0  # a device never plans for less time than this, however late it is
DEFAULT_MIN_STEPS = 8  # the most local steps a device plans unless told more (--local-steps)
DEFAULT_MAX_BATCH = 16


def round_policy(
    spec: AdapterSpec,
    *,
    deadline_s: float,
    max_steps: int,
    max_batch: int,
    ranks: Sequence[int] | None = None,
) -> BudgetPolicy:
    """The limits a round sets: the spec's full rank and heads, the deadline, the step and batch caps.

    ``ranks``: the LoRA ranks a device may train (``None``: the spec's rank only).
    """
    return BudgetPolicy(
        max_steps=max_steps, max_batch=max_batch, max_rank=spec.rank,
        rank_choices=tuple(ranks) if ranks else (spec.rank,), max_heads=spec.heads,
        target_round_s=deadline_s, family=spec.family,
    )  # fmt: skip


def device_policy(
    spec: AdapterSpec,
    *,
    local_steps: int,
    max_batch: int,
    target_round_s: float,
    ranks: Sequence[int] | None = None,
) -> BudgetPolicy:
    """The policy a device trains under for ``target_round_s`` seconds left to the deadline.

    ``local_steps`` (``--local-steps``, 0 when not given) raises the step cap above
    :data:`DEFAULT_MIN_STEPS`; ``max_batch`` is the client's largest batch.
    """
    return round_policy(
        spec, deadline_s=max(MIN_ROUND_S, target_round_s), max_steps=max(local_steps, DEFAULT_MIN_STEPS),
        max_batch=max_batch, ranks=ranks,
    )  # fmt: skip


def adapter_cost(n_params: int, hidden: int, layers: int, spec: AdapterSpec, seq_len: int) -> ModelCost:
    """The per-example cost of training ``spec``'s adapter on an encoder of ``n_params`` parameters,
    width ``hidden`` and ``layers`` blocks, at ``seq_len`` tokens (the whole model runs on the device:
    no cached prefix)."""
    adapted_layers = len(spec.layers) or layers
    return ModelCost.estimate(
        n_params=n_params, seq_len=seq_len, hidden=hidden, layers=layers,
        adapted_scalars_per_rank=adapted_layers * len(spec.target_modules) * 2 * hidden,
        ravan_rank=spec.rank, ravan_heads=spec.heads,
    )  # fmt: skip


def model_cost(model: Any, spec: AdapterSpec, seq_len: int) -> ModelCost:
    """:func:`adapter_cost` of a registered encoder model (peft-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps LoRA
    enc = base.encoder.config
    n_params = sum(p.numel() for p in model.parameters())
    return adapter_cost(n_params, enc.hidden_size, enc.num_hidden_layers, spec, seq_len)


def draw_heads(client: str, round: int, total: int, n: int) -> tuple[int, ...]:
    """The Ravan heads ``client`` trains in ``round``: the ``n`` of ``total`` heads with the smallest
    ``SHA-256("{client}:{round}:{head}")``, ascending."""
    ranked = sorted(range(total), key=lambda h: hashlib.sha256(f"{client}:{round}:{h}".encode()).digest())
    return tuple(sorted(ranked[:n]))


def with_fixed_steps(budget: Budget, steps: int) -> Budget:
    """``budget`` with ``steps`` local steps (``--local-steps``; 0 leaves it), its times rescaled."""
    if not steps:
        return budget
    compute = budget.compute_s * steps / max(budget.local_steps, 1)
    return replace(
        budget, local_steps=steps, compute_s=compute, round_s=compute + budget.upload_s + budget.download_s
    )


def plan_from_budget(
    budget: Budget, spec: AdapterSpec, client: str, round: int, *, heterogeneous_ranks: bool
) -> LocalPlan:
    """A device's plan for ``round`` from its budget: its steps and batch, its LoRA rank when the
    method takes heterogeneous ranks and the budget affords less than the spec's, its Ravan heads
    (:func:`draw_heads`) when it affords fewer than all."""
    rank = heads = None
    if spec.family == "ravan":
        if budget.heads < spec.heads:
            heads = draw_heads(client, round, spec.heads, budget.heads)
    elif heterogeneous_ranks and budget.rank < spec.rank:
        rank = budget.rank
    return LocalPlan(budget.local_steps, rank=rank, heads=heads, batch_size=budget.batch_size)


@dataclass
class DevicePlanner:
    """A device's plan at each announcement: its profile's budget for the time left to the deadline.

    ``profile`` ``None``: no budget, every round trains ``local_steps`` (or 5) steps of ``max_batch``
    at the spec's full rank and heads. ``local_steps`` > 0 fixes the steps (the budget still sets the
    batch, rank and heads).
    """

    spec: AdapterSpec
    client: str
    cost: ModelCost
    profile: DeviceProfile | None = None
    local_steps: int = 0
    max_batch: int = DEFAULT_MAX_BATCH

    def budget(self, deadline: float, ranks: Sequence[int] | None, now: float | None = None) -> Budget:
        """The profile's budget for a round due at ``deadline`` (Unix time), before ``local_steps``."""
        assert self.profile is not None
        now = time.time() if now is None else now
        policy = device_policy(
            self.spec, local_steps=self.local_steps, max_batch=self.max_batch,
            target_round_s=deadline - now, ranks=ranks,
        )  # fmt: skip
        return compute_budget(self.profile, self.cost, policy)

    def plan(self, header: Any) -> LocalPlan:
        """The plan for an announcement (a :class:`~protocol.wire.GlobalHeader`)."""
        if self.profile is None:
            return LocalPlan(self.local_steps or 5, batch_size=self.max_batch)
        ranks = header.rank_choices
        budget = with_fixed_steps(self.budget(header.deadline, ranks), self.local_steps)
        return plan_from_budget(
            budget, self.spec, self.client, header.round, heterogeneous_ranks=ranks is not None
        )
