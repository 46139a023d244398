"""The coordinator service over MQTT: one link, one service thread, acknowledgements after persistence.

The link's loop thread only receives: each update is handed to the service thread, which validates a
batch of them, persists the accepted ones (one flush for the batch), and only then acknowledges the
whole batch to the broker (MQTT 5 manual PUBACK). The link announces a receive maximum of
``BATCH_MAX`` (MQTT 5): the broker may hold back deliveries beyond it until earlier ones are
acknowledged (see RELIABILITY.md for what mosquitto 2.0.11 was measured to do under a burst).
A coordinator killed before that point leaves the
messages unacknowledged in its broker session, and the broker delivers them again when it comes back
(same client id, no clean start, session expiry). The announcement is published retained, QoS 1,
and again after every reconnect (a restarted broker without persistence has forgotten it).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import replace

from coordinator.service import RoundService
from edge_client.mqtt_link import Delivery, InboundMessage, LinkConfig, MqttLink
from edge_client.topics import global_topic, up_subscription

log = logging.getLogger(__name__)

BATCH_MAX = 256  # updates validated and persisted together (one flush), then acknowledged together
POLL_S = 0.2


def _drain(inbox: queue.SimpleQueue[InboundMessage], timeout_s: float) -> list[InboundMessage]:
    try:
        batch = [inbox.get(timeout=timeout_s)]
    except queue.Empty:
        return []
    while len(batch) < BATCH_MAX:
        try:
            batch.append(inbox.get_nowait())
        except queue.Empty:
            break
    return batch


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
    window = link_config.receive_maximum or BATCH_MAX
    link = MqttLink(replace(link_config, manual_ack=True, receive_maximum=window)).start()
    inbox: queue.SimpleQueue[InboundMessage] = queue.SimpleQueue()
    link.subscribe_acked(up_subscription(run, share_group), inbox.put)
    topic = global_topic(run)
    announced_on = 0  # the connection the current announcement went out on
    last: Delivery | None = None
    try:
        while not stop.is_set():
            if ready is not None and not ready.is_set() and link.wait_subscribed(0):
                ready.set()
            if link.connected and link.connects != announced_on:
                last = link.publish(topic, announcement, qos=1, retain=True)
                announced_on = link.connects
            if service.finished:
                if announced_on:
                    break
                stop.wait(POLL_S)  # resumed after the last round: publish the final announcement first
                continue
            batch = _drain(inbox, min(POLL_S, max(service.seconds_to_deadline(), 0.001)))
            if batch:
                service.receive([(m.topic, m.payload) for m in batch])
                for message in batch:  # persisted (or rejected for good): the broker may forget them
                    link.ack(message)
            new = service.tick()
            if new is not None:
                announcement = new
                last = link.publish(topic, announcement, qos=1, retain=True)
                announced_on = link.connects
        if service.finished and last is not None and not last.wait(final_timeout_s):
            log.warning("the final announcement was not acknowledged within %.0f s", final_timeout_s)
    finally:
        link.close()  # after the queued acknowledgements: the loop runs its calls in order
    return service
