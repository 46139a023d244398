"""The MQTT link and the pool: delivery, security, broker restarts, size limits, bounded queue, scale."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.child import free_port
from broker.credentials import DeviceCredentials, add_device, make_test_ca
from broker.mosquitto import BrokerConfig, Mosquitto
from protocol.mqtt_link import (
    InboundMessage,
    LinkClosed,
    LinkConfig,
    MqttLink,
    MqttLinkError,
    PayloadTooLarge,
    PublishRefused,
    QueueFull,
    max_payload_size,
    publish_packet_size,
)
from protocol.mqtt_pool import MqttPool
from protocol.mqtt_types import Backoff

WAIT = 10.0  # generous upper bounds for a loaded CI machine; never a speed assertion


class Inbox:
    """Collects (topic, payload) from a subscription; wait for a count."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.messages.append((topic, payload))
            self._cond.notify_all()

    def wait_for(self, count: int, timeout_s: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.messages) >= count, timeout_s)


def _link(broker: Mosquitto, client_id: str, **kwargs: object) -> MqttLink:
    config = LinkConfig(client_id, port=broker.port, backoff_max_s=0.5, **kwargs)  # type: ignore[arg-type]
    return MqttLink(config).start()


# ---- without a broker ----------------------------------------------------------------------------


def test_packet_size_counts_header_topic_id_properties() -> None:
    # 1 fixed header + 1 length byte + (2 + 3 topic) + 2 packet id + 1 properties + 5 payload
    assert publish_packet_size("a/b", 5, qos=1) == 15
    assert publish_packet_size("a/b", 5, qos=0, mqtt5=False) == 12
    assert publish_packet_size("t", 200, qos=1) == 1 + 2 + 3 + 2 + 1 + 200  # two length bytes past 127
    for limit in (20, 130, 131, 132, 16_386, 16_387, 10_000):
        largest = max_payload_size("a/b", limit, qos=1)
        assert (
            publish_packet_size("a/b", largest, qos=1)
            <= limit
            < publish_packet_size("a/b", largest + 1, qos=1)
        )


def test_backoff_grows_to_the_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(0.1, 1.0, random.Random(0))
    delays = [backoff.next_delay() for _ in range(8)]
    for k, delay in enumerate(delays):
        ceiling = min(1.0, 0.1 * 2**k)
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next_delay() <= 0.1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"client_id": "a/b"},
        {"client_id": ""},
        {"client_id": "x", "protocol": "4"},
        {"client_id": "x", "overflow": "block"},
        {"client_id": "x", "client_cert": Path("c.crt")},
    ],
)
def test_link_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(MqttLinkError):
        LinkConfig(**kwargs)  # type: ignore[arg-type]


def test_offline_queue_is_bounded_and_closing_fails_what_is_left() -> None:
    # Never started: nothing is sent, everything stays queued.
    link = MqttLink(LinkConfig("offline", port=free_port(), max_queued_messages=3, max_queued_bytes=100))
    first = [link.publish("t", b"x" * 10) for _ in range(3)]
    with pytest.raises(QueueFull, match="3 / 100"):
        link.publish("t", b"x")
    link.close()
    assert all(d.done and isinstance(d.error, LinkClosed) for d in first)
    with pytest.raises(LinkClosed):
        link.publish("t", b"x")


def test_drop_oldest_policy_fails_the_oldest_unsent_message() -> None:
    link = MqttLink(
        LinkConfig(
            "offline", port=free_port(), max_queued_messages=100, max_queued_bytes=30, overflow="drop_oldest"
        )
    )
    try:
        a, b, c = (link.publish("t", bytes([i]) * 10) for i in range(3))
        d = link.publish("t", b"d" * 15)  # needs 15 more bytes: a and b go
        assert isinstance(a.error, QueueFull) and isinstance(b.error, QueueFull)
        assert not c.done and not d.done
        with pytest.raises(QueueFull):
            link.publish("t", b"e" * 31)  # larger than the whole queue: refused, nothing dropped
        assert not c.done
    finally:
        link.close()


# ---- with mosquitto ------------------------------------------------------------------------------


@pytest.mark.mqtt
def test_round_trip_with_retained_status(mosquitto: Mosquitto) -> None:
    inbox, status = Inbox(), Inbox()
    sub = _link(mosquitto, "coordinator")
    sub.subscribe("fleetlora/r1/up/+", inbox)
    sub.subscribe("fleetlora/r1/status/+", status)
    dev = _link(mosquitto, "dev-1", status_topic="fleetlora/r1/status/dev-1")
    try:
        assert sub.wait_subscribed(WAIT) and dev.wait_connected(WAIT)
        payload = os.urandom(100_000)
        delivery = dev.publish("fleetlora/r1/up/dev-1", payload)
        assert delivery.wait(WAIT) and delivery.ok
        assert inbox.wait_for(1)
        assert inbox.messages == [("fleetlora/r1/up/dev-1", payload)]
        assert status.wait_for(1) and status.messages[0] == ("fleetlora/r1/status/dev-1", b"online")
        dev.close()
        assert status.wait_for(2) and status.messages[1] == ("fleetlora/r1/status/dev-1", b"offline")
        late = Inbox()  # a later subscriber sees the retained status
        sub.subscribe("fleetlora/r1/status/dev-1", late)
        assert late.wait_for(1) and late.messages == [("fleetlora/r1/status/dev-1", b"offline")]
    finally:
        dev.close()
        sub.close()


@pytest.mark.mqtt
def test_last_will_on_abrupt_loss_then_reconnect(mosquitto: Mosquitto) -> None:
    status = Inbox()
    watcher = _link(mosquitto, "watcher")
    watcher.subscribe("fleetlora/r/status/+", status)
    dev = _link(mosquitto, "dev-1", status_topic="fleetlora/r/status/dev-1")
    try:
        assert watcher.wait_subscribed(WAIT) and dev.wait_connected(WAIT)
        assert status.wait_for(1)
        sock = dev.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)  # the network drops: no DISCONNECT, so the broker publishes the will
        assert status.wait_for(3)
        assert [p for _, p in status.messages[:3]] == [b"online", b"offline", b"online"]
        assert dev.connects == 2
    finally:
        dev.close()
        watcher.close()


@pytest.mark.mqtt
def test_oversized_payload_is_refused_without_a_reconnect_loop(
    start_mosquitto: Callable[..., Mosquitto],
) -> None:
    broker = start_mosquitto(BrokerConfig(max_packet_size=10_000))
    inbox = Inbox()
    sub = _link(broker, "sub")
    sub.subscribe("big/#", inbox)
    dev = _link(broker, "dev")  # configured limit 16 MiB: the broker's CONNACK lowers it
    try:
        assert sub.wait_subscribed(WAIT) and dev.wait_connected(WAIT)
        assert dev.packet_limit == 10_000
        largest = dev.max_payload("big/1")
        assert publish_packet_size("big/1", largest, qos=1) == 10_000
        with pytest.raises(PayloadTooLarge, match="10001-byte packet"):
            dev.publish("big/1", b"x" * (largest + 1))
        delivery = dev.publish("big/1", b"y" * largest)  # exactly at the limit: accepted by mosquitto
        assert delivery.wait(WAIT) and delivery.ok
        assert inbox.wait_for(1) and inbox.messages[0][1] == b"y" * largest
        assert dev.connects == 1 and dev.connected  # never disconnected
    finally:
        dev.close()
        sub.close()


def _secure_broker(
    start_mosquitto: Callable[..., Mosquitto], broker_dir: Path, require_certificate: bool = False
) -> tuple[Mosquitto, dict[str, DeviceCredentials]]:
    pki = broker_dir / "pki"
    if not pki.exists():
        make_test_ca(pki)
    creds = {name: add_device(pki, name) for name in ("dev-a", "dev-b")}
    creds["coord"] = add_device(pki, "coord", role="coordinator")
    config = BrokerConfig(port=None, tls_port=0, credentials=pki, require_certificate=require_certificate)
    return start_mosquitto(config), creds


def _tls_link(broker: Mosquitto, creds: DeviceCredentials, password: str | None = None) -> MqttLink:
    return _link(
        broker,
        creds.username,
        username=creds.username,
        password=password or creds.password,
        tls=True,
        ca_cert=creds.ca_cert,
    )


@pytest.mark.mqtt
def test_tls_password_and_acl(start_mosquitto: Callable[..., Mosquitto], broker_dir: Path) -> None:
    broker, creds = _secure_broker(start_mosquitto, broker_dir)
    ups, globals_ = Inbox(), Inbox()
    coord = _tls_link(broker, creds["coord"])
    coord.subscribe("fleetlora/+/up/+", ups)
    dev_a = _tls_link(broker, creds["dev-a"])
    dev_a.subscribe("fleetlora/r/global", globals_)
    intruder = _tls_link(broker, creds["dev-b"], password="wrong")
    try:
        assert coord.wait_subscribed(WAIT) and dev_a.wait_subscribed(WAIT)
        spoofed = dev_a.publish("fleetlora/r/up/dev-b", b"spoof")
        forged_global = dev_a.publish("fleetlora/r/global", b"forged")
        own = dev_a.publish("fleetlora/r/up/dev-a", b"mine")
        for delivery in (spoofed, forged_global, own):
            assert delivery.wait(WAIT)
        assert isinstance(spoofed.error, PublishRefused) and "Not authorized" in str(spoofed.error)
        assert isinstance(forged_global.error, PublishRefused)
        assert own.ok
        real_global = coord.publish("fleetlora/r/global", b"round 1")
        assert real_global.wait(WAIT) and real_global.ok
        assert globals_.wait_for(1) and ups.wait_for(1)
        assert globals_.messages == [("fleetlora/r/global", b"round 1")]  # the forged one never arrived
        assert ups.messages == [("fleetlora/r/up/dev-a", b"mine")]  # nor the spoofed update
        assert not intruder.connected and intruder.last_refusal is not None
    finally:
        for link in (intruder, dev_a, coord):
            link.close()


@pytest.mark.mqtt
def test_device_added_to_a_running_broker_connects_after_reload(
    start_mosquitto: Callable[..., Mosquitto], broker_dir: Path
) -> None:
    broker, _ = _secure_broker(start_mosquitto, broker_dir)
    late = add_device(broker_dir / "pki", "dev-late")
    broker.reload()  # SIGHUP: mosquitto re-reads the password file and the ACL
    link = _tls_link(broker, late)  # an attempt before the reload took effect is refused, then retried
    try:
        assert link.wait_connected(WAIT)
        delivery = link.publish("fleetlora/r/up/dev-late", b"hello")
        assert delivery.wait(WAIT) and delivery.ok
    finally:
        link.close()


@pytest.mark.mqtt
def test_mutual_tls_uses_the_certificate_name(
    start_mosquitto: Callable[..., Mosquitto], broker_dir: Path
) -> None:
    broker, creds = _secure_broker(start_mosquitto, broker_dir, require_certificate=True)
    dev = creds["dev-a"]
    link = _link(broker, "dev-a", tls=True, ca_cert=dev.ca_cert, client_cert=dev.cert, client_key=dev.key)
    no_cert = _tls_link(broker, creds["dev-b"])  # right password, no certificate: the handshake fails
    try:
        assert link.wait_connected(WAIT)
        own, other = link.publish("fleetlora/r/up/dev-a", b"1"), link.publish("fleetlora/r/up/dev-b", b"1")
        assert own.wait(WAIT) and own.ok
        assert other.wait(WAIT) and isinstance(other.error, PublishRefused)
        assert not no_cert.connected and no_cert.connects == 0
    finally:
        link.close()
        no_cert.close()


def _wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT) -> bool:
    done = threading.Event()
    deadline = threading.Timer(timeout_s, done.set)
    deadline.start()
    try:
        while not predicate():
            if done.wait(0.01):
                return predicate()
        return True
    finally:
        deadline.cancel()


@pytest.mark.mqtt
def test_message_queued_while_the_broker_is_down_is_delivered_after_restart(
    start_mosquitto: Callable[..., Mosquitto],
) -> None:
    # Persistence keeps the subscriber's session across the restart, so its delivery does not depend on
    # which of the two clients reconnects first.
    broker = start_mosquitto(BrokerConfig(persistence=True))
    inbox = Inbox()
    sub = _link(broker, "coordinator")
    sub.subscribe("fleetlora/r/up/+", inbox)
    dev = _link(broker, "dev-1")
    try:
        assert sub.wait_subscribed(WAIT) and dev.wait_connected(WAIT)
        broker.stop()
        assert _wait_until(lambda: not dev.connected)
        queued = [dev.publish("fleetlora/r/up/dev-1", f"queued {i}".encode()) for i in range(30)]
        assert not any(d.done for d in queued)
        broker.start()
        assert all(d.wait(WAIT) and d.ok for d in queued)
        assert inbox.wait_for(30)
        assert inbox.messages == [
            ("fleetlora/r/up/dev-1", f"queued {i}".encode()) for i in range(30)
        ]  # in order
        assert dev.connects == 2 and sub.connects == 2
    finally:
        dev.close()
        sub.close()


@pytest.mark.mqtt
def test_subscriptions_are_renewed_after_a_restart_without_persistence(mosquitto: Mosquitto) -> None:
    inbox = Inbox()
    sub = _link(mosquitto, "coordinator")
    sub.subscribe("fleetlora/r/up/+", inbox)
    dev = _link(mosquitto, "dev-1")
    try:
        assert sub.wait_subscribed(WAIT) and dev.wait_connected(WAIT)
        mosquitto.restart()  # sessions and subscriptions are gone on the broker
        assert _wait_until(lambda: sub.connects == 2 and dev.connects == 2)
        assert sub.wait_subscribed(WAIT)
        delivery = dev.publish("fleetlora/r/up/dev-1", b"after restart")
        assert delivery.wait(WAIT) and delivery.ok
        assert inbox.wait_for(1) and inbox.messages == [("fleetlora/r/up/dev-1", b"after restart")]
    finally:
        dev.close()
        sub.close()


@pytest.mark.mqtt
def test_pool_of_500_clients_each_publish_once(mosquitto: Mosquitto) -> None:
    count = 500
    inbox = Inbox()
    coord = _link(mosquitto, "coordinator")
    coord.subscribe("fleetlora/r/up/+", inbox)
    pool = MqttPool()
    rng = random.Random(0)
    links = [
        MqttLink(
            LinkConfig(
                f"v{i:03d}",
                port=mosquitto.port,
                connect_jitter_s=0.5,
                status_topic=f"fleetlora/r/status/v{i:03d}",
            ),
            pool=pool,
            rng=rng,
        ).start()
        for i in range(count)
    ]
    try:
        assert coord.wait_subscribed(WAIT)
        assert all(link.wait_connected(30) for link in links)
        assert pool.members == count
        deliveries = [
            link.publish(f"fleetlora/r/up/{link.config.client_id}", link.config.client_id.encode())
            for link in links
        ]
        assert all(d.wait(30) and d.ok for d in deliveries)
        assert inbox.wait_for(count, 30)
        assert sorted(p for _, p in inbox.messages) == [f"v{i:03d}".encode() for i in range(count)]
    finally:
        for link in links:
            link.close()
        pool.close()
        coord.close()
    assert pool.members == 0


def test_receive_maximum_bounds_unacknowledged_deliveries(mosquitto: Mosquitto) -> None:
    got: list[InboundMessage] = []
    sub = MqttLink(LinkConfig("rm-sub", port=mosquitto.port, manual_ack=True, receive_maximum=7)).start()
    pub = MqttLink(LinkConfig("rm-pub", port=mosquitto.port)).start()
    try:
        sub.subscribe_acked("rm/#", got.append)
        assert sub.wait_subscribed(30)
        deliveries = [pub.publish("rm/x", b"x") for _ in range(30)]
        assert all(d.wait(30) and d.ok for d in deliveries)
        deadline = time.monotonic() + 10
        while len(got) < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # time for any delivery beyond the window to arrive (none may)
        assert len(got) == 7
        # mosquitto 2.0.11 applies the window to the first deliveries only: once acknowledged, it
        # released the whole queue at once in this test (RELIABILITY.md, "Load"). Not asserted here.
    finally:
        sub.close()
        pub.close()
