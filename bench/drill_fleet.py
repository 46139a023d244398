"""Scripted fleets for the reliability drills (RELIABILITY.md): the real edge client without a model.

Each drill device is a real :class:`~edge_client.client.EdgeClient` on a real
:class:`~protocol.mqtt_link.MqttLink` (all of them on one :class:`~protocol.mqtt_pool.MqttPool`),
trained by :class:`NudgeTrainer`, which adds a delta drawn from a seed of (client, round) to the
global adapter it received. The trained state is therefore a pure function of the announcement, so an
uninterrupted in-process run (:func:`reference_run`) must reproduce a faulty run's final global adapter
bit for bit when the faulty run lost and double-counted nothing.

The model is one LoRA layer of a chosen size (:func:`dense_template`), so the drills measure the
service, the store and the broker, not a transformer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch

from coordinator import aggregators
from coordinator.metrics import MetricsLog
from coordinator.service import RoundService, ServiceConfig
from coordinator.store import RoundStore
from edge_client.client import EdgeClient, EdgeConfig
from edge_client.local_round import LocalPlan
from edge_client.trainer import Batch, StepBudget, TrainMetrics
from export.spec import AdapterSpec
from export.state import LORA_A, LORA_B, State
from protocol.mqtt_link import LinkConfig, MqttLink
from protocol.mqtt_pool import MqttPool
from protocol.topics import status_topic, up_topic
from protocol.wire import GlobalHeader, decode_global, encode_update
from protocol.wire_tensors import template_of

log = logging.getLogger(__name__)

RUN = "drill"
METHOD = "fedit"
LAYER = "drill.dense"
RANK = AdapterSpec().rank


def dense_template(payload_bytes: int, rank: int = RANK) -> State:
    """A one-layer LoRA trainable state (float32 ``A`` and ``B`` of the spec's rank) of about
    ``payload_bytes``: the size of an update, without a model behind it."""
    width = max(1, payload_bytes // (4 * 2 * rank))
    return {LAYER + LORA_A: torch.zeros(rank, width), LAYER + LORA_B: torch.zeros(width, rank)}


def client_names(n: int, prefix: str = "d") -> tuple[str, ...]:
    return tuple(f"{prefix}{i:05d}" for i in range(n))


def examples_of(client: str) -> int:
    """A client's number of local examples: uneven, so the weighted mean is not a plain mean."""
    return 5 + int(hashlib.sha256(client.encode()).hexdigest()[:4], 16) % 20


def nudge(client: str, round: int, like: torch.Tensor, scale: float = 0.01) -> torch.Tensor:
    """The deterministic change ``client`` makes in ``round``."""
    seed = int.from_bytes(hashlib.sha256(f"{client}:{round}".encode()).digest()[:8], "big") >> 1
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed)) * scale


def trained(client: str, round: int, received: Mapping[str, torch.Tensor]) -> State:
    """What a drill device uploads for ``round``, given the adapter it received."""
    return {k: v + nudge(client, round, v) for k, v in received.items()}


class NudgeTrainer:
    """A stand-in :class:`~edge_client.trainer.Trainer`: the batch names the round, training nudges."""

    def __init__(self, client: str) -> None:
        self.client = client
        self.state: State = {}

    def set_trainable(self, state: State) -> None:
        self.state = dict(state)

    def select_heads(self, heads: list[int] | None) -> None:
        """No heads in a dense state."""

    def train(self, batches: Iterable[Batch], budget: StepBudget) -> TrainMetrics:
        for batch in batches:
            self.state = trained(self.client, int(batch["round"]), self.state)
        return TrainMetrics(steps=budget.local_steps)

    def get_trainable(self) -> State:
        return self.state


def make_service(
    state_dir: Path,
    clients: tuple[str, ...],
    template: State,
    *,
    sync: bool = False,
    device_keys: Mapping[str, bytes] | None = None,
    **config: object,
) -> RoundService:
    """A FedIT coordinator over the dense template, persisting to ``state_dir``."""
    spec = AdapterSpec()
    options = {"min_clients": len(clients), "deadline_s": 600.0, "rounds": 1, **config}
    service_config = ServiceConfig(run=RUN, method=METHOD, clients=clients, **options)  # type: ignore[arg-type]
    agg = aggregators.create(METHOD, spec, device="cpu")
    metrics = MetricsLog(state_dir / "metrics.jsonl")
    store = RoundStore(state_dir, sync=sync)
    return RoundService(service_config, spec, agg, template, store, metrics, device_keys=device_keys)


class DrillFleet:
    """Drill devices on one pool; one worker thread hands them the announcements.

    Parameters
    ----------
    port : int
        The broker's plain loopback port.
    clients : tuple of str
    template : State
    vanish : mapping of round to client ids, optional
        Those clients close their link when that round is announced, without answering (dropouts).
    link_options : mapping, or a callable of the client id giving one, optional
        Extra :class:`LinkConfig` fields (credentials, TLS, back-off).
    keys : mapping of client id to HMAC key, optional
        Each device signs its updates with its key.
    answer_gap_s : float
        Pause after each answer, so a round's updates arrive spread out as a real fleet's do rather
        than in one burst the coordinator persists at once (the crash drill needs rounds that are
        open with some of their updates on disk).
    """

    def __init__(
        self,
        port: int,
        clients: tuple[str, ...],
        template: State,
        *,
        vanish: Mapping[int, Iterable[str]] | None = None,
        link_options: Mapping[str, object] | Callable[[str], Mapping[str, object]] | None = None,
        keys: Mapping[str, bytes] | None = None,
        answer_gap_s: float = 0.0,
    ) -> None:
        self.port, self.template, self.answer_gap_s = port, template, answer_gap_s
        self.vanish = {r: set(ids) for r, ids in (vanish or {}).items()}
        self.link_options = link_options if callable(link_options) else (lambda _c: link_options or {})
        self.keys = dict(keys or {})
        self.pool = MqttPool(name="drill-fleet")
        self.inbox: queue.SimpleQueue[tuple[EdgeClient, bytes]] = queue.SimpleQueue()
        self.devices: dict[str, EdgeClient] = {}
        self.outcomes: dict[str, list[str]] = {c: [] for c in clients}
        self.stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="drill-worker", daemon=True)
        for client in clients:
            self.join(client)

    def join(self, client: str) -> EdgeClient:
        """Bring ``client`` online (again, after it vanished: a fresh process with no memory)."""
        options = {"backoff_max_s": 1.0, "connect_jitter_s": 0.2, **self.link_options(client)}
        link = MqttLink(
            LinkConfig(client, port=self.port, status_topic=status_topic(RUN, client), **options),  # type: ignore[arg-type]
            pool=self.pool,
        )
        config = EdgeConfig(
            run=RUN, client_id=client, spec=AdapterSpec(), num_examples=examples_of(client),
            key=self.keys.get(client),
        )  # fmt: skip
        device = EdgeClient(config, link, NudgeTrainer(client), self.template, _plan, _batches)
        self.devices[client] = device
        self.outcomes.setdefault(client, [])
        device.subscribe(lambda dev, payload: self.inbox.put((dev, payload)))
        link.start()
        return device

    def start(self) -> DrillFleet:
        self._worker.start()
        return self

    def _work(self) -> None:
        while not self.stop.is_set():
            try:
                device, payload = self.inbox.get(timeout=0.05)
            except queue.Empty:
                for d in list(self.devices.values()):
                    d.settle()
                continue
            cid = device.config.client_id
            if self.devices.get(cid) is not device:
                continue  # an announcement for a device that has vanished since
            round = _round_of(payload)
            if cid in self.vanish.get(round, ()):
                del self.devices[cid]
                self.outcomes[cid].append(f"vanished@{round}")
                device.link.close()
                continue
            self.outcomes[cid].append(device.handle_global(payload))
            device.settle()
            self.stop.wait(self.answer_gap_s)

    def finished(self) -> bool:
        """Every online device has seen the final announcement and has nothing pending."""
        return all(d.finished.is_set() and d.progress.pending_round == 0 for d in self.devices.values())

    def close(self) -> None:
        self.stop.set()
        if self._worker.is_alive():
            self._worker.join(10)
        for device in self.devices.values():
            device.link.close()
        self.pool.close()


def _plan(header: GlobalHeader) -> LocalPlan:
    return LocalPlan(1)


def _batches(header: GlobalHeader, plan: LocalPlan) -> Iterator[Batch]:
    yield {"round": torch.tensor(header.round)}


def _round_of(payload: bytes) -> int:
    """The round of an announcement (0 when it does not decode: the device will refuse it itself)."""
    try:
        (n,) = struct.unpack_from(">I", payload, 4)
        return int(json.loads(payload[8 : 8 + n])["round"])
    except (ValueError, KeyError, struct.error):
        return 0


def reference_run(
    state_dir: Path, clients: tuple[str, ...], template: State, rounds: int
) -> tuple[State, list[list[str]]]:
    """An uninterrupted in-process run in which every client answers every round once.

    Returns the final global adapter and the clients aggregated in each round.
    """
    service = make_service(state_dir, clients, template, rounds=rounds)
    service.start()
    spec, shapes = service.spec, template_of(template)
    while not service.finished:
        announced = decode_global(
            service.announcement, expected_run=RUN, spec=spec, template=shapes, key=None
        )
        round = announced.header.round
        envelopes = [
            (
                up_topic(RUN, c),
                encode_update(
                    trained(c, round, announced.state), run=RUN, round=round, client=c, method=METHOD,
                    spec=spec, num_examples=examples_of(c), local_steps=1, compute_s=0.0, rank=spec.rank,
                ),
            )
            for c in clients
        ]  # fmt: skip
        service.receive(envelopes)
        service.tick()
    service.metrics.close()
    return {k: v.cpu() for k, v in service.global_state.items()}, [r["clients"] for r in service.history]
