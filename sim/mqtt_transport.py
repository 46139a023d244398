"""The ``mqtt`` transport: the real coordinator service and the real edge client code for every
virtual client, over a real broker, with keys as deployed.

Each virtual client is an :class:`~edge_client.client.EdgeClient` with its own MQTT connection, its
own client id, device key, last will and progress; all connections share one
:class:`~protocol.mqtt_pool.MqttPool` (one event-loop thread, not a thread per client). A round is
the coordinator's: a :class:`~coordinator.service.RoundService` (the one ``fleetlora coordinator
serve`` runs) samples the round's clients with the one sampler, signs and publishes its announcement
(retained, one global for all), and validates every update that arrives with its device's key
(:meth:`~coordinator.service.RoundService.admit`). The engine aggregates (with its server
optimizer), as for every transport. Training runs on the caller's thread, one client at a time on
the one shared model, exactly as in ``inproc``; the tensors survive the trip bit for bit, so a run
gives the same numbers as ``inproc`` for the same seed.

The broker is a private loopback one started here (mosquitto when installed, else the embedded one)
unless ``broker_url`` names one.
"""

from __future__ import annotations

import queue
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import numpy as np

from broker.child import ChildBroker
from broker.mosquitto import local_broker
from coordinator.aggregators import Aggregator
from coordinator.metrics import MetricsLog
from coordinator.service import RoundService, ServiceConfig
from coordinator.store import RoundStore
from edge_client.client import REJECTED, EdgeClient, EdgeConfig
from edge_client.local_round import LocalPlan
from edge_client.trainer import Batch, Trainer, TrainMetrics
from export.spec import AdapterSpec
from export.state import State
from protocol.mqtt_link import LinkConfig, MqttLink
from protocol.mqtt_pool import MqttPool
from protocol.topics import global_topic, status_topic, up_subscription, up_topic
from protocol.wire import GlobalHeader, unpack
from sim.features import Inputs
from sim.transports import ClientJob, ClientResult

TIMEOUT_S = 300.0


class MqttTransport:
    """Virtual edge clients over MQTT (see the module docstring)."""

    def __init__(
        self,
        trainer: Trainer,
        template: State,
        train: Inputs,
        aggregator: Aggregator,
        spec: AdapterSpec,
        roster: Sequence[str],
        *,
        method: str,
        seed: int,
        per_round: int,
        broker_url: str = "",
        run: str = "sim",
        workdir: Path | None = None,
    ) -> None:
        self.trainer, self.template, self.train_inputs, self.run_id = trainer, template, train, run
        self.broker: ChildBroker | None = None
        folder = workdir or Path(tempfile.mkdtemp(prefix="fleetlora-sim-mqtt-"))
        if broker_url:
            parsed = urlparse(broker_url)
            if parsed.scheme != "mqtt" or not parsed.hostname:
                raise ValueError(f"--broker must be mqtt://host:port, got {broker_url!r}")
            host, port = parsed.hostname, parsed.port or 1883
        else:
            folder.chmod(0o755)  # mosquitto started as root drops to its own user
            self.broker = local_broker(folder / "broker").start()
            host, port = self.broker.host, self.broker.port
        protocol: Literal["5", "3.1.1"] = "3.1.1" if getattr(self.broker, "protocol", "5") == "3.1.1" else "5"
        self._link_config = LinkConfig("sim-coordinator", host=host, port=port, protocol=protocol)
        # Keys as deployed: every update is signed by its device, every announcement by the coordinator.
        self.device_keys = {cid: secrets.token_bytes(32) for cid in roster}
        self.coordinator_key = secrets.token_bytes(32)
        config = ServiceConfig(
            run=run, method=method, rounds=2**31 - 2, min_clients=1, deadline_s=TIMEOUT_S,
            clients=tuple(roster), clients_per_round=per_round, seed=seed,
        )  # fmt: skip
        self.service = RoundService(
            config, spec, aggregator, template, RoundStore(folder / "coordinator", sync=False),
            MetricsLog(None), device_keys=self.device_keys, coordinator_key=self.coordinator_key,
        )  # fmt: skip
        self.pool = MqttPool(name="fleetlora-sim-mqtt")
        self.collector = MqttLink(self._link_config, pool=self.pool).start()
        self._received: dict[str, bytes] = {}
        self._arrived = threading.Condition()
        self.collector.subscribe(up_subscription(run), self._on_update)
        self._inbox: queue.SimpleQueue[tuple[EdgeClient, bytes]] = queue.SimpleQueue()
        self.clients: dict[str, EdgeClient] = {}
        self._jobs: dict[str, ClientJob] = {}
        self._metrics: dict[str, TrainMetrics] = {}
        if not self.collector.wait_subscribed(60):
            raise RuntimeError(f"could not subscribe at the broker {host}:{port}")

    def _on_update(self, topic: str, payload: bytes) -> None:
        with self._arrived:
            self._received[topic] = payload
            self._arrived.notify_all()

    # ---- virtual clients ---------------------------------------------------------------------------

    def _plan(self, cid: str) -> LocalPlan:
        return self._jobs[cid].plan

    def _batches(self, cid: str, plan: LocalPlan) -> Iterator[Batch]:
        job = self._jobs[cid]
        rng = np.random.default_rng(job.data_seed)
        return self.train_inputs.client_batches(job.client.indices, job.batch_size, plan.local_steps, rng)

    def _client(self, spec: AdapterSpec, job: ClientJob) -> EdgeClient:
        cid = job.client.cid
        if cid not in self.clients:
            link_cfg = LinkConfig(
                cid, host=self._link_config.host, port=self._link_config.port,
                protocol=self._link_config.protocol, status_topic=status_topic(self.run_id, cid),
            )  # fmt: skip
            link = MqttLink(link_cfg, pool=self.pool).start()
            config = EdgeConfig(
                run=self.run_id, client_id=cid, spec=spec, num_examples=job.client.num_examples,
                key=self.device_keys[cid], coordinator_key=self.coordinator_key,
            )  # fmt: skip

            def plan(header: GlobalHeader, cid: str = cid) -> LocalPlan:
                return self._plan(cid)

            def batches(header: GlobalHeader, plan: LocalPlan, cid: str = cid) -> Iterator[Batch]:
                return self._batches(cid, plan)

            def trained(header: GlobalHeader, metrics: TrainMetrics, cid: str = cid) -> None:
                self._metrics[cid] = metrics

            client = EdgeClient(config, link, self.trainer, self.template, plan, batches, trained)
            client.subscribe(lambda c, payload: self._inbox.put((c, payload)))
            self.clients[cid] = client
        return self.clients[cid]

    # ---- rounds ------------------------------------------------------------------------------------

    def run(self, spec: AdapterSpec, jobs: list[ClientJob]) -> list[ClientResult]:
        """Train ``jobs`` (the round's sampled clients that neither drop out nor miss the deadline)
        through the broker: the coordinator service announces the round's one global, the clients
        train and publish, the service validates their updates."""
        if not jobs:
            return []
        service, round = self.service, jobs[0].round
        for job in jobs:
            self._jobs[job.client.cid] = job
            self._client(spec, job)
            # The engine holds what each client keeps between rounds (FedSA-LoRA's B): as on a device
            # that kept it, the client starts from it, and its trained values come back in the result.
            self.clients[job.client.cid].kept = dict(job.keep_local or {})
        with self._arrived:
            self._received.clear()
        announcement = service.open_round(round, jobs[0].payload)
        cids = [job.client.cid for job in jobs]
        assert service.state is not None
        strangers = sorted(set(cids) - set(service.state.sampled or ()))
        if strangers:  # the engine and the service sample with the one sampler: a mismatch is a bug
            raise RuntimeError(
                f"round {round}: {strangers[:5]} trained but the coordinator did not sample them"
            )
        self.collector.publish(global_topic(self.run_id), announcement, qos=1, retain=True)
        self._await(round, cids)
        with self._arrived:
            arrived = list(self._received.items())
        service.admit(arrived)
        missing = [c for c in cids if c not in service.accepted]
        if missing:
            raise RuntimeError(
                f"round {round}: the coordinator refused the update of {missing[:5]}: "
                f"{dict(service.tally.rejected)} (see the log)"
            )
        out = []
        for job in jobs:
            cid = job.client.cid
            self.clients[cid].settle(timeout_s=10.0)  # the broker's PUBACK: the client forgets its copy
            metrics = self._metrics.pop(cid, TrainMetrics())
            out.append(ClientResult(cid, service.accepted[cid].update.state, metrics, self.clients[cid].kept))
        return out

    def _await(self, round: int, cids: list[str]) -> None:
        """Hand announcements to the clients until every one of ``cids`` has published its update."""
        topics = {up_topic(self.run_id, c): c for c in cids}
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            with self._arrived:
                if set(topics) <= set(self._received):
                    return
            try:
                client, payload = self._inbox.get(timeout=0.05)
            except queue.Empty:
                if time.monotonic() > deadline:
                    missing = [c for t, c in topics.items() if t not in self._received]
                    raise RuntimeError(
                        f"round {round}: no update from {missing[:5]} within {TIMEOUT_S} s"
                    ) from None
                continue
            if client.config.client_id not in cids or unpack(payload)[0].get("round") != round:
                # A sampled client that drops out or misses the deadline is away this round, and an
                # earlier round's retained announcement reaching a new subscriber is history.
                continue
            if client.handle_global(payload) == REJECTED:
                # Every announcement here is fresh and meant for it: a refusal is a bug, not a delay.
                who = client.config.client_id
                raise RuntimeError(f"round {round}: {who} refused the announcement: {client.last_rejection}")

    def close(self) -> None:
        for client in self.clients.values():
            client.link.close()
        self.collector.close()
        self.pool.close()
        if self.broker is not None:
            self.broker.stop()
