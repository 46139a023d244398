"""The coordinator service over MQTT: one link, one service thread, acknowledgements after persistence.

The link's loop thread only receives: each update is handed to the service thread, which validates a
batch of them and hands the accepted ones to a writer thread that persists the batch (one segment,
one flush); only then is the whole batch acknowledged to the broker (MQTT 5 manual PUBACK). So the
validation of one batch overlaps the write and fsync of the one before, and a round closes only once
every batch it counted is written. The link announces a receive maximum of ``WINDOW`` (MQTT 5): the
broker may hold back deliveries beyond it until earlier ones are acknowledged (see RELIABILITY.md for
what mosquitto 2.0.11 was measured to do under a burst).
Devices' status messages (``fleetlora/{run}/status/+``: ``refused: <why>``, ``offline``) are logged by
device. A link that gives up (the broker refused the coordinator's credentials ``max_auth_failures``
times in a row) ends :func:`serve` with :class:`LinkFailed`.
A coordinator killed before that point leaves the
messages unacknowledged in its broker session, and the broker delivers them again when it comes back
(same client id, no clean start, session expiry). The announcement is published retained, QoS 1,
and again after every reconnect (a restarted broker without persistence has forgotten it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from coordinator.metrics import MetricsLog
from coordinator.service import RoundService
from coordinator.store import RoundStore
from protocol.mqtt_link import Delivery, InboundMessage, LinkConfig, MqttLink, MqttLinkError
from protocol.mqtt_types import Payload
from protocol.topics import global_topic, parse_status_topic, status_subscription, up_subscription
from protocol.wire_errors import EnvelopeError

log = logging.getLogger(__name__)

WINDOW = 256  # unacknowledged deliveries the broker may have out to the coordinator
# A batch is validated, then persisted (one flush) and acknowledged together. Several batches fit
# the window, so the broker keeps delivering while one is being written.
BATCH_MAX = 64
BATCH_BYTES = 32 << 20
POLL_S = 0.2
PENDING_POLL_S = 0.002  # how soon a finished write is acknowledged while the inbox is quiet


class LinkFailed(MqttLinkError):
    """The coordinator's link gave up connecting (its ``failure`` says why)."""


def _drain(inbox: queue.SimpleQueue[InboundMessage], timeout_s: float) -> list[InboundMessage]:
    try:
        batch = [inbox.get(timeout=timeout_s)]
    except queue.Empty:
        return []
    size = len(batch[0].payload)
    while len(batch) < BATCH_MAX and size < BATCH_BYTES:
        try:
            batch.append(inbox.get_nowait())
        except queue.Empty:
            break
        size += len(batch[-1].payload)
    return batch


class _Persister:
    """Writes admitted batches on one writer thread; acknowledges each batch, in order, once written.

    A failed write raises from :meth:`ack_written` and acknowledges nothing of that batch or later
    ones: the broker keeps them for the next start.
    """

    def __init__(self, store: RoundStore, link: MqttLink, metrics: MetricsLog) -> None:
        self._store, self._link, self._metrics = store, link, metrics
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="coordinator-persist")
        self._pending: deque[tuple[Future[None], list[InboundMessage]]] = deque()

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def submit(self, round: int, records: list[tuple[str, Payload]], messages: list[InboundMessage]) -> None:
        self._pending.append((self._pool.submit(self._save, round, records), messages))

    def _save(self, round: int, records: list[tuple[str, Payload]]) -> None:
        start = time.perf_counter()
        self._store.save_updates(round, records)
        self._metrics.notify("persisted", seconds=time.perf_counter() - start, updates=len(records))

    def ack_written(self, *, wait: bool = False) -> None:
        """Acknowledge the batches written so far (``wait``: every batch submitted so far)."""
        while self._pending and (wait or self._pending[0][0].done()):
            written, messages = self._pending[0]
            written.result()
            self._pending.popleft()
            for message in messages:  # persisted (or rejected for good): the broker may forget them
                self._link.ack(message)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def serve(
    service: RoundService,
    link_config: LinkConfig,
    stop: threading.Event,
    *,
    share_group: str | None = None,
    final_timeout_s: float = 10.0,
    ready: threading.Event | None = None,
) -> RoundService:
    """Run ``service`` over MQTT until its last round is aggregated or ``stop`` is set.

    ``ready`` is set once the broker has acknowledged the subscription to the updates. Returns the
    service (its ``history`` holds the per-round records). State is persisted after every
    change, so stopping at any point (``stop``, SIGTERM, ``kill -9``) and serving again resumes.
    """
    run = service.config.run
    announcement = service.start()
    window = link_config.receive_maximum or WINDOW
    link = MqttLink(replace(link_config, manual_ack=True, receive_maximum=window)).start()
    persister = _Persister(service.store, link, service.metrics)
    inbox: queue.SimpleQueue[InboundMessage] = queue.SimpleQueue()
    link.subscribe_acked(up_subscription(run, share_group), inbox.put)
    statuses: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()  # logged on this thread
    link.subscribe(status_subscription(run), lambda topic, payload: statuses.put((topic, payload)))
    topic = global_topic(run)
    announced_on = 0  # the connection the current announcement went out on
    last: Delivery | None = None
    try:
        while not stop.is_set():
            if link.failure is not None:
                raise LinkFailed(link.failure)
            _log_statuses(service, statuses)
            if ready is not None and not ready.is_set() and link.wait_subscribed(0):
                ready.set()
            if link.connected and link.connects != announced_on:
                if announced_on and not service.finished:  # reconnected: the broker may have lost updates
                    announcement = service.reannounce()
                last = link.publish(topic, announcement, qos=1, retain=True)
                announced_on = link.connects
            if service.finished:
                if announced_on:
                    break
                stop.wait(POLL_S)  # resumed after the last round: publish the final announcement first
                continue
            poll = PENDING_POLL_S if persister.busy else POLL_S
            batch = _drain(inbox, min(poll, max(service.seconds_to_deadline(), 0.001)))
            if batch:
                _log_statuses(service, statuses)  # a device's "training" before the update it then sent
                records = service.admit([(m.topic, m.payload) for m in batch])
                persister.submit(service.round, records, batch)
            persister.ack_written(wait=service.close_due())  # a round closes on written updates only
            new = service.tick()
            if new is not None:
                announcement = new
                last = link.publish(topic, announcement, qos=1, retain=True)
                announced_on = link.connects
        persister.ack_written(wait=True)
        if service.finished and last is not None and not last.wait(final_timeout_s):
            log.warning("the final announcement was not acknowledged within %.0f s", final_timeout_s)
    finally:
        persister.close()
        link.close()  # after the queued acknowledgements: the loop runs its calls in order
    return service


def _log_statuses(service: RoundService, statuses: queue.SimpleQueue[tuple[str, bytes]]) -> None:
    while True:
        try:
            topic, payload = statuses.get_nowait()
        except queue.Empty:
            return
        try:
            _, client = parse_status_topic(topic)
        except EnvelopeError as e:
            log.debug("ignored a status message: %s", e)
            continue
        service.device_status(client, payload)
