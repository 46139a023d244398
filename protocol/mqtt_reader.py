"""paho's MQTT client with a copy-free packet reader, for links that receive megabytes of updates.

paho 2.2 reads a packet by ``recv(remaining)`` calls (each a fresh buffer of up to the whole packet,
page-faulted in and shrunk), appends each piece to a growing ``bytearray``, and then decodes a
PUBLISH with three ``struct.unpack(f"!H{n}s")`` calls and a slice, each one a full copy of the rest
of the packet. For a 1 MB update that is about six passes over a megabyte and a few hundred page
faults; ``perf`` of a bare paho subscriber at 1 GB/s showed 45% of its CPU in ``memmove``, page
faults and page clearing, against 6% in the kernel's one necessary copy.

:class:`BufferedClient` reads each packet's body straight into one buffer of its final size
(``recv_into``: the kernel's copy is the only one) and hands a PUBLISH's payload on as a read-only
``memoryview`` of that buffer. Everything else (state machine, handlers, callbacks, QoS flows) is
paho's own: the reader fills ``_in_packet`` exactly as paho's does, and a PUBLISH is decoded by the
same rules as :func:`paho.mqtt._packet.decode_publish`. Pinned to paho-mqtt 2.2 (constraints.txt); the
tests run it against paho's reader on the same byte streams.
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

_MAX_REMAINING_BYTES = 4  # the MQTT varint of the remaining length has at most 4 bytes
_READS_PER_CALL = 100  # as paho: yield to the loop after this many reads of one huge packet


class BufferedClient(mqtt.Client):
    """:class:`paho.mqtt.client.Client` whose PUBLISH payloads are ``memoryview`` s, read without copies."""

    def _recv_into(self, recv_into: Callable[[memoryview], int], view: memoryview) -> int:
        try:
            return recv_into(view)
        except ssl.SSLWantReadError as err:
            raise BlockingIOError() from err
        except ssl.SSLWantWriteError as err:
            self._call_socket_register_write()
            raise BlockingIOError() from err

    def _packet_read(self) -> MQTTErrorCode:
        recv_into = getattr(self._sock, "recv_into", None)
        if recv_into is None:  # no socket (paho reports it) or websockets: paho's own reader
            return super()._packet_read()
        packet = self._in_packet
        try:
            if packet["command"] == 0:
                command = self._sock_recv(1)
                if not command:
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                packet["command"] = command[0]
            if not packet["have_remaining"]:
                while True:
                    byte = self._sock_recv(1)
                    if not byte:
                        return MQTTErrorCode.MQTT_ERR_CONN_LOST
                    packet["remaining_count"].append(byte[0])
                    if len(packet["remaining_count"]) > _MAX_REMAINING_BYTES:
                        return MQTTErrorCode.MQTT_ERR_PROTOCOL
                    packet["remaining_length"] += (byte[0] & 127) * packet["remaining_mult"]
                    packet["remaining_mult"] *= 128
                    if not byte[0] & 128:
                        break
                packet["have_remaining"] = 1
                packet["to_process"] = packet["remaining_length"]
                packet["packet"] = bytearray(packet["remaining_length"])
            body = memoryview(packet["packet"])
            for _ in range(_READS_PER_CALL):
                if packet["to_process"] == 0:
                    break
                got = self._recv_into(recv_into, body[len(body) - packet["to_process"] :])
                if got == 0:
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                packet["to_process"] -= got
                with self._msgtime_mutex:
                    self._last_bytes_received = mqtt.time_func()
            else:
                if packet["to_process"]:
                    return MQTTErrorCode.MQTT_ERR_AGAIN
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        except OSError as err:
            self._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        return super()._packet_read()  # the body is complete: paho handles it and resets its state

    def _handle_publish(self) -> MQTTErrorCode:
        """paho's ``_handle_publish`` with the payload as a read-only view instead of four copies."""
        command, body = self._in_packet["command"], self._in_packet["packet"]
        message = decode_publish(command, body, self._protocol)
        message.timestamp = mqtt.time_func()
        if message.qos == 2:  # delivered on PUBREL, by paho
            rc = self._send_pubrec(message.mid)
            message.state = mqtt.mqtt_ms_wait_for_pubrel
            with self._in_message_mutex:
                self._in_messages[message.mid] = message
            return rc
        self._handle_on_message(message)
        if message.qos == 1 and not self._manual_ack:
            return self._send_puback(message.mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def decode_publish(command: int, body: bytearray, protocol: int) -> mqtt.MQTTMessage:
    """A PUBLISH packet's message, by the rules of :func:`paho.mqtt._packet.decode_publish`.

    Anything malformed raises :class:`~paho.mqtt.client.MalformedPacket` (paho turns it into a
    protocol error and drops the connection), never another exception that would end paho's loop.
    """
    try:
        return _parse_publish(command, body, protocol)
    except (struct.error, ValueError, KeyError, IndexError, MQTTException) as exc:
        raise MalformedPacket(f"malformed PUBLISH: {exc!r}") from exc


def _parse_publish(command: int, body: bytearray, protocol: int) -> mqtt.MQTTMessage:
    view = memoryview(body).toreadonly()
    qos = (command & 0x06) >> 1
    if qos == 3:
        raise ValueError("QoS 3 does not exist")
    (topic_len,) = struct.unpack_from("!H", view, 0)
    pos = 2 + topic_len
    topic = bytes(view[2:pos])
    if len(topic) != topic_len:
        raise ValueError("topic runs past the packet")
    if protocol != MQTTProtocolVersion.MQTTv5 and not topic:
        raise ValueError("topic can't be empty in MQTTv3")
    mid = 0
    if qos > 0:
        (mid,) = struct.unpack_from("!H", view, pos)
        pos += 2
    message = mqtt.MQTTMessage(mid=mid, topic=topic)
    if protocol == MQTTProtocolVersion.MQTTv5:
        props_len, varint_len = VariableByteIntegers.decode(bytes(view[pos : pos + 4]))
        properties = Properties(PacketTypes.PUBLISH)
        properties.unpack(bytes(view[pos : pos + varint_len + props_len]))
        pos += varint_len + props_len
        if pos > len(view):
            raise ValueError("properties run past the packet")
        message.properties = properties
    message.dup = bool(command & 0x08)
    message.qos = qos
    message.retain = bool(command & 0x01)
    message.payload = view[pos:]  # type: ignore[assignment]  # a view where paho keeps bytes
    return message
