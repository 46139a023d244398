"""The copy-free packet reader: the same messages as paho's own reader, from any fragmentation."""

from __future__ import annotations

import socket
import struct
import threading

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.mosquitto import Mosquitto
from protocol.mqtt_reader import BufferedClient, decode_publish

WAIT = 20.0
# Remaining-length varint boundaries (1/2/3 bytes), empty, and a packet of several socket reads.
SIZES = (0, 1, 100, 127, 128, 16_383, 16_384, 2_097_152 + 7)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 127, n >> 7
        out.append(byte | (128 if n else 0))
        if not n:
            return bytes(out)


def _publish_packet(topic: bytes, payload: bytes, *, qos: int = 0, mid: int = 0, v5: bool = True) -> bytes:
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    if v5:
        body += _varint(0)  # no properties
    body += payload
    return bytes([0x30 | qos << 1]) + _varint(len(body)) + body


class _Subscriber:
    """A started client of ``cls`` that records (topic, payload bytes, qos, retain, user properties)."""

    def __init__(
        self, cls: type[mqtt.Client], broker: Mosquitto, name: str, protocol: int, expected: int
    ) -> None:
        self.received: list[tuple[str, bytes, int, bool, object]] = []
        self.kinds: set[type] = set()
        self.ready, self.done = threading.Event(), threading.Event()
        self.expected = expected
        self.client = cls(CallbackAPIVersion.VERSION2, client_id=name, protocol=protocol)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self.ready.set()
        self.client.connect("127.0.0.1", broker.port)
        self.client.subscribe("t/#", qos=2)
        self.client.loop_start()
        assert self.ready.wait(WAIT)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        props = getattr(message.properties, "UserProperty", None)
        self.kinds.add(type(message.payload))
        self.received.append((message.topic, bytes(message.payload), message.qos, message.retain, props))
        if len(self.received) >= self.expected:
            self.done.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.mqtt
@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["v5", "v311"])
def test_receives_what_paho_receives(mosquitto: Mosquitto, protocol: int) -> None:
    """Every size across the varint boundaries, QoS 0/1/2, retained, with properties: same messages."""
    sent = len(SIZES) * 3 + 1  # every size at QoS 0, 1, 2, then the retained message
    subscribers = [
        _Subscriber(mqtt.Client, mosquitto, "paho", protocol, sent),
        _Subscriber(BufferedClient, mosquitto, "buffered", protocol, sent),
    ]
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub", protocol=protocol)
    publisher.connect("127.0.0.1", mosquitto.port)
    publisher.loop_start()
    for i, size in enumerate(SIZES):
        for qos in (0, 1, 2):
            payload = bytes((i * 31 + qos + j) % 251 for j in range(min(size, 4096))) * (
                -(-size // 4096) if size else 0
            )
            props = None
            if protocol == mqtt.MQTTv5:
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = [("size", str(size)), ("qos", str(qos))]
            info = publisher.publish(f"t/{size}/{qos}", payload[:size], qos=qos, properties=props)
            info.wait_for_publish(WAIT)
    # A retained message, delivered to a subscriber that arrives after it (retain flag set).
    publisher.publish("t/retained", b"kept", qos=1, retain=True).wait_for_publish(WAIT)
    late = [
        _Subscriber(mqtt.Client, mosquitto, "paho-late", protocol, 1),
        _Subscriber(BufferedClient, mosquitto, "buffered-late", protocol, 1),
    ]
    try:
        for sub in subscribers + late:
            assert sub.done.wait(WAIT), f"{sub.client._client_id!r} got {len(sub.received)}"
        paho_msgs, buffered_msgs = subscribers[0].received, subscribers[1].received
        assert len(paho_msgs) == sent and sorted(buffered_msgs) == sorted(paho_msgs)
        assert late[0].received == late[1].received == [("t/retained", b"kept", 1, True, None)]
        assert subscribers[1].kinds == {memoryview}  # the payload is handed on, not copied
    finally:
        publisher.publish("t/retained", b"", retain=True).wait_for_publish(WAIT)
        publisher.loop_stop()
        for sub in subscribers + late:
            sub.close()


@pytest.fixture
def wired() -> tuple[BufferedClient, socket.socket, list[mqtt.MQTTMessage]]:
    """A BufferedClient reading from one end of a socket pair (no broker): we write the packets."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="wired", protocol=mqtt.MQTTv5)
    got: list[mqtt.MQTTMessage] = []
    client.on_message = lambda c, u, message: got.append(message)
    client._sock = ours  # type: ignore[assignment]
    yield client, theirs, got
    ours.close()
    theirs.close()


def test_a_packet_in_pieces_arrives_whole(
    wired: tuple[BufferedClient, socket.socket, list[mqtt.MQTTMessage]],
) -> None:
    """The fixed header a byte at a time, then the body in odd-sized pieces: one message, once."""
    client, peer, got = wired
    payload = bytes(range(256)) * 600
    packet = _publish_packet(b"t/x", payload)
    pieces = [packet[i : i + 1] for i in range(4)] + [
        packet[i : i + 4093] for i in range(4, len(packet), 4093)
    ]
    for piece in pieces[:-1]:
        peer.sendall(piece)
        assert client._packet_read() == MQTTErrorCode.MQTT_ERR_AGAIN
        assert not got
    peer.sendall(pieces[-1])
    assert client._packet_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
    (message,) = got
    assert message.topic == "t/x" and bytes(message.payload) == payload
    assert isinstance(message.payload, memoryview) and message.payload.readonly


@pytest.mark.parametrize(
    "body",
    [
        struct.pack("!H", 50) + b"short",  # topic longer than the packet
        struct.pack("!H", 1) + b"t" + b"\xff\xff\xff\xff\xff",  # properties varint of 5 bytes
        struct.pack("!H", 1) + b"t" + _varint(9) + b"\x26",  # properties run past the packet
    ],
    ids=["topic", "varint", "properties"],
)
def test_a_malformed_publish_is_a_protocol_error(
    wired: tuple[BufferedClient, socket.socket, list[mqtt.MQTTMessage]], body: bytes
) -> None:
    client, peer, got = wired
    peer.send(b"\x30" + _varint(len(body)) + body)
    assert client._packet_read() == MQTTErrorCode.MQTT_ERR_PROTOCOL
    assert not got


def test_a_closed_socket_mid_packet_is_a_lost_connection(
    wired: tuple[BufferedClient, socket.socket, list[mqtt.MQTTMessage]],
) -> None:
    client, peer, got = wired
    packet = _publish_packet(b"t/x", b"y" * 1000)
    peer.send(packet[:500])
    peer.close()
    assert client._packet_read() == MQTTErrorCode.MQTT_ERR_CONN_LOST
    assert not got


@settings(max_examples=400, deadline=None)
@given(
    command=st.sampled_from([0x30, 0x32, 0x34, 0x36, 0x3B]),
    topic_len=st.integers(0, 6),
    rest=st.binary(max_size=40),
    protocol=st.sampled_from([mqtt.MQTTv5, mqtt.MQTTv311]),
)
def test_any_body_decodes_or_is_malformed(command: int, topic_len: int, rest: bytes, protocol: int) -> None:
    """Garbage from a broker never escapes as another exception (it would end paho's loop thread)."""
    body = bytearray(struct.pack("!H", topic_len) + rest)
    try:
        message = decode_publish(command, body, protocol)
    except mqtt.MalformedPacket:
        return
    assert message.qos == (command >> 1) & 3 < 3
    assert len(message.payload) <= len(body) - 2 - topic_len
