"""How a round's client work reaches the virtual clients.

A transport takes the round's jobs (a client, its download, its plan) and returns their uploads.
``inproc`` trains them one after another on the one shared model; ``mqtt`` (sim.mqtt_transport)
sends them through a real broker to the real edge client code; ``ray`` spreads them over actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from torch import nn

from edge_client.local_round import LocalPlan, run_local_round, trained_kept
from edge_client.trainer import Trainer, TrainMetrics
from export.adapters import rank_view
from export.spec import AdapterSpec
from export.state import State
from sim.features import Inputs
from sim.fleet import VirtualClient
from sim.pool import ReplicaPool


@dataclass
class ClientJob:
    client: VirtualClient
    payload: State
    plan: LocalPlan
    batch_size: int
    data_seed: tuple[int, ...]  # seeds this client's batch order this round: same for every method
    keep_local: State | None = None  # tensors the client kept from its last round (FedSA-LoRA's B)
    round: int = 1  # the coordinator's round (1-based) this job belongs to


@dataclass
class ClientResult:
    cid: str
    upload: State
    metrics: TrainMetrics = field(default_factory=TrainMetrics)
    local: State = field(default_factory=dict)  # the kept tensors after training, for its next round


def train_client(
    trainer: Trainer,
    spec: AdapterSpec,
    template: State,
    inputs: Inputs,
    indices: np.ndarray,
    plan: LocalPlan,
    batch_size: int,
    data_seed: tuple[int, ...],
    payload: State,
    keep_local: State | None = None,
) -> tuple[State, TrainMetrics]:
    """One client's round from its payload: the same batches and numbers in every transport."""
    rng = np.random.default_rng(data_seed)
    batches = inputs.client_batches(indices, batch_size, plan.local_steps, rng)
    return run_local_round(trainer, spec, payload, template, batches, plan, keep_local)


class Transport(Protocol):
    def run(self, spec: AdapterSpec, jobs: list[ClientJob]) -> list[ClientResult]: ...

    def close(self) -> None: ...


class InProcTransport:
    """Every client trains in this process on the shared base model: one after another, or with a
    ``pool`` of client workers (sim/pool.py) as many at once, the longest first.

    A client costs its payload and its upload while it runs, nothing afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        trainer: Trainer,
        template: State,
        train: Inputs,
        train_fn: bool = True,
        pool: ReplicaPool | None = None,
    ):
        self.model, self.trainer, self.template, self.train_inputs = model, trainer, template, train
        self.train_fn = train_fn
        self.pool = pool or ReplicaPool([model], [trainer])

    def run(self, spec: AdapterSpec, jobs: list[ClientJob]) -> list[ClientResult]:
        if not self.train_fn:  # `bench sim --no-train`: measure everything but the training
            return [ClientResult(job.client.cid, rank_view(job.payload, job.plan.rank)) for job in jobs]
        return self.pool.map(
            lambda worker, job: self._train(self.pool.trainers[worker], spec, job),
            jobs,
            cost=lambda job: job.plan.local_steps * job.batch_size,
        )

    def _train(self, trainer: Trainer, spec: AdapterSpec, job: ClientJob) -> ClientResult:
        upload, metrics = train_client(
            trainer, spec, self.template, self.train_inputs, job.client.indices, job.plan,
            job.batch_size, job.data_seed, job.payload, job.keep_local,
        )  # fmt: skip
        return ClientResult(job.client.cid, upload, metrics, trained_kept(trainer, job.keep_local))

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""
