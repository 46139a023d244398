"""The ``mqtt`` transport: the real edge client code for every virtual client, over a real broker.

Each virtual client is an :class:`~edge_client.client.EdgeClient` with its own MQTT connection, its
own client id, last will and progress; all connections share one :class:`~edge_client.mqtt_pool.MqttPool`
(one event-loop thread, not a thread per client). Training runs on the caller's thread, one client
at a time on the one shared model, exactly as in ``inproc``: a round's announcement goes out retained
on the global topic, every virtual client decodes it, the sampled ones train and publish their
envelopes, and this transport (standing in for the coordinator's network side) decodes them. The
tensors survive the trip bit for bit, so a run gives the same numbers as ``inproc`` for the same seed.

The broker is a private loopback one started here (mosquitto when installed, else the embedded one)
unless ``broker_url`` names one.
"""

from __future__ import annotations

import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import numpy as np

from coordinator.broker import ChildBroker, local_broker
from edge_client.client import REJECTED, EdgeClient, EdgeConfig
from edge_client.local_round import LocalPlan
from edge_client.mqtt_link import LinkConfig, MqttLink
from edge_client.mqtt_pool import MqttPool
from edge_client.topics import global_topic, parse_up_topic, status_topic, up_subscription
from edge_client.trainer import Batch, Trainer, TrainMetrics
from edge_client.wire import GlobalHeader, decode_update, encode_global
from edge_client.wire_tensors import template_of
from export.spec import AdapterSpec
from export.state import State, kept_suffixes, without_kept
from sim.features import Inputs
from sim.transports import ClientJob, ClientResult

TIMEOUT_S = 300.0
METHOD = "sim"


class MqttTransport:
    """Virtual edge clients over MQTT (see the module docstring)."""

    def __init__(
        self,
        trainer: Trainer,
        template: State,
        train: Inputs,
        *,
        broker_url: str = "",
        run: str = "sim",
        workdir: Path | None = None,
    ) -> None:
        self.trainer, self.template, self.train_inputs, self.run_id = trainer, template, train, run
        self.broker: ChildBroker | None = None
        if broker_url:
            parsed = urlparse(broker_url)
            if parsed.scheme != "mqtt" or not parsed.hostname:
                raise ValueError(f"--broker must be mqtt://host:port, got {broker_url!r}")
            host, port = parsed.hostname, parsed.port or 1883
        else:
            folder = workdir or Path(tempfile.mkdtemp(prefix="fleetlora-sim-broker-"))
            folder.chmod(0o755)  # mosquitto started as root drops to its own user
            self.broker = local_broker(folder).start()
            host, port = self.broker.host, self.broker.port
        protocol: Literal["5", "3.1.1"] = "3.1.1" if getattr(self.broker, "protocol", "5") == "3.1.1" else "5"
        self._link_config = LinkConfig("sim-coordinator", host=host, port=port, protocol=protocol)
        self.pool = MqttPool(name="fleetlora-sim-mqtt")
        self.collector = MqttLink(self._link_config, pool=self.pool).start()
        self._received: dict[str, bytes] = {}
        self._arrived = threading.Condition()
        self.collector.subscribe(up_subscription(run), self._on_update)
        self._inbox: queue.SimpleQueue[tuple[EdgeClient, bytes]] = queue.SimpleQueue()
        self.clients: dict[str, EdgeClient] = {}
        self._jobs: dict[str, ClientJob] = {}
        self._metrics: dict[str, TrainMetrics] = {}
        self.round = 0
        if not self.collector.wait_subscribed(60):
            raise RuntimeError(f"could not subscribe at the broker {host}:{port}")

    def _on_update(self, topic: str, payload: bytes) -> None:
        _, cid = parse_up_topic(topic)
        with self._arrived:
            self._received[cid] = payload
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
                run=self.run_id, client_id=cid, spec=spec, num_examples=job.client.num_examples
            )

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
        """Train ``jobs`` through the broker; one announcement per distinct payload of the round."""
        results: dict[str, ClientResult] = {}
        groups: dict[int, list[ClientJob]] = {}
        for job in jobs:
            groups.setdefault(id(job.payload), []).append(job)
        for group in groups.values():
            results.update(self._run_group(spec, group))
        return [results[job.client.cid] for job in jobs]

    def _run_group(self, spec: AdapterSpec, jobs: list[ClientJob]) -> dict[str, ClientResult]:
        self.round += 1
        cids = [job.client.cid for job in jobs]
        for job in jobs:
            self._jobs[job.client.cid] = job
            self._client(spec, job)
            # The engine holds what each client keeps between rounds (FedSA-LoRA's B): as on a device
            # that kept it, the client starts from it, and its trained values come back in the result.
            self.clients[job.client.cid].kept = dict(job.keep_local or {})
        with self._arrived:
            self._received.clear()
        kept = kept_suffixes(jobs[0].keep_local or {})
        announcement = encode_global(
            jobs[0].payload, run=self.run_id, round=self.round, method=METHOD, spec=spec,
            deadline=time.time() + TIMEOUT_S, clients=cids, keep_local=kept,
            rank=spec.rank if spec.family == "lora" else None,  # one global: each client takes its slice
        )  # fmt: skip
        self.collector.publish(global_topic(self.run_id), announcement, qos=1, retain=True)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            with self._arrived:
                if all(cid in self._received for cid in cids):
                    break
            try:
                client, payload = self._inbox.get(timeout=0.05)
            except queue.Empty:
                if time.monotonic() > deadline:
                    missing = [c for c in cids if c not in self._received]
                    raise RuntimeError(
                        f"round {self.round}: no update from {missing[:5]} within {TIMEOUT_S} s"
                    ) from None
                continue
            if client.handle_global(payload) == REJECTED and client.config.client_id in cids:
                # Every announcement here is fresh and meant for it: a refusal is a bug, not a delay.
                raise RuntimeError(
                    f"round {self.round}: {client.config.client_id} refused the announcement: "
                    f"{client.last_rejection}"
                )
        shapes = template_of(without_kept(self.template, kept))
        out = {}
        for job in jobs:
            cid = job.client.cid
            self.clients[cid].settle(timeout_s=10.0)  # the broker's PUBACK: the client forgets its copy
            decoded = decode_update(
                self._received[cid], expected_run=self.run_id, expected_client=cid, rounds=self.round,
                spec=spec, template=shapes, key=None, method=METHOD,
            )  # fmt: skip
            metrics = self._metrics.pop(cid, TrainMetrics())
            out[cid] = ClientResult(cid, decoded.state, metrics, self.clients[cid].kept)
        return out

    def close(self) -> None:
        for client in self.clients.values():
            client.link.close()
        self.collector.close()
        self.pool.close()
        if self.broker is not None:
            self.broker.stop()
