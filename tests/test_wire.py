"""The update envelope: round trips, one test per rejection reason, MAC modes."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Callable
from typing import Any

import pytest
import safetensors.torch
import torch

from export.spec import AdapterSpec
from protocol.wire import (
    MAC_BYTES,
    MAGIC,
    DecodedUpdate,
    EnvelopeError,
    Reason,
    decode_global,
    decode_update,
    encode_global,
    encode_update,
    is_sampled,
    pack,
    unpack,
)
from protocol.wire_tensors import encode_tensors, ravan_slice, template_of

A, B = ".lora_A.default.weight", ".lora_B.default.weight"
KEY = b"k" * 32
LORA_SPEC = AdapterSpec(target_modules=("q", "v"), rank=4)
RAVAN_SPEC = AdapterSpec(family="ravan", target_modules=("q", "v"), heads=4, head_rank=3)
DENSE_SPEC = LORA_SPEC.with_(target_modules=("classifier",))
DENSE = {"classifier.weight": (3, 5), "classifier.bias": (3,)}
LORA_T = {"l0.q" + A: (4, 6), "l0.q" + B: (5, 4), "l0.v" + A: (4, 6), "l0.v" + B: (7, 4), **DENSE}
FFA_T = {"l0.q" + B: (5, 4), "l0.v" + B: (7, 4), **DENSE}
RAVAN_T = {
    "l0.q.ravan_H": (4, 3, 3),
    "l0.q.ravan_s": (4,),
    "l0.v.ravan_H": (4, 3, 3),
    "l0.v.ravan_s": (4,),
    **DENSE,
}


def random_state(template: dict[str, tuple[int, ...]], rank: int | None = None, seed: int = 0) -> dict:
    """Random tensors for ``template``, LoRA layers cut to ``rank``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in template.items():
        if rank is not None and k.endswith(A):
            shape = (rank, shape[1])
        elif rank is not None and k.endswith(B):
            shape = (shape[0], rank)
        out[k] = torch.randn(shape, generator=g)
    return out


UPDATE_FIELDS: dict[str, Any] = dict(
    run="run1", round=3, client="dev-7", method="fedit", num_examples=120, local_steps=10, compute_s=2.5
)


def enc(state: dict, spec: AdapterSpec = LORA_SPEC, key: bytes | None = None, **fields: Any) -> bytes:
    kw = {**UPDATE_FIELDS, **fields}
    if spec.family == "lora" and "rank" not in kw:
        kw["rank"] = next((t.shape[0] for k, t in state.items() if k.endswith(A)), None)
    return encode_update(state, spec=spec, key=key, **kw)


def dec(
    payload: bytes, spec: AdapterSpec = LORA_SPEC, template: dict | None = None, **kw: Any
) -> DecodedUpdate:
    args: dict[str, Any] = dict(expected_run="run1", expected_client="dev-7", rounds=3, key=None)
    args.update(kw)
    return decode_update(payload, spec=spec, template=LORA_T if template is None else template, **args)


def header_of(payload: bytes) -> dict:
    (n,) = struct.unpack(">I", payload[4:8])
    return json.loads(payload[8 : 8 + n])


def blob_of(payload: bytes) -> bytes:
    return unpack(payload)[1]


def repack(payload: bytes, key: bytes | None = None, blob: bytes | None = None, **changes: Any) -> bytes:
    """The payload with header fields changed (``_DELETE`` deletes one) and a valid MAC."""
    h = unpack(payload)[0]
    for k, v in changes.items():
        if v is _DELETE:
            h.pop(k, None)
        else:
            h[k] = v
    return pack(h, blob_of(payload) if blob is None else blob, key)


_DELETE = object()


def assert_same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def reject(reason: Reason, fn: Callable[[], object]) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as info:
        fn()
    assert info.value.reason is reason, info.value
    return info.value


# -- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [4, 2, 1])
def test_lora_round_trip_full_and_lower_rank(rank: int) -> None:
    state = random_state(LORA_T, rank=rank)
    got = dec(enc(state, rank=rank, heads=None))
    assert_same_state(got.state, state)
    h = got.header
    assert (h.run, h.round, h.client, h.method, h.rank, h.heads) == ("run1", 3, "dev-7", "fedit", rank, None)
    assert (h.num_examples, h.local_steps, h.compute_s, h.spec) == (120, 10, 2.5, LORA_SPEC.digest())
    assert len(h.msg_id) == 32 and not h.signed


def test_ffa_uploads_b_only() -> None:
    spec = LORA_SPEC.with_(freeze_a=True)
    state = random_state(FFA_T, rank=2)
    got = dec(encode_update(state, spec=spec, rank=2, **UPDATE_FIELDS), spec=spec, template=FFA_T)
    assert_same_state(got.state, state)


@pytest.mark.parametrize("with_s", [True, False])
def test_ravan_subset_of_heads(with_s: bool) -> None:
    full = random_state(RAVAN_T)
    state = ravan_slice(full, [2, 0])
    if not with_s:
        state = {k: v for k, v in state.items() if not k.endswith("ravan_s")}
    assert state["l0.q.ravan_H"].shape == (2, 3, 3)
    got = dec(enc(state, spec=RAVAN_SPEC, heads=[2, 0]), spec=RAVAN_SPEC, template=RAVAN_T)
    assert got.header.heads == (2, 0) and got.header.rank is None
    assert_same_state(got.state, state)
    assert torch.equal(got.state["l0.v.ravan_H"][0], full["l0.v.ravan_H"][2])


def test_ravan_all_heads_without_indices() -> None:
    state = random_state(RAVAN_T)
    got = dec(enc(state, spec=RAVAN_SPEC), spec=RAVAN_SPEC, template=RAVAN_T)
    assert got.header.heads is None
    assert_same_state(got.state, state)


def test_dense_only_adapter() -> None:
    state = random_state(DENSE)
    got = dec(encode_update(state, spec=DENSE_SPEC, **UPDATE_FIELDS), spec=DENSE_SPEC, template=DENSE)
    assert_same_state(got.state, state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_round_trip(dtype: torch.dtype) -> None:
    state = {k: v.to(dtype) for k, v in random_state(LORA_T, rank=3).items()}
    assert_same_state(dec(enc(state)).state, state)


def test_hmac_round_trip_marks_signed() -> None:
    state = random_state(LORA_T)
    got = dec(enc(state, key=KEY), key=KEY)
    assert got.header.signed
    assert_same_state(got.state, state)


def test_accepted_rounds_as_a_set() -> None:
    assert dec(enc(random_state(LORA_T), round=5), rounds={4, 5}).header.round == 5


def test_global_round_trip_with_client_list_and_key() -> None:
    state = random_state(LORA_T)
    payload = encode_global(
        state,
        run="run1",
        round=7,
        method="fedit",
        spec=LORA_SPEC,
        deadline=1.7e9,
        clients=["a", "b"],
        rank=4,
        key=KEY,
    )
    got = decode_global(payload, expected_run="run1", spec=LORA_SPEC, template=LORA_T, key=KEY, min_round=7)
    assert_same_state(got.state, state)
    h = got.header
    assert (h.round, h.deadline, h.clients, h.sample_fraction, h.final, h.signed) == (
        7,
        1.7e9,
        ("a", "b"),
        None,
        False,
        True,
    )
    assert AdapterSpec.from_dict(h.spec_json) == LORA_SPEC
    assert is_sampled(h, "a") and not is_sampled(h, "c")


def test_global_sampling_rule_is_stable_and_near_the_fraction() -> None:
    payload = encode_global(
        random_state(RAVAN_T),
        run="run1",
        round=2,
        method="ravan",
        spec=RAVAN_SPEC,
        deadline=0,
        sample_fraction=0.25,
    )
    h = decode_global(payload, expected_run="run1", spec=RAVAN_SPEC, template=RAVAN_T, key=None).header
    picks = [is_sampled(h, f"c{i}") for i in range(2000)]
    assert picks == [is_sampled(h, f"c{i}") for i in range(2000)]
    assert 400 < sum(picks) < 600


# -- one test per rejection reason -----------------------------------------------------------------

GOOD = enc(random_state(LORA_T))
SIGNED = enc(random_state(LORA_T), key=KEY)


def raw_header(text: bytes, payload: bytes = GOOD) -> bytes:
    """``payload`` with its header bytes replaced verbatim, the old MAC kept."""
    return MAGIC + struct.pack(">I", len(text)) + text + blob_of(payload) + payload[-MAC_BYTES:]


def edited_header(payload: bytes = GOOD, **changes: Any) -> bytes:
    """``payload`` with header fields changed but the old MAC kept."""
    return raw_header(json.dumps({**header_of(payload), **changes}).encode(), payload)


def lora_with(changes: dict[str, torch.Tensor | None]) -> dict:
    """A full-rank LoRA state with some tensors replaced (``None`` removes one)."""
    state = random_state(LORA_T)
    for k, v in changes.items():
        if v is None:
            del state[k]
        else:
            state[k] = v
    return state


def dec_ravan(state: dict, heads: list[int] | None = None, **fields: Any) -> DecodedUpdate:
    return dec(enc(state, spec=RAVAN_SPEC, heads=heads, **fields), spec=RAVAN_SPEC, template=RAVAN_T)


def ravan_upload(heads: list[int], template: dict = RAVAN_T, **changes: torch.Tensor | None) -> dict:
    """A Ravan upload of ``heads`` with some tensors replaced (keys with '__' for '.')."""
    state = ravan_slice(random_state(template), heads)
    for k, v in changes.items():
        if v is None:
            del state[k.replace("__", ".")]
        else:
            state[k.replace("__", ".")] = v
    return state


def with_blob(entries: dict[str, Any], data: bytes) -> bytes:
    """GOOD re-MACed around a hand-written safetensors blob."""
    text = json.dumps(entries).encode()
    return repack(GOOD, blob=struct.pack("<Q", len(text)) + text + data)


def f32(shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


BIG_RANK_T = {**LORA_T, "l0.q" + A: (5, 6), "l0.q" + B: (5, 5), "l0.v" + A: (5, 6), "l0.v" + B: (7, 5)}
EIGHT_HEADS_T = {
    **RAVAN_T,
    "l0.q.ravan_H": (8, 3, 3),
    "l0.q.ravan_s": (8,),
    "l0.v.ravan_H": (8, 3, 3),
    "l0.v.ravan_s": (8,),
}
NAN, INF = float("nan"), float("inf")


def header_of_bytes(payload: bytes) -> bytes:
    (n,) = struct.unpack(">I", payload[4:8])
    return payload[8 : 8 + n]


def schema_1_envelope() -> bytes:
    """An update as schema 1 framed it: a ``mac`` header field, no trailer."""
    h = {**header_of(GOOD), "v": 1, "mac": "0" * 64}
    text = json.dumps(h, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(text)) + text + blob_of(GOOD)


# JSON has no infinity, but Python's parser reads an overflowing literal as one.
INF_COMPUTE_HEADER = json.dumps({**header_of(GOOD), "compute_s": 0.5}).replace(": 0.5", ": 1e999").encode()

# fmt: off
REJECTIONS: list[tuple[Reason, str, Callable[[], object]]] = [
    (Reason.TOO_LARGE, "over max_bytes", lambda: dec(GOOD, max_bytes=len(GOOD) - 1)),
    (Reason.TOO_LARGE, "header length over limit", lambda: dec(MAGIC + struct.pack(">I", 10**7) + b"{}")),
    (Reason.TRUNCATED, "shorter than framing", lambda: dec(GOOD[:6])),
    (Reason.TRUNCATED, "header cut", lambda: dec(GOOD[:40])),
    (Reason.TRUNCATED, "no room for the MAC", lambda: dec(GOOD[: 8 + len(header_of_bytes(GOOD)) + 10])),
    (Reason.BAD_MAGIC, "other magic", lambda: dec(b"XXXX" + GOOD[4:])),
    (Reason.BAD_MAGIC, "not bytes", lambda: dec("text")),  # type: ignore[arg-type]
    (Reason.BAD_HEADER, "not JSON", lambda: dec(raw_header(b"{nope"))),
    (Reason.BAD_HEADER, "duplicate key", lambda: dec(raw_header(b'{"v":1,"v":1}'))),
    (Reason.BAD_HEADER, "NaN constant", lambda: dec(raw_header(b'{"v":NaN}'))),
    (Reason.BAD_HEADER, "deep nesting", lambda: dec(raw_header(b"[" * 100_000))),
    (Reason.BAD_HEADER, "not UTF-8", lambda: dec(raw_header(b'{"v":"\xff"}'))),
    (Reason.SCHEMA, "not an object", lambda: dec(raw_header(b"[1]"))),
    (Reason.SCHEMA, "missing field", lambda: dec(repack(GOOD, num_examples=_DELETE))),
    (Reason.SCHEMA, "unknown field", lambda: dec(repack(GOOD, extra=1))),
    (Reason.SCHEMA, "string round", lambda: dec(repack(GOOD, round="3"))),
    (Reason.SCHEMA, "bool as int", lambda: dec(repack(GOOD, local_steps=True))),
    (Reason.SCHEMA, "zero examples", lambda: dec(repack(GOOD, num_examples=0))),
    (Reason.SCHEMA, "negative compute", lambda: dec(repack(GOOD, compute_s=-1.0))),
    (Reason.SCHEMA, "huge int compute", lambda: dec(repack(GOOD, compute_s=10**400))),
    (Reason.SCHEMA, "1e999 parses to inf", lambda: dec(raw_header(INF_COMPUTE_HEADER))),
    (Reason.SCHEMA, "bad client id", lambda: dec(repack(GOOD, client="a/b"))),
    (Reason.SCHEMA, "duplicate heads", lambda: dec(repack(GOOD, heads=[1, 1]))),
    (Reason.SCHEMA, "newer version", lambda: dec(repack(GOOD, v=3))),
    (Reason.SCHEMA, "schema 1 (MAC over a re-serialization)", lambda: dec(schema_1_envelope())),
    (Reason.SCHEMA, "a mac header field", lambda: dec(repack(GOOD, mac="0" * 64))),
    (Reason.SCHEMA, "global kind", lambda: dec(repack(GOOD, kind="global"))),
    (Reason.SPEC_MISMATCH, "other spec", lambda: dec(GOOD, spec=LORA_SPEC.with_(rank=8))),
    (Reason.SPEC_MISMATCH, "other method", lambda: dec(GOOD, method="flora")),
    (Reason.SCHEMA, "eval loss without accuracy", lambda: dec(repack(GOOD, eval_loss=0.5))),
    (Reason.SCHEMA, "accuracy above 1", lambda: dec(
        repack(GOOD, eval_loss=0.5, eval_accuracy=1.5, eval_examples=3))),
    (Reason.MODEL_MISMATCH, "another model announced", lambda: decode_global(
        encode_global({}, run="r", round=1, method="fedit", spec=LORA_SPEC, deadline=0, clients=[],
                      model="minilm", num_classes=8),
        expected_run="r", spec=LORA_SPEC, template={}, key=None, model="tiny-bert", num_classes=8)),
    (Reason.TOPIC_MISMATCH, "other client", lambda: dec(GOOD, expected_client="dev-8")),
    (Reason.TOPIC_MISMATCH, "other run", lambda: dec(GOOD, expected_run="run2")),
    (Reason.WRONG_ROUND, "stale round", lambda: dec(GOOD, rounds={4, 5})),
    (Reason.BAD_MAC, "tensor byte flipped",
     lambda: dec(GOOD[: -MAC_BYTES - 1] + bytes([GOOD[-MAC_BYTES - 1] ^ 1]) + GOOD[-MAC_BYTES:])),
    (Reason.BAD_MAC, "header edited, old checksum", lambda: dec(edited_header(num_examples=121))),
    (Reason.BAD_MAC, "header edited, old hmac",
     lambda: dec(edited_header(SIGNED, num_examples=121), key=KEY)),
    (Reason.BAD_MAC, "forged hmac", lambda: dec(SIGNED[:-MAC_BYTES] + b"\0" * MAC_BYTES, key=KEY)),
    (Reason.BAD_MAC, "MAC byte flipped", lambda: dec(GOOD[:-1] + bytes([GOOD[-1] ^ 1]))),
    (Reason.BAD_MAC, "header re-serialized, old checksum",
     lambda: dec(raw_header(json.dumps(header_of(GOOD), indent=1).encode()))),
    (Reason.BAD_MAC, "wrong key", lambda: dec(SIGNED, key=b"x" * 32)),
    (Reason.BAD_MAC, "unsigned when key required", lambda: dec(GOOD, key=KEY)),
    (Reason.BAD_MAC, "signed but no key", lambda: dec(SIGNED, key=None)),
    (Reason.BAD_TENSORS, "empty blob", lambda: dec(repack(GOOD, blob=b""))),
    (Reason.BAD_TENSORS, "header length beyond blob",
     lambda: dec(repack(GOOD, blob=struct.pack("<Q", 2**62) + b"{}"))),
    (Reason.BAD_TENSORS, "not JSON", lambda: dec(repack(GOOD, blob=struct.pack("<Q", 3) + b"{x}"))),
    (Reason.BAD_TENSORS, "metadata", lambda: dec(with_blob({"__metadata__": {}}, b""))),
    (Reason.BAD_TENSORS, "gap in data", lambda: dec(with_blob({"x": f32([1], 4, 8)}, b"\0" * 8))),
    (Reason.BAD_TENSORS, "overlapping data",
     lambda: dec(with_blob({"x": f32([1], 0, 4), "y": f32([1], 0, 4)}, b"\0" * 4))),
    (Reason.BAD_TENSORS, "huge shape, 4 bytes",
     lambda: dec(with_blob({"l0.q" + A: f32([2**40, 2**40], 0, 4)}, b"\0" * 4))),
    (Reason.BAD_TENSORS, "trailing bytes", lambda: dec(repack(GOOD, blob=blob_of(GOOD) + b"\0"))),
    (Reason.DTYPE, "float64",
     lambda: dec(enc(lora_with({"classifier.bias": torch.zeros(3, dtype=torch.float64)})))),
    (Reason.DTYPE, "int64 on a float key",
     lambda: dec(enc(lora_with({"classifier.bias": torch.zeros(3, dtype=torch.int64)})))),
    (Reason.DTYPE, "int32 head indices",
     lambda: dec_ravan(ravan_upload([1], l0__q__ravan_heads=torch.tensor([1], dtype=torch.int32)), [1])),
    (Reason.UNKNOWN_KEY, "extra tensor", lambda: dec(enc(lora_with({"extra": torch.zeros(1)})))),
    (Reason.UNKNOWN_KEY, "indices but no header heads",
     lambda: dec_ravan({**random_state(RAVAN_T), "l0.q.ravan_heads": torch.arange(4)})),
    (Reason.MISSING_KEY, "no bias", lambda: dec(enc(lora_with({"classifier.bias": None})))),
    (Reason.MISSING_KEY, "A missing", lambda: dec(enc(lora_with({"l0.q" + A: None})))),
    (Reason.MISSING_KEY, "head indices missing",
     lambda: dec_ravan(ravan_upload([1], l0__v__ravan_heads=None), [1])),
    (Reason.SHAPE, "rank above template", lambda: dec(enc(random_state(BIG_RANK_T), rank=5))),
    (Reason.SHAPE, "rank disagrees with header", lambda: dec(enc(random_state(LORA_T, rank=2), rank=3))),
    (Reason.SHAPE, "A and B ranks differ", lambda: dec(enc(lora_with({"l0.v" + B: torch.zeros(7, 2)})))),
    (Reason.SHAPE, "dense shape", lambda: dec(enc(lora_with({"classifier.bias": torch.zeros(4)})))),
    (Reason.SHAPE, "no rank for LoRA", lambda: dec(repack(GOOD, rank=None))),
    (Reason.SHAPE, "rank without LoRA", lambda: dec_ravan(random_state(RAVAN_T), rank=2)),
    (Reason.SHAPE, "heads without Ravan", lambda: dec(repack(GOOD, heads=[0]))),
    (Reason.SHAPE, "H not sliced to the heads",
     lambda: dec_ravan(ravan_upload([0], l0__q__ravan_H=torch.zeros(4, 3, 3)), [0])),
    (Reason.SHAPE, "s not sliced",
     lambda: dec_ravan(ravan_upload([0, 1], l0__q__ravan_s=torch.ones(4)), [0, 1])),
    (Reason.HEADS, "indices differ from header",
     lambda: dec_ravan(ravan_upload([0, 1], l0__v__ravan_heads=torch.tensor([1, 0])), [0, 1])),
    (Reason.HEADS, "index out of range", lambda: dec_ravan(ravan_upload([7], EIGHT_HEADS_T), [7])),
    (Reason.NON_FINITE, "NaN",
     lambda: dec(enc(lora_with({"classifier.bias": torch.tensor([0.0, NAN, 0.0])})))),
    (Reason.NON_FINITE, "inf in bfloat16",
     lambda: dec(enc(lora_with({"l0.q" + A: torch.full((4, 6), INF, dtype=torch.bfloat16)})))),
    (Reason.NON_FINITE, "NaN in Ravan H",
     lambda: dec_ravan(ravan_upload([3], l0__v__ravan_H=torch.full((1, 3, 3), NAN)), [3])),
]
# fmt: on


@pytest.mark.parametrize(
    ("reason", "case", "fn"), REJECTIONS, ids=[f"{r.value}-{c}" for r, c, _ in REJECTIONS]
)
def test_rejection(reason: Reason, case: str, fn: Callable[[], object]) -> None:
    err = reject(reason, fn)
    assert str(err).startswith(reason.value + ": ") and err.message


def test_every_envelope_reason_has_a_test() -> None:
    elsewhere = {
        Reason.REPLAY,  # the coordinator's policy: tests/test_service.py
        Reason.BAD_ID,
        Reason.BAD_TOPIC,
        Reason.NOT_SAMPLED,  # the coordinator's policy: tests/test_service.py
        Reason.OUTSIZED,  # the coordinator's norm limit: tests/test_service.py, tests/test_reliability.py
    }
    assert {r for r, _, _ in REJECTIONS} | elsewhere == set(Reason)


def test_a_schema_1_sender_is_told_it_is_older() -> None:
    err = reject(Reason.SCHEMA, lambda: dec(schema_1_envelope()))
    assert "schema version '1', expected 2" in str(err) and "older than this receiver" in str(err)


def test_the_mac_covers_the_header_bytes_as_sent_whatever_the_json_writer() -> None:
    """Another language's JSON writer (other key order, spacing, 17-digit floats) verifies as is."""
    h = {**unpack(SIGNED)[0], "auth": "hmac-sha256"}
    text = json.dumps(h, indent=2).replace('"compute_s": 2.5', '"compute_s": 2.50000000000000000').encode()
    body = MAGIC + struct.pack(">I", len(text)) + text + blob_of(SIGNED)
    got = dec(body + hmac.new(KEY, body, hashlib.sha256).digest(), key=KEY)
    assert got.header.compute_s == 2.5 and got.header.signed


def test_checks_run_in_order_size_before_anything() -> None:
    """A payload that is wrong in every way reports the first check: size, then spec, then topic."""
    bad = repack(GOOD, client="dev-8", round=9, blob=b"junk")
    reject(Reason.TOO_LARGE, lambda: dec(bad, max_bytes=10, spec=RAVAN_SPEC))
    reject(Reason.SPEC_MISMATCH, lambda: dec(bad, spec=RAVAN_SPEC))
    reject(Reason.TOPIC_MISMATCH, lambda: dec(bad))
    reject(Reason.WRONG_ROUND, lambda: dec(bad, expected_client="dev-8"))
    reject(Reason.BAD_TENSORS, lambda: dec(bad, expected_client="dev-8", rounds=9))


def test_mac_is_checked_before_tensors_are_parsed() -> None:
    """A hostile blob behind a forged HMAC never reaches the safetensors parser."""
    signed = enc(random_state(LORA_T), key=KEY)
    forged = repack(signed, key=b"attacker-key-0123456789", blob=b"\xff" * 64)
    reject(Reason.BAD_MAC, lambda: dec(forged, key=KEY))


def test_decoded_tensors_do_not_alias_a_mutable_payload() -> None:
    payload = bytearray(GOOD)
    got = dec(bytes(payload))
    before = got.state["classifier.bias"].clone()
    payload[-4:] = b"\0\0\0\0"
    assert torch.equal(got.state["classifier.bias"], before)


def test_update_tensors_are_views_of_the_payload_and_global_tensors_are_copies() -> None:
    """The coordinator reads updates in place (no megabyte copies); a device gets its own tensors."""
    state = random_state(LORA_T)
    update = enc(state)
    glob = encode_global(
        state, run="run1", round=3, method="fedit", spec=LORA_SPEC, deadline=1.7e9, clients=["a"], rank=4
    )

    def inside(t: torch.Tensor, payload: bytes) -> bool:
        base = torch.frombuffer(payload, dtype=torch.uint8).data_ptr()
        return base <= t.data_ptr() < base + len(payload)

    got = dec(update).state
    assert_same_state(got, state)
    assert all(inside(t, update) for t in got.values())
    received = decode_global(glob, expected_run="run1", spec=LORA_SPEC, template=LORA_T, key=None).state
    assert_same_state(received, state)
    assert not any(inside(t, glob) for t in received.values())


def test_encoder_refuses_a_bad_header() -> None:
    reject(Reason.SCHEMA, lambda: enc(random_state(LORA_T), num_examples=0))
    reject(Reason.SCHEMA, lambda: enc(random_state(LORA_T), client="a+b"))
    reject(
        Reason.SCHEMA,
        lambda: encode_global({}, run="r", round=0, method="m", spec=LORA_SPEC, deadline=0),
    )
    with pytest.raises(ValueError, match="at least 16 bytes"):
        enc(random_state(LORA_T), key=b"short")


def test_measurements_travel_in_the_update_header() -> None:
    state = random_state(LORA_T)
    plain = dec(enc(state)).header
    assert (plain.eval_loss, plain.eval_accuracy, plain.eval_examples, plain.train_loss) == (None,) * 4
    measured = enc(state, eval_loss=0.75, eval_accuracy=0.5, eval_examples=40, train_loss=0.25)
    h = dec(measured).header
    assert (h.eval_loss, h.eval_accuracy, h.eval_examples, h.train_loss) == (0.75, 0.5, 40, 0.25)
    reject(Reason.SCHEMA, lambda: enc(state, eval_loss=0.75))  # the encoder refuses half an evaluation


def test_a_device_of_another_model_or_spec_is_told_what_differs() -> None:
    payload = encode_global(
        {}, run="r", round=1, method="fedit", spec=LORA_SPEC, deadline=0, clients=[], model="minilm",
        num_classes=8,
    )  # fmt: skip
    args: dict[str, Any] = dict(expected_run="r", template={}, key=None)
    err = reject(
        Reason.MODEL_MISMATCH,
        lambda: decode_global(payload, spec=LORA_SPEC, model="tiny-bert", num_classes=6, **args),
    )
    assert "trains minilm with 8 classes; this device has tiny-bert with 6 classes" in err.message
    err = reject(
        Reason.SPEC_MISMATCH,
        lambda: decode_global(payload, spec=LORA_SPEC.with_(rank=2), model="minilm", num_classes=8, **args),
    )
    assert "rank 4, here 2" in err.message
    header = decode_global(payload, spec=LORA_SPEC, model="minilm", num_classes=8, **args).header
    assert (header.model, header.num_classes) == ("minilm", 8)


def test_global_rejections() -> None:
    state = random_state(LORA_T)
    payload = encode_global(
        state, run="run1", round=4, method="fedit", spec=LORA_SPEC, deadline=0, clients=["a"], rank=4
    )

    def dec_g(p: bytes = payload, **kw: Any) -> object:
        args: dict[str, Any] = dict(expected_run="run1", spec=LORA_SPEC, template=LORA_T, key=None)
        return decode_global(p, **{**args, **kw})

    reject(Reason.WRONG_ROUND, lambda: dec_g(min_round=5))
    reject(Reason.TOPIC_MISMATCH, lambda: dec_g(expected_run="run2"))
    reject(Reason.SPEC_MISMATCH, lambda: dec_g(spec=LORA_SPEC.with_(seed=1)))
    reject(Reason.SPEC_MISMATCH, lambda: dec_g(repack(payload, spec_json=LORA_SPEC.with_(seed=1).to_dict())))
    reject(Reason.SCHEMA, lambda: dec_g(repack(payload, spec_json={"rank": "x"})))
    reject(Reason.SCHEMA, lambda: dec_g(repack(payload, spec_json={**LORA_SPEC.to_dict(), "alpha": 10**400})))
    reject(Reason.SCHEMA, lambda: dec_g(repack(payload, sample_fraction=0.5)))
    reject(Reason.SCHEMA, lambda: dec_g(GOOD))
    reject(Reason.BAD_MAC, lambda: dec_g(key=KEY))
    reject(Reason.SHAPE, lambda: dec_g(repack(payload, rank=2)))


def _with_base_delta(**changes: torch.Tensor | None) -> dict:
    """A global of LORA_T with FLoRA's base delta: l0.q factored (R = 2), l0.v dense, version 3."""
    g = torch.Generator().manual_seed(5)
    state = {
        **random_state(LORA_T),
        "l0.q.base_delta_B": torch.randn(5, 2, generator=g),
        "l0.q.base_delta_A": torch.randn(2, 6, generator=g),
        "l0.v.base_delta": torch.randn(7, 6, generator=g),
        "base_delta.version": torch.tensor(3, dtype=torch.int64),
    }
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


def _global(state: dict) -> bytes:
    return encode_global(
        state, run="run1", round=4, method="flora", spec=LORA_SPEC, deadline=0, clients=["a"], rank=4
    )


def _dec_global(payload: bytes) -> Any:
    return decode_global(payload, expected_run="run1", spec=LORA_SPEC, template=LORA_T, key=None)


def test_a_global_carries_the_base_delta_and_an_update_cannot() -> None:
    state = _with_base_delta()
    got = _dec_global(_global(state)).state
    assert_same_state(got, state)
    assert got["base_delta.version"].dtype == torch.int64 and int(got["base_delta.version"]) == 3
    reject(Reason.UNKNOWN_KEY, lambda: dec(enc(state)))  # a device never changes the base


@pytest.mark.parametrize(
    ("reason", "changes"),
    [
        (Reason.MISSING_KEY, {"base_delta.version": None}),
        (Reason.DTYPE, {"base_delta.version": torch.tensor(3.0)}),
        (Reason.SHAPE, {"base_delta.version": torch.tensor([3], dtype=torch.int64)}),
        (Reason.SHAPE, {"base_delta.version": torch.tensor(-1, dtype=torch.int64)}),
        (Reason.MISSING_KEY, {"l0.q.base_delta_A": None}),
        (Reason.SHAPE, {"l0.q.base_delta_A": torch.zeros(3, 6)}),  # R of B and A disagree
        (Reason.SHAPE, {"l0.q.base_delta_B": torch.zeros(4, 2)}),  # d of the layer is 5
        (Reason.SHAPE, {"l0.v.base_delta": torch.zeros(6, 7)}),
        (Reason.SHAPE, {"l0.q.base_delta": torch.zeros(5, 6)}),  # dense and factored at once
        (Reason.UNKNOWN_KEY, {"classifier.base_delta": torch.zeros(3, 5)}),  # not a LoRA layer
        (Reason.NON_FINITE, {"l0.v.base_delta": torch.full((7, 6), float("nan"))}),
    ],
    ids=["no-version", "float-version", "vector-version", "negative-version", "half-factored",
         "rank-mismatch", "wrong-d", "wrong-dense", "dense-and-factored", "not-lora", "nan"],
)  # fmt: skip
def test_a_malformed_base_delta_is_refused(reason: Reason, changes: dict) -> None:
    reject(reason, lambda: _dec_global(_global(_with_base_delta(**changes))))


def test_a_global_names_the_tensors_clients_keep_and_carries_the_rest() -> None:
    """FedSA-LoRA: clients keep B; the global holds A and the dense tensors and says so in keep_local."""
    shared = {k: v for k, v in random_state(LORA_T).items() if not k.endswith(B)}
    fields: dict[str, Any] = dict(run="run1", round=4, method="fedsa_lora", spec=LORA_SPEC, deadline=0)
    payload = encode_global(shared, clients=["a"], rank=4, keep_local=[B], **fields)
    got = _dec_global(payload)
    assert got.header.keep_local == (B,)
    assert_same_state(got.state, shared)
    assert _dec_global(_global(random_state(LORA_T))).header.keep_local == ()
    # A global that carries what the clients keep: refused when built and when received.
    full = random_state(LORA_T)
    reject(Reason.UNKNOWN_KEY, lambda: encode_global(full, clients=["a"], rank=4, keep_local=[B], **fields))
    reject(Reason.UNKNOWN_KEY, lambda: _dec_global(repack(_global(full), keep_local=[B])))
    # Only one LoRA factor may stay on the clients, named exactly; and the adapter must have it.
    for bad in ([A, B], ["lora_B"], [B, B], "B", None):
        reject(Reason.SCHEMA, lambda bad=bad: _dec_global(repack(payload, keep_local=bad)))
    reject(Reason.SCHEMA, lambda: _dec_global(repack(payload, keep_local=_DELETE)))
    ravan = encode_global(
        random_state(RAVAN_T), run="run1", round=4, method="ravan", spec=RAVAN_SPEC, deadline=0, clients=["a"]
    )
    reject(
        Reason.SCHEMA,
        lambda: decode_global(
            repack(ravan, keep_local=[B]), expected_run="run1", spec=RAVAN_SPEC, template=RAVAN_T, key=None
        ),
    )


def test_safetensors_blob_is_standard() -> None:
    """Other tools can read the tensor part with plain safetensors."""
    state = random_state(LORA_T)
    assert_same_state(safetensors.torch.load(blob_of(enc(state))), state)
    assert encode_tensors(state) == blob_of(enc(state))
    assert template_of(state) == LORA_T
