"""A robust MQTT link for one client (a device, the coordinator, or one virtual client of the simulator).

Payloads are opaque bytes here; the envelope format lives elsewhere. What the link adds over bare paho
(each one a pitfall in NOTES):

- MQTT 5 with a session expiry and never a clean start, so QoS 1 deliveries survive a reconnect (and,
  with broker persistence, a broker restart); subscriptions are renewed whenever the broker has no
  session for us (a restarted broker without persistence). :meth:`MqttLink.wait_subscribed` says when
  the broker has acknowledged them.
- A jittered first connect, and exponential back-off with jitter and a cap on every reconnect.
- A last will: retained ``offline`` on the status topic; retained ``online`` after each connect.
- ``publish`` refuses with :class:`PayloadTooLarge`, sending nothing, a packet above the size limit (the
  smaller of the configured one and the broker's CONNACK announcement). paho would send it, be
  disconnected, resend it after reconnecting, and so on forever.
- Manual acknowledgements (``manual_ack``): a receiver that must persist a message before the broker
  may forget it subscribes with :meth:`MqttLink.subscribe_acked` and calls :meth:`MqttLink.ack` once
  the message is safe; until then a lost connection makes the broker redeliver it.
- A bounded queue: messages not yet acknowledged (waiting for a connection, or in flight) are capped
  in count and bytes. Beyond the cap ``overflow="raise"`` raises :class:`QueueFull`; ``"drop_oldest"``
  fails the oldest message not yet sent instead. Queued messages go out in order after a reconnect.
- Failures said in words: a refused TCP connection, a failed TLS handshake and refused credentials are
  logged as warnings naming the broker, the user and the files used, with a hint (once per kind of
  failure, then again every ``WARN_EVERY_S``); after ``max_auth_failures`` refusals of our credentials
  in a row the link stops trying and :attr:`MqttLink.failure` says why.

Every paho call happens on the loop thread of an :class:`~protocol.mqtt_pool.MqttPool` (a private
one unless a shared pool is given); the public methods are thread-safe. Message callbacks run on the
loop thread: keep them short.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protocol.mqtt_pool import MqttPool
from protocol.mqtt_reader import BufferedClient
from protocol.mqtt_types import (
    Backoff,
    Delivery,
    InboundCallback,
    InboundMessage,
    LinkClosed,
    LinkConfig,
    MessageCallback,
    MqttLinkError,
    PayloadTooLarge,
    PublishRefused,
    QueueFull,
    max_payload_size,
    publish_packet_size,
    strip_share,
)

__all__ = [
    "Delivery",
    "InboundMessage",
    "LinkClosed",
    "LinkConfig",
    "MqttLink",
    "MqttLinkError",
    "PayloadTooLarge",
    "PublishRefused",
    "QueueFull",
    "max_payload_size",
    "publish_packet_size",
]

log = logging.getLogger(__name__)

ONLINE, OFFLINE = b"online", b"offline"
WARN_EVERY_S = 60.0  # a failure that goes on is said again this often (each attempt is logged at DEBUG)
# CONNACK reason codes that mean "these credentials are not welcome" (MQTT 5: 0x86, 0x87, 0x8C;
# MQTT 3.1.1 return codes 4 and 5 are reported by paho with the same names).
AUTH_REFUSALS = ("Bad user name or password", "Not authorized", "Bad authentication method")


@dataclass
class _Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    delivery: Delivery


class MqttLink:
    """One MQTT client that keeps itself connected. Call :meth:`start`, then publish and subscribe.

    Parameters
    ----------
    config:
        Where and how to connect, and the limits.
    pool:
        A shared :class:`MqttPool` to run on (many links, one thread); None gives the link its own.
    rng:
        Source of connect and back-off jitter (seed it for reproducible simulations).
    """

    def __init__(
        self, config: LinkConfig, *, pool: MqttPool | None = None, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self._mqtt5 = config.protocol == "5"
        self._own_pool = pool is None
        self._pool = pool or MqttPool(name=f"mqtt-{config.client_id}")
        self._rng = rng or random.Random()
        self._backoff = Backoff(config.backoff_min_s, config.backoff_max_s, self._rng)
        self._lock = threading.Lock()  # guards the fields below; never held while calling paho
        self._outbox: deque[_Outgoing] = deque()
        self._queued_bytes = 0
        self._inflight_count = 0
        self._inflight_bytes = 0
        self._subscriptions: dict[str, tuple[int, MessageCallback | None]] = {}
        self._acked_callbacks: dict[str, InboundCallback] = {}  # filters whose receiver acknowledges
        self._packet_limit = config.max_packet_size
        self._closed = False
        # Loop-thread state.
        self._inflight: dict[int, _Outgoing] = {}
        self._connect_slot = False
        self._retry_pending = False
        self._unsent_filters: set[str] = set()  # subscribed since the last SUBSCRIBE went out
        self._pending_subacks: set[int] = set()
        self._connected = threading.Event()
        self._subscribed = threading.Event()  # every subscription acknowledged on this connection
        self._released = threading.Event()
        self.client = self._make_client()
        self.connects = 0  # successful connections so far (a reconnect makes it 2, ...)
        self.last_refusal: str | None = None  # the broker's reason when it last refused to connect us
        self.failure: str | None = None  # set when the link gave up (see LinkConfig.max_auth_failures)
        self._auth_failures = 0
        self._warned: tuple[str, float] = ("", 0.0)  # the kind of failure last warned about, and when
        self._failed_attempts = 0
        self._refused = False  # the broker answered this attempt with a refusal (then closes the socket)

    # ---- setup ------------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        cfg = self.config
        if self._mqtt5:
            client = BufferedClient(
                CallbackAPIVersion.VERSION2, client_id=cfg.client_id, protocol=mqtt.MQTTv5,
                transport=cfg.transport,
            )  # fmt: skip
        else:
            client = BufferedClient(
                CallbackAPIVersion.VERSION2,
                client_id=cfg.client_id,
                protocol=mqtt.MQTTv311,
                clean_session=False,
                transport=cfg.transport,
            )
        if cfg.transport == "websockets":
            client.ws_set_options(path=cfg.ws_path)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            context = ssl.create_default_context(cafile=str(cfg.ca_cert) if cfg.ca_cert else None)
            if cfg.client_cert is not None and cfg.client_key is not None:
                context.load_cert_chain(str(cfg.client_cert), str(cfg.client_key))
            client.tls_set_context(context)
        if cfg.status_topic:
            client.will_set(cfg.status_topic, OFFLINE, qos=1, retain=True)
        client.manual_ack_set(cfg.manual_ack)
        client.max_inflight_messages_set(cfg.inflight_window + 1)  # +1: the status message
        client.connect_timeout = cfg.connect_timeout_s
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        properties = None
        if self._mqtt5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = cfg.session_expiry_s
            if cfg.receive_maximum is not None:
                properties.ReceiveMaximum = cfg.receive_maximum
        # Never a clean start: a restarted client resumes its session (QoS 1 messages queued for it), and
        # mosquitto 2.0.11 persists across its own restarts only sessions that did not begin clean.
        client.connect_async(cfg.host, cfg.port, cfg.keepalive_s, clean_start=False, properties=properties)
        return client

    def start(self) -> MqttLink:
        """Begin connecting (after up to ``connect_jitter_s``); returns at once. Reconnects by itself."""
        delay = self._rng.uniform(0.0, self.config.connect_jitter_s)

        def begin() -> None:
            self._pool.attach(self)
            self._pool.call_later(delay, self._attempt_connect)

        self._pool.call_soon(begin)
        return self

    # ---- public API (any thread) ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def packet_limit(self) -> int:
        """The largest PUBLISH packet the link will send (the broker's announcement may lower it)."""
        return self._packet_limit

    def max_payload(self, topic: str, qos: int = 1) -> int:
        """The largest payload :meth:`publish` accepts for ``topic`` now (a larger one is refused)."""
        return max_payload_size(topic, self._packet_limit, qos, self._mqtt5)

    def wait_connected(self, timeout_s: float | None = None) -> bool:
        """Block until connected; False on timeout."""
        return self._connected.wait(timeout_s)

    def wait_subscribed(self, timeout_s: float | None = None) -> bool:
        """Block until connected and every subscription is acknowledged by the broker; False on timeout."""
        return self._subscribed.wait(timeout_s)

    def subscribe(self, topic_filter: str, callback: MessageCallback, qos: int = 1) -> None:
        """Call ``callback(topic, payload)`` for messages matching ``topic_filter`` (kept on reconnect)."""
        with self._lock:
            self._check_open()
            self._subscriptions[topic_filter] = (qos, callback)
            self._unsent_filters.add(topic_filter)
            self._subscribed.clear()
        self._pool.call_soon(lambda: self._send_subscribe([topic_filter]))

    def subscribe_acked(self, topic_filter: str, callback: InboundCallback, qos: int = 1) -> None:
        """Like :meth:`subscribe`, but the receiver acknowledges each message with :meth:`ack`.

        Needs ``LinkConfig(manual_ack=True)``. ``callback`` runs on the loop thread: hand the message
        to a worker and return.
        """
        if not self.config.manual_ack:
            raise MqttLinkError("subscribe_acked needs LinkConfig(manual_ack=True)")
        with self._lock:
            self._check_open()
            self._acked_callbacks[topic_filter] = callback
            self._subscriptions[topic_filter] = (qos, None)
            self._unsent_filters.add(topic_filter)
            self._subscribed.clear()
        self._pool.call_soon(lambda: self._send_subscribe([topic_filter]))

    def ack(self, message: InboundMessage) -> None:
        """Acknowledge ``message`` (any thread); skipped when it arrived on an earlier connection."""

        def send() -> None:
            if message.qos > 0 and message.connection == self.connects and self.connected:
                self.client.ack(message.mid, message.qos)

        self._pool.call_soon(send)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Delivery:
        """Queue ``payload`` for ``topic``; sent now when connected, else after the next connect.

        Raises :class:`PayloadTooLarge` (nothing sent) and :class:`QueueFull` (policy ``raise``).
        """
        if qos not in (0, 1):
            raise MqttLinkError(f"qos must be 0 or 1, got {qos}")
        data = bytes(payload)
        size = publish_packet_size(topic, len(data), qos, self._mqtt5)
        if size > self._packet_limit:
            raise PayloadTooLarge(
                f"publish to {topic}: a {len(data)}-byte payload makes a {size}-byte packet, above the "
                f"broker's limit of {self._packet_limit} bytes; raise the broker's max_packet_size"
            )
        item = _Outgoing(topic, data, qos, retain, Delivery(topic, len(data)))
        dropped: list[_Outgoing] = []
        with self._lock:
            self._check_open()
            dropped = self._make_room(len(data))
            self._outbox.append(item)
            self._queued_bytes += len(data)
        for old in dropped:
            old.delivery._finish(
                QueueFull(f"dropped from the full queue (oldest first) to make room: {old.topic}")
            )
        self._pool.call_soon(self._pump)
        return item.delivery

    def close(self, timeout_s: float = 5.0) -> None:
        """Publish ``offline`` on the status topic, disconnect, and fail whatever is still queued."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.call_soon(self._shutdown)
        self._pool.call_later(timeout_s, self._release)  # fallback if the DISCONNECT never goes out
        if not self._pool.in_loop():
            self._released.wait(timeout_s + 1.0)
        if self._own_pool:
            self._pool.close()

    def __enter__(self) -> MqttLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- bounded queue (caller holds the lock) ----------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LinkClosed(f"link {self.config.client_id} is closed")

    def _make_room(self, size: int) -> list[_Outgoing]:
        cfg = self.config
        fits_when_empty = (
            self._inflight_count + 1 <= cfg.max_queued_messages
            and self._inflight_bytes + size <= cfg.max_queued_bytes
        )

        def full() -> bool:
            return (
                self._inflight_count + len(self._outbox) + 1 > cfg.max_queued_messages
                or self._inflight_bytes + self._queued_bytes + size > cfg.max_queued_bytes
            )

        if not full():
            return []
        if cfg.overflow == "raise" or not fits_when_empty:
            raise QueueFull(
                f"{self.config.client_id}: {self._inflight_count + len(self._outbox)} messages / "
                f"{self._inflight_bytes + self._queued_bytes} bytes unacknowledged, limits "
                f"{cfg.max_queued_messages} / {cfg.max_queued_bytes}; a {size}-byte message does not fit"
            )
        dropped = []
        while full():
            old = self._outbox.popleft()
            self._queued_bytes -= len(old.payload)
            dropped.append(old)
        return dropped

    # ---- loop thread ------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Keep-alive and timeouts (called by the pool)."""
        self.client.loop_misc()

    def _attempt_connect(self) -> None:
        self._retry_pending = False
        if self._closed or self.connected:
            return
        if not self._pool.try_begin_connect():
            self._pool.call_later(0.02 + self._rng.uniform(0.0, 0.05), self._attempt_connect)
            return
        self._connect_slot = True
        try:
            self.client.reconnect()
        except (OSError, ValueError) as e:  # refused, unreachable, TLS handshake failed (ssl.SSLError)
            self._warn(*self._connect_error(e))
            self._give_back_slot()
            self._schedule_retry()

    # ---- failures in words ------------------------------------------------------------------------

    def _where(self) -> str:
        cfg = self.config
        tls = f" over TLS (CA {cfg.ca_cert or 'the system store'})" if cfg.tls else ""
        return f"the broker at {cfg.host}:{cfg.port}{tls}"

    def _connect_error(self, e: Exception) -> tuple[str, str]:
        """``(kind, message)`` of a failed connection attempt."""
        cfg, where = self.config, self._where()
        if isinstance(e, ssl.SSLCertVerificationError):
            return "tls", (
                f"TLS with {cfg.host}:{cfg.port} failed: {e.verify_message or e}; is the broker's "
                f"certificate signed by {cfg.ca_cert or 'a CA this system trusts'}, for host {cfg.host}?"
            )
        if isinstance(e, ssl.SSLError | ssl.CertificateError) or (
            cfg.tls and isinstance(e, ConnectionResetError)
        ):
            # (a plain listener answers a TLS hello by resetting the connection)
            hint = "is that port a TLS listener? (a plain one takes mqtt://)"
            return "tls", f"TLS handshake with {cfg.host}:{cfg.port} failed ({e}); {hint}"
        if isinstance(e, ConnectionRefusedError):
            hint = "is it running (fleetlora broker run), and on this port?"
            return "refused", f"cannot reach {where}: connection refused; {hint}"
        return "unreachable", f"cannot reach {where}: {e}"

    def _warn(self, kind: str, message: str) -> None:
        """Log a connection failure: a warning when it is new or every WARN_EVERY_S, else at DEBUG."""
        self._failed_attempts += 1
        now = time.monotonic()
        last_kind, last_at = self._warned
        if kind != last_kind or now - last_at >= WARN_EVERY_S:
            self._warned = (kind, now)
            log.warning("%s: %s (retrying)", self.config.client_id, message)
        else:
            log.debug("%s: %s", self.config.client_id, message)

    def _credentials_refused(self, reason: ReasonCode) -> None:
        cfg = self.config
        self._auth_failures += 1
        if cfg.username is None:
            who = "an anonymous connection"
            hint = "the broker wants a username and password: give --password-file of an enrolled device"
        else:
            source = f"password from {cfg.password_file}" if cfg.password_file else "no password file"
            who = f"user {cfg.username!r} ({source})"
            hint = (
                f"is {cfg.username} enrolled? `fleetlora devices enroll {cfg.username} --pki DIR` "
                "(a running broker reads new passwords on SIGHUP or a restart)"
            )
        message = f"{self._where()} refused {who}: {reason}; {hint}"
        limit = cfg.max_auth_failures
        if limit and self._auth_failures >= limit:
            self.failure = f"gave up after {self._auth_failures} refusals: {message}"
            log.error("%s: %s", cfg.client_id, self.failure)
        else:
            self._warn("auth", message)

    def _give_back_slot(self) -> None:
        if self._connect_slot:
            self._connect_slot = False
            self._pool.end_connect()

    def _schedule_retry(self) -> None:
        if self._closed or self._retry_pending or self.failure is not None:
            return
        self._retry_pending = True
        self._pool.call_later(self._backoff.next_delay(), self._attempt_connect)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._give_back_slot()
        if reason.is_failure:
            self.last_refusal = str(reason)
            self._refused = True
            if str(reason) in AUTH_REFUSALS:
                self._credentials_refused(reason)
            else:
                self._warn("refused", f"{self._where()} refused the connection: {reason}")
            return  # the broker closes the socket; _on_disconnect schedules the retry
        if self._failed_attempts:
            log.info("%s: connected to %s", self.config.client_id, self._where())
        self._failed_attempts, self._auth_failures, self._warned = 0, 0, ("", 0.0)
        self._backoff.reset()
        self.connects += 1
        announced = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        self._packet_limit = min(self.config.max_packet_size, announced or self.config.max_packet_size)
        self._connected.set()
        with self._lock:  # a kept session still has the old subscriptions, not those made while offline
            filters = list(self._unsent_filters if flags.session_present else self._subscriptions)
        self._send_subscribe(filters)
        if self.config.status_topic:
            client.publish(self.config.status_topic, ONLINE, qos=1, retain=True)
        # After paho has re-sent the messages in flight (it does so right after this callback).
        self._pool.call_soon(self._pump)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._give_back_slot()
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._subscribed.clear()
        if self._pending_subacks:  # unacknowledged: maybe never registered, so send them all again
            with self._lock:
                self._unsent_filters.update(self._subscriptions)
            self._pending_subacks.clear()
        if self._closed:
            self._release()
            return
        if was_connected:
            log.info("%s: disconnected (%s); reconnecting", self.config.client_id, reason)
        elif not self._refused:  # closed before any CONNACK: a TLS listener reached in plain?
            self._warn(
                "closed",
                f"{self._where()} closed the connection before accepting it ({reason}); "
                "is that port a TLS listener reached with mqtt:// (use mqtts:// and --ca)?",
            )
        self._refused = False
        self._schedule_retry()

    def _send_subscribe(self, filters: list[str]) -> None:
        if not self.client.is_connected():  # (already true inside _on_connect)
            return
        with self._lock:
            wanted = [(f, self._subscriptions[f][0]) for f in filters if f in self._subscriptions]
            self._unsent_filters.difference_update(filters)
        if wanted:
            result, mid = self.client.subscribe(wanted)
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._pending_subacks.add(mid)
        self._mark_if_subscribed()

    def _mark_if_subscribed(self) -> None:
        with self._lock:
            if not self._unsent_filters and not self._pending_subacks:
                self._subscribed.set()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        for reason in reasons:
            if reason.is_failure:
                log.warning("%s: subscription refused: %s", self.config.client_id, reason)
        self._pending_subacks.discard(mid)
        self._mark_if_subscribed()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            subscriptions = list(self._subscriptions.items())
            acked = dict(self._acked_callbacks)
        handed_over = False
        for topic_filter, (_, callback) in subscriptions:
            if not mqtt.topic_matches_sub(strip_share(topic_filter), message.topic):
                continue
            try:
                if callback is not None:
                    callback(message.topic, bytes(message.payload))
                else:
                    payload = message.payload  # a read-only view from BufferedClient: no copy
                    if not isinstance(payload, memoryview):
                        payload = bytes(payload)
                    inbound = InboundMessage(message.topic, payload, message.mid, message.qos, self.connects)
                    acked[topic_filter](inbound)
                    handed_over = True
            except Exception:
                log.exception("%s: message callback for %s failed", self.config.client_id, message.topic)
        if self.config.manual_ack and not handed_over and message.qos > 0:
            client.ack(message.mid, message.qos)  # nobody will acknowledge it: do it now

    def _pump(self) -> None:
        """Hand queued messages to paho while connected and the in-flight window has room."""
        while self.connected and len(self._inflight) < self.config.inflight_window:
            with self._lock:
                if not self._outbox:
                    return
                item = self._outbox.popleft()
                self._queued_bytes -= len(item.payload)
                too_big = (
                    publish_packet_size(item.topic, len(item.payload), item.qos, self._mqtt5)
                    > self._packet_limit
                )
                if not too_big:
                    self._inflight_count += 1
                    self._inflight_bytes += len(item.payload)
            if too_big:  # queued before the broker announced a smaller limit
                item.delivery._finish(
                    PayloadTooLarge(
                        f"publish to {item.topic}: {len(item.payload)} bytes exceed the broker's announced "
                        f"limit of {self._packet_limit} bytes"
                    )
                )
                continue
            info = self.client.publish(item.topic, item.payload, item.qos, item.retain)
            if item.qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._settle(
                    item, LinkClosed(f"publish to {item.topic} failed: {mqtt.error_string(info.rc)}")
                )
                continue
            # QoS 1 stays with paho even when the connection just dropped: it is re-sent on reconnect.
            self._inflight[info.mid] = item

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties | None
    ) -> None:
        item = self._inflight.pop(mid, None)
        if item is None:
            return  # the status message
        error = (
            PublishRefused(f"broker refused publish to {item.topic}: {reason}") if reason.is_failure else None
        )
        self._settle(item, error)
        self._pool.call_soon(self._pump)

    def _settle(self, item: _Outgoing, error: MqttLinkError | None) -> None:
        with self._lock:
            self._inflight_count -= 1
            self._inflight_bytes -= len(item.payload)
        item.delivery._finish(error)

    def _shutdown(self) -> None:
        if self.client.socket() is None:
            self._release()
            return
        if self.connected and self.config.status_topic:
            self.client.publish(self.config.status_topic, OFFLINE, qos=1, retain=True)
        self.client.disconnect()  # paho closes the socket once DISCONNECT is written: _on_disconnect

    def _release(self) -> None:
        """Last step of close: drop the socket if still open, fail what is left, leave the pool."""
        if self._released.is_set():
            return
        sock = self.client.socket()
        if sock is not None:
            self._pool.forget_socket(sock)
            sock.close()
        self._connected.clear()
        self._give_back_slot()
        with self._lock:
            leftovers = list(self._outbox) + list(self._inflight.values())
            self._outbox.clear()
            self._inflight.clear()
            self._queued_bytes = self._inflight_count = self._inflight_bytes = 0
        for item in leftovers:
            item.delivery._finish(LinkClosed(f"link closed before {item.topic} was acknowledged"))
        self._pool.detach(self)
        self._released.set()
