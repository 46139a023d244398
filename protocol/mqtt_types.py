"""The vocabulary of the MQTT link: its configuration, errors, delivery handles, back-off and sizes.

Stdlib only (this runs on devices); see :mod:`protocol.mqtt_link` for the link itself.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MIB = 1024 * 1024
MessageCallback = Callable[[str, bytes], None]
# A received payload handed on without a copy: bytes, or a read-only view of the packet buffer it
# arrived in (protocol.mqtt_reader), which nothing else holds.
Payload = bytes | memoryview


@dataclass(frozen=True)
class InboundMessage:
    """A received message that the receiver acknowledges itself (:meth:`MqttLink.ack`).

    ``connection`` numbers the connection it arrived on: an acknowledgement is only sent on that same
    connection (after a reconnect the broker redelivers the message instead).
    """

    topic: str
    payload: Payload
    mid: int
    qos: int
    connection: int


InboundCallback = Callable[[InboundMessage], None]


class MqttLinkError(Exception):
    """A publish or link operation failed; the message says why."""


class PayloadTooLarge(MqttLinkError):
    """The PUBLISH packet would exceed the broker's maximum packet size: nothing was sent."""


class QueueFull(MqttLinkError):
    """The bounded queue of unacknowledged messages is full (or the message was dropped from it)."""


class PublishRefused(MqttLinkError):
    """The broker answered the PUBLISH with a failure reason code (e.g. "Not authorized")."""


class LinkClosed(MqttLinkError):
    """The link was closed before the operation completed."""


@dataclass(frozen=True)
class LinkConfig:
    """How one client connects. Secrets come from files or the environment, never from logs or repr."""

    client_id: str
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: int = 30
    session_expiry_s: int = 3600
    status_topic: str | None = None
    max_packet_size: int = 16 * MIB
    max_queued_messages: int = 1000
    max_queued_bytes: int = 64 * MIB
    overflow: Literal["raise", "drop_oldest"] = "raise"
    connect_jitter_s: float = 0.0
    backoff_min_s: float = 0.25
    backoff_max_s: float = 30.0
    inflight_window: int = 20
    connect_timeout_s: float = 5.0
    manual_ack: bool = False  # QoS 1 messages of subscribe_acked() are acknowledged by ack(), not on receipt
    # MQTT 5: at most this many QoS 1 messages unacknowledged towards us (None: the protocol's 65535).
    # A receiver that acknowledges after persisting sets it to bound what it holds in memory.
    receive_maximum: int | None = None
    # Where the password came from: named in the warnings when the broker refuses it (never the password).
    password_file: Path | None = None
    # Give up after this many refusals of our credentials in a row (0: keep trying, e.g. while the
    # operator enrols the device); the link's ``failure`` then says why.
    max_auth_failures: int = 0
    # MQTT over WebSockets (``ws://`` / ``wss://``: through firewalls that pass only HTTPS, port 443):
    # the same MQTT session, credentials and ACL, framed in WebSocket messages on ``ws_path``.
    transport: Literal["tcp", "websockets"] = "tcp"
    ws_path: str = "/mqtt"

    def __post_init__(self) -> None:
        if self.transport not in ("tcp", "websockets"):
            raise MqttLinkError(f"transport must be 'tcp' or 'websockets', got {self.transport!r}")
        if not self.ws_path.startswith("/"):
            raise MqttLinkError(f"ws_path must start with '/', got {self.ws_path!r}")
        if not self.client_id or any(c in self.client_id for c in "/+#"):
            raise MqttLinkError(f"invalid client_id {self.client_id!r}: non-empty, without '/', '+', '#'")
        if self.protocol not in ("5", "3.1.1"):
            raise MqttLinkError(f"protocol must be '5' or '3.1.1', got {self.protocol!r}")
        if self.overflow not in ("raise", "drop_oldest"):
            raise MqttLinkError(f"overflow must be 'raise' or 'drop_oldest', got {self.overflow!r}")
        if not 0 < self.backoff_min_s <= self.backoff_max_s:
            raise MqttLinkError("need 0 < backoff_min_s <= backoff_max_s")
        if (
            min(self.max_packet_size, self.max_queued_messages, self.max_queued_bytes, self.inflight_window)
            < 1
        ):
            raise MqttLinkError("max_packet_size, max_queued_messages/bytes and inflight_window must be >= 1")
        if self.receive_maximum is not None and not 1 <= self.receive_maximum <= 65535:
            raise MqttLinkError(f"receive_maximum must be in 1..65535, got {self.receive_maximum}")
        if (self.client_cert is None) != (self.client_key is None):
            raise MqttLinkError("client_cert and client_key go together")
        if self.max_auth_failures < 0:
            raise MqttLinkError(f"max_auth_failures must be >= 0, got {self.max_auth_failures}")


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_packet_size(topic: str, payload_len: int, qos: int, mqtt5: bool = True) -> int:
    """Bytes of the PUBLISH packet paho sends: fixed header, topic, packet id, (empty) properties, payload."""
    remaining = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + (1 if mqtt5 else 0) + payload_len
    return 1 + _varint_len(remaining) + remaining


def max_payload_size(topic: str, packet_limit: int, qos: int, mqtt5: bool = True) -> int:
    """The largest payload whose PUBLISH to ``topic`` fits in ``packet_limit`` bytes (0 if none fits)."""
    size = packet_limit - publish_packet_size(topic, 0, qos, mqtt5)
    while size > 0 and publish_packet_size(topic, size, qos, mqtt5) > packet_limit:
        size -= 1  # at most 3 steps: the length prefix grows by one byte per step of 128x
    return max(size, 0)


class Backoff:
    """Exponential back-off with a cap and jitter: attempt k waits U(0.5, 1) * min(cap, base * 2**k)."""

    def __init__(self, base_s: float, cap_s: float, rng: random.Random) -> None:
        self.base_s, self.cap_s, self._rng = base_s, cap_s, rng
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.cap_s, self.base_s * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return delay * self._rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0


class Delivery:
    """The fate of one publish: :meth:`wait` for it, then read :attr:`error` (None when acknowledged)."""

    def __init__(self, topic: str, size: int) -> None:
        self.topic, self.size = topic, size
        self.error: MqttLinkError | None = None
        self._done = threading.Event()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until acknowledged or failed; False on timeout."""
        return self._done.wait(timeout_s)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def ok(self) -> bool:
        return self._done.is_set() and self.error is None

    def _finish(self, error: MqttLinkError | None = None) -> None:
        self.error = error
        self._done.set()


def strip_share(topic_filter: str) -> str:
    """The plain filter of a shared subscription: ``$share/group/a/b`` matches the topics ``a/b`` does."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter
