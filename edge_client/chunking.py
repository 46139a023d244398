"""Payloads larger than the broker's packet limit: split into chunks, reassembled with bounded memory.

Chunk layout (36-byte header, big-endian)::

    b"FLC\\x01" | message id (8 bytes) | seq | total | chunk size | total length | payload CRC32 | chunk CRC32
    | data

Every chunk but the last carries exactly ``chunk size`` bytes, so each chunk's place and size follow
from its header and the receiver can check them before storing anything. The chunk CRC covers the
header and the data (a corrupt chunk is caught on arrival), the payload CRC the reassembled whole.
Without chunking, :func:`check_size` refuses what the broker would drop: nothing is ever silently
truncated (paho does not enforce the broker's limit itself, see NOTES.md).
"""

from __future__ import annotations

import math
import secrets
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.wire_errors import EnvelopeError, Reason

CHUNK_MAGIC = b"FLC\x01"
_HEADER = struct.Struct(">4s8sIIIIII")
HEADER_BYTES = _HEADER.size
_MAX_U32 = 2**32 - 1


def is_chunk(packet: bytes) -> bool:
    """Whether ``packet`` is a chunk (else a whole payload)."""
    return packet[: len(CHUNK_MAGIC)] == CHUNK_MAGIC


def check_size(payload: bytes, limit: int) -> None:
    """Refuse a payload the broker would not accept (``too_large``), with sizes in the message."""
    if len(payload) > limit:
        raise EnvelopeError(
            Reason.TOO_LARGE,
            f"payload of {len(payload)} bytes exceeds the broker's {limit}-byte packet limit; "
            "enable chunking or raise the broker's message_size_limit",
        )


def split(payload: bytes, max_packet: int, msg_id: bytes | None = None) -> list[bytes]:
    """``payload`` as chunks of at most ``max_packet`` bytes each (header included)."""
    chunk_size = max_packet - HEADER_BYTES
    if chunk_size < 1:
        raise ValueError(f"max_packet must exceed the {HEADER_BYTES}-byte chunk header, got {max_packet}")
    if not payload or len(payload) > _MAX_U32:
        raise ValueError(f"can only chunk 1 to {_MAX_U32} bytes, got {len(payload)}")
    msg_id = secrets.token_bytes(8) if msg_id is None else msg_id
    if len(msg_id) != 8:
        raise ValueError("msg_id must be 8 bytes")
    total = math.ceil(len(payload) / chunk_size)
    crc = zlib.crc32(payload)
    out = []
    for seq in range(total):
        data = payload[seq * chunk_size : (seq + 1) * chunk_size]
        head = _HEADER.pack(CHUNK_MAGIC, msg_id, seq, total, chunk_size, len(payload), crc, 0)[:-4]
        out.append(head + struct.pack(">I", zlib.crc32(data, zlib.crc32(head))) + data)
    return out


def packets_for(payload: bytes, max_packet: int, *, chunking: bool) -> list[bytes]:
    """What to publish for ``payload``: itself when it fits, else its chunks, else ``too_large``."""
    if len(payload) <= max_packet and not is_chunk(payload):
        return [payload]
    if not chunking:
        check_size(payload, max_packet)
    return split(payload, max_packet)


@dataclass
class _Pending:
    total: int
    chunk_size: int
    total_len: int
    crc: int
    started: float
    chunks: dict[int, bytes] = field(default_factory=dict)


class Reassembler:
    """Rebuilds chunked payloads per sender, within fixed memory and time bounds.

    Parameters
    ----------
    max_message_bytes : int
        Largest payload accepted (whole or reassembled); a chunk declaring more is ``too_large``.
    max_in_flight : int
        Most partially received messages at once, over all senders.
    max_in_flight_per_source : int
        Most partially received messages of one sender, so one client cannot fill the buffer.
    max_bytes : int
        Most bytes reserved by partial messages (each reserves its declared length on its first chunk).
    timeout_s : float
        A message not complete this long after its first chunk is dropped.
    remember_done : int
        How many completed message ids are remembered, so that a redelivered chunk of a finished
        message is refused as ``duplicate`` instead of starting a new one.
    clock : callable
        Monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        max_message_bytes: int,
        *,
        max_in_flight: int = 64,
        max_in_flight_per_source: int = 2,
        max_bytes: int = 256 * 1024 * 1024,
        timeout_s: float = 120.0,
        remember_done: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_message_bytes = max_message_bytes
        self.max_in_flight = max_in_flight
        self.max_in_flight_per_source = max_in_flight_per_source
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.remember_done = remember_done
        self.clock = clock
        self._pending: dict[tuple[str, bytes], _Pending] = {}
        self._done: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self.evicted = 0  # messages dropped for timeout, for the receiver's counters

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def reserved_bytes(self) -> int:
        return sum(p.total_len for p in self._pending.values())

    def evict_expired(self) -> list[tuple[str, bytes]]:
        """Drop messages older than ``timeout_s``; their ``(source, message id)``."""
        now = self.clock()
        old = [k for k, p in self._pending.items() if now - p.started > self.timeout_s]
        for k in old:
            del self._pending[k]
        self.evicted += len(old)
        return old

    def feed(self, source: str, packet: bytes) -> bytes | None:
        """The whole payload once ``packet`` completes it (or is itself whole), else ``None``.

        ``source`` names the sender (its topic or client id): message ids are only unique per sender.
        Raises :class:`EnvelopeError` for a corrupt, inconsistent, duplicate or oversized chunk; a
        corrupt or inconsistent chunk also drops the partial message it claims to belong to.
        """
        self.evict_expired()
        if not is_chunk(packet):
            check_size(packet, self.max_message_bytes)
            return packet
        if len(packet) < HEADER_BYTES:
            raise EnvelopeError(Reason.BAD_CHUNK, f"chunk of {len(packet)} bytes is shorter than its header")
        _, msg_id, seq, total, chunk_size, total_len, crc, chunk_crc = _HEADER.unpack_from(packet)
        key = (source, msg_id)
        data = packet[HEADER_BYTES:]
        if zlib.crc32(data, zlib.crc32(packet[: HEADER_BYTES - 4])) != chunk_crc:
            self._pending.pop(key, None)
            raise EnvelopeError(Reason.BAD_CHUNK, f"chunk {seq} of message {msg_id.hex()}: CRC mismatch")
        if total_len > self.max_message_bytes:
            raise EnvelopeError(
                Reason.TOO_LARGE, f"chunked message of {total_len} bytes exceeds {self.max_message_bytes}"
            )
        expected = chunk_size if seq < total - 1 else total_len - (total - 1) * chunk_size
        if (
            total_len < 1
            or chunk_size < 1
            or total != math.ceil(total_len / chunk_size)
            or seq >= total
            or len(data) != expected
        ):
            self._pending.pop(key, None)
            raise EnvelopeError(Reason.BAD_CHUNK, f"chunk {seq}/{total} of {len(data)} bytes is inconsistent")
        pending = self._pending.get(key) or self._start(key, total, chunk_size, total_len, crc)
        if (pending.total, pending.chunk_size, pending.total_len, pending.crc) != (
            total, chunk_size, total_len, crc,
        ):  # fmt: skip
            del self._pending[key]
            raise EnvelopeError(Reason.BAD_CHUNK, f"chunk {seq} disagrees with message {msg_id.hex()}")
        if seq in pending.chunks:
            if pending.chunks[seq] != data:
                del self._pending[key]
                raise EnvelopeError(Reason.BAD_CHUNK, f"chunk {seq} of {msg_id.hex()} resent with other data")
            raise EnvelopeError(Reason.DUPLICATE, f"chunk {seq} of message {msg_id.hex()} received twice")
        pending.chunks[seq] = data
        if len(pending.chunks) < total:
            return None
        del self._pending[key]
        payload = b"".join(pending.chunks[i] for i in range(total))
        if zlib.crc32(payload) != crc:
            raise EnvelopeError(Reason.BAD_CHUNK, f"message {msg_id.hex()}: reassembled CRC mismatch")
        self._done[key] = None
        if len(self._done) > self.remember_done:
            self._done.popitem(last=False)
        return payload

    def _start(
        self, key: tuple[str, bytes], total: int, chunk_size: int, total_len: int, crc: int
    ) -> _Pending:
        if key in self._done:
            raise EnvelopeError(Reason.DUPLICATE, f"message {key[1].hex()} was already reassembled")
        if len(self._pending) >= self.max_in_flight:
            raise EnvelopeError(Reason.CAPACITY, f"{self.max_in_flight} chunked messages already in flight")
        if sum(1 for s, _ in self._pending if s == key[0]) >= self.max_in_flight_per_source:
            raise EnvelopeError(
                Reason.CAPACITY, f"{key[0]} already has {self.max_in_flight_per_source} in flight"
            )
        if self.reserved_bytes + total_len > self.max_bytes:
            raise EnvelopeError(
                Reason.CAPACITY,
                f"{total_len} more bytes would exceed the {self.max_bytes}-byte reassembly buffer",
            )
        pending = _Pending(total, chunk_size, total_len, crc, self.clock())
        self._pending[key] = pending
        return pending
