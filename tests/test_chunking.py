"""Chunking: split / reassemble in any order, duplicates, corruption, timeouts and memory bounds."""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_client.chunking import HEADER_BYTES, Reassembler, check_size, is_chunk, packets_for, split
from protocol.wire_errors import EnvelopeError, Reason


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def reject(reason: Reason, fn: Callable[[], object]) -> str:
    with pytest.raises(EnvelopeError) as info:
        fn()
    assert info.value.reason is reason, info.value
    return info.value.message


def feed_all(r: Reassembler, chunks: list[bytes], source: str = "dev-1") -> list[bytes]:
    return [p for c in chunks if (p := r.feed(source, c)) is not None]


def reheader(chunk: bytes, **fields: int) -> bytes:
    """``chunk`` with header fields changed and its chunk CRC recomputed (a consistent forgery)."""
    names = ["magic", "msg_id", "seq", "total", "chunk_size", "total_len", "crc", "chunk_crc"]
    values = dict(zip(names, struct.unpack(">4s8sIIIIII", chunk[:HEADER_BYTES]), strict=True))
    values.update(fields)
    head = struct.pack(">4s8sIIIII", *(values[n] for n in names[:-1]))
    data = chunk[HEADER_BYTES:]
    return head + struct.pack(">I", zlib.crc32(data, zlib.crc32(head))) + data


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=1, max_size=5000), st.integers(HEADER_BYTES + 1, 700), st.randoms())
def test_split_and_reassemble_in_any_order(payload: bytes, max_packet: int, rnd: random.Random) -> None:
    chunks = split(payload, max_packet)
    assert all(len(c) <= max_packet and is_chunk(c) for c in chunks)
    assert len(chunks) == -(-len(payload) // (max_packet - HEADER_BYTES))
    rnd.shuffle(chunks)
    r = Reassembler(max_message_bytes=10_000)
    assert feed_all(r, chunks) == [payload]
    assert r.in_flight == 0 and r.reserved_bytes == 0


def test_interleaved_messages_from_several_sources() -> None:
    r = Reassembler(max_message_bytes=10_000)
    payloads = {f"dev-{i}": bytes([i]) * (1000 + i) for i in range(4)}
    stream = [(s, c) for s, p in payloads.items() for c in split(p, 100)]
    random.Random(0).shuffle(stream)
    done = {s: p for s, c in stream if (p := r.feed(s, c)) is not None}
    assert done == payloads


def test_same_message_id_from_two_sources_does_not_mix() -> None:
    r = Reassembler(max_message_bytes=10_000)
    a, b = split(b"a" * 300, 150, msg_id=b"\0" * 8), split(b"b" * 300, 150, msg_id=b"\0" * 8)
    assert feed_all(r, a[:1], "dev-a") + feed_all(r, b, "dev-b") + feed_all(r, a[1:], "dev-a") == [
        b"b" * 300,
        b"a" * 300,
    ]


def test_whole_payloads_pass_through() -> None:
    r = Reassembler(max_message_bytes=100)
    assert r.feed("dev-1", b"FLW\x01 small") == b"FLW\x01 small"
    reject(Reason.TOO_LARGE, lambda: r.feed("dev-1", b"x" * 101))


def test_duplicate_chunk_and_redelivered_message_are_refused() -> None:
    r = Reassembler(max_message_bytes=10_000)
    chunks = split(b"p" * 500, 200)
    assert r.feed("dev-1", chunks[0]) is None
    reject(Reason.DUPLICATE, lambda: r.feed("dev-1", chunks[0]))
    assert feed_all(r, chunks[1:]) == [b"p" * 500]
    reject(Reason.DUPLICATE, lambda: r.feed("dev-1", chunks[1]))  # QoS 1 redelivery after completion
    assert r.in_flight == 0


def test_corrupt_chunk_is_refused_and_drops_the_message() -> None:
    r = Reassembler(max_message_bytes=10_000)
    chunks = split(b"q" * 500, 200)
    r.feed("dev-1", chunks[0])
    flipped = chunks[1][:-1] + bytes([chunks[1][-1] ^ 1])
    reject(Reason.BAD_CHUNK, lambda: r.feed("dev-1", flipped))
    assert r.in_flight == 0


@pytest.mark.parametrize(
    ("case", "fields"),
    [
        ("seq beyond total", {"seq": 7}),
        ("total disagrees with lengths", {"total": 5}),
        ("zero chunk size", {"chunk_size": 0}),
        ("zero length", {"total_len": 0, "total": 0}),
    ],
)
def test_inconsistent_chunk_headers_are_refused(case: str, fields: dict[str, int]) -> None:
    chunks = split(b"z" * 500, 200)
    reject(
        Reason.BAD_CHUNK,
        lambda: Reassembler(max_message_bytes=10_000).feed("dev-1", reheader(chunks[0], **fields)),
    )


def test_chunk_disagreeing_with_its_message_is_refused() -> None:
    r = Reassembler(max_message_bytes=10_000)
    chunks = split(b"y" * 500, 200)
    r.feed("dev-1", chunks[0])
    reject(Reason.BAD_CHUNK, lambda: r.feed("dev-1", reheader(chunks[1], crc=123)))
    assert r.in_flight == 0
    r.feed("dev-1", split(b"w" * 500, 200, msg_id=b"m" * 8)[0])
    other = split(b"v" * 500, 200, msg_id=b"m" * 8)[0]
    reject(Reason.BAD_CHUNK, lambda: r.feed("dev-1", other))  # same seq, other data


def test_reassembled_crc_mismatch_is_refused() -> None:
    chunks = [reheader(c, crc=1) for c in split(b"u" * 500, 200)]
    r = Reassembler(max_message_bytes=10_000)
    reject(Reason.BAD_CHUNK, lambda: feed_all(r, chunks))
    assert r.in_flight == 0


def test_short_chunk_is_refused() -> None:
    reject(Reason.BAD_CHUNK, lambda: Reassembler(max_message_bytes=100).feed("dev-1", b"FLC\x01abc"))


def test_oversized_message_is_refused_on_its_first_chunk() -> None:
    r = Reassembler(max_message_bytes=1000)
    reject(Reason.TOO_LARGE, lambda: r.feed("dev-1", split(b"x" * 1001, 200)[0]))
    assert r.in_flight == 0


def test_missing_chunk_times_out_and_frees_memory() -> None:
    clock = Clock()
    r = Reassembler(max_message_bytes=10_000, timeout_s=10, clock=clock)
    chunks = split(b"t" * 900, 200)
    feed_all(r, chunks[:-1])
    assert r.in_flight == 1 and r.reserved_bytes == 900
    clock.now = 10.5
    assert r.evict_expired() == [("dev-1", chunks[0][4:12])]
    assert r.in_flight == 0 and r.reserved_bytes == 0 and r.evicted == 1
    assert r.feed("dev-1", chunks[-1]) is None  # the late chunk starts over and will time out too


def test_memory_bounds() -> None:
    r = Reassembler(max_message_bytes=1000, max_in_flight=3, max_in_flight_per_source=2, max_bytes=2500)
    firsts = {s: split(bytes(1000), 300)[0] for s in ("a1", "a2", "a3", "b1")}
    r.feed("dev-a", firsts["a1"])
    r.feed("dev-a", firsts["a2"])
    assert "dev-a already has 2" in reject(Reason.CAPACITY, lambda: r.feed("dev-a", firsts["a3"]))
    assert "2500-byte" in reject(Reason.CAPACITY, lambda: r.feed("dev-b", firsts["b1"]))
    r.feed("dev-b", split(bytes(400), 300)[0])
    assert "3 chunked messages" in reject(Reason.CAPACITY, lambda: r.feed("dev-c", split(bytes(10), 300)[0]))
    assert r.in_flight == 3 and r.reserved_bytes == 2400


def test_check_size_and_packets_for() -> None:
    reject(Reason.TOO_LARGE, lambda: check_size(b"x" * 11, 10))
    check_size(b"x" * 10, 10)
    assert packets_for(b"x" * 10, 10, chunking=False) == [b"x" * 10]
    reject(Reason.TOO_LARGE, lambda: packets_for(b"x" * 11, 10, chunking=False))
    chunks = packets_for(b"x" * 1000, 100, chunking=True)
    assert len(chunks) == 16 and all(len(c) <= 100 for c in chunks)
    assert len(packets_for(b"FLC\x01 looks like a chunk", 100, chunking=True)) == 1  # wrapped, never misread
    with pytest.raises(ValueError, match="must exceed"):
        split(b"x", HEADER_BYTES)
