"""The virtual fleet: who the clients are, what data they hold and what each can afford.

A virtual client is a device profile, an array of example indices and a budget; it holds no model
and no tensors, so a fleet of 10,000 costs a few MB. Its adapter exists only while it is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devices.profiles import load_mix, sample_devices
from edge_client.budget import Budget, BudgetPolicy, DeviceProfile, ModelCost, compute_budget
from edge_client.planner import adapter_cost, round_policy, with_fixed_steps
from export.spec import rank_choices
from sim.config import SimConfig
from sim.partition import dirichlet_partition, iid_partition


class NoTrainingError(RuntimeError):
    """A run in which no client could train: reported instead of the untrained model's accuracy."""


@dataclass(frozen=True)
class VirtualClient:
    cid: str
    profile: DeviceProfile
    indices: np.ndarray
    budgets: dict[str, Budget]  # adapter family -> budget (a Ravan budget counts heads, LoRA ranks)

    @property
    def num_examples(self) -> int:
        return len(self.indices)


def model_cost(config: SimConfig, n_params: int, hidden: int, layers: int) -> ModelCost:
    """What one training example costs on a device (the whole model runs there: no prefix cache)."""
    return adapter_cost(n_params, hidden, layers, config.spec("lora"), config.max_len)


def policy(config: SimConfig, family: str, deadline_s: float) -> BudgetPolicy:
    """The round's limits for a family's clients: the device's own rule, with the run's deadline and
    every rank of the ladder (a method that takes heterogeneous ranks offers them)."""
    return round_policy(
        config.spec(family), deadline_s=deadline_s, max_steps=config.max_steps,
        max_batch=config.batch_size, ranks=rank_choices(config.rank),
    )  # fmt: skip


def build_fleet(config: SimConfig, labels: np.ndarray, cost: ModelCost) -> tuple[list[VirtualClient], float]:
    """The clients of an experiment and the round deadline (virtual seconds).

    Identical for every method of a comparison: they depend only on the config's seed.
    """
    if config.partition == "iid":
        parts = iid_partition(len(labels), config.clients, config.seed)
    else:
        parts = dirichlet_partition(labels, config.clients, config.alpha, config.seed)
    profiles = sample_devices(load_mix(config.device_mix), config.clients, config.seed)
    deadline = config.deadline_s or default_deadline(profiles, cost, config)
    clients = []
    for i, (profile, idx) in enumerate(zip(profiles, parts, strict=True)):
        budgets = client_budgets(config, profile, cost, deadline)
        clients.append(VirtualClient(f"c{i:05d}", profile, np.asarray(idx, dtype=np.int64), budgets))
    fastest = min(min(b.round_s for b in c.budgets.values()) for c in clients)
    if fastest > deadline:
        raise NoTrainingError(
            f"no client can finish a round within the {deadline:.1f} s deadline (the fastest needs "
            f"{fastest:.1f} s): raise --deadline, or lower --local-steps / --batch-size"
        )
    return clients, deadline


def client_budgets(
    config: SimConfig, profile: DeviceProfile, cost: ModelCost, deadline_s: float
) -> dict[str, Budget]:
    """A device's budget per adapter family for the run's deadline (``local_steps`` fixes the steps)."""
    budgets = {
        fam: compute_budget(profile, cost, policy(config, fam, deadline_s)) for fam in ("lora", "ravan")
    }
    return {fam: with_fixed_steps(b, config.local_steps) for fam, b in budgets.items()}


def default_deadline(profiles: list[DeviceProfile], cost: ModelCost, config: SimConfig) -> float:
    """A deadline at which the median device of the mix affords the round's full batches: ``max_steps``
    of them, or ``local_steps`` when those are fixed (sizing it for ``max_steps`` then would leave
    most devices late)."""
    gflops = float(np.median([p.train_gflops for p in profiles]))
    steps = config.local_steps or config.max_steps
    compute = steps * config.batch_size * cost.train_flops_per_example / (gflops * 1e9)
    return float(round(compute * 1.5 + 5.0, 1))
