"""Thousands of random and mutated payloads against the decoder: decoded exactly, or EnvelopeError.

Raw byte mutations (random bytes, bit flips, truncations, splices) keep the original MAC, so anything
that decodes must be exactly the original. Mutations made with a fresh valid MAC (header fields,
tensor shapes/dtypes/values/keys, safetensors bytes) must decode to exactly what was sent, or be
refused. Any other exception fails the test: nothing but :class:`EnvelopeError` may escape.
"""

from __future__ import annotations

import struct
from typing import Any

import safetensors.torch
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from export.spec import AdapterSpec
from protocol.wire import (
    MAGIC,
    DecodedUpdate,
    EnvelopeError,
    decode_global,
    decode_update,
    encode_global,
    encode_update,
    pack,
    unpack,
)
from protocol.wire_tensors import ravan_slice

A, B = ".lora_A.default.weight", ".lora_B.default.weight"
KEY = b"fuzz-key-0123456789abcdef"
LORA_SPEC = AdapterSpec(target_modules=("q",), rank=4)
RAVAN_SPEC = AdapterSpec(family="ravan", target_modules=("q",), heads=4, head_rank=2)
DENSE = {"classifier.weight": (2, 3), "classifier.bias": (2,)}
LORA_T = {"l0.q" + A: (4, 3), "l0.q" + B: (5, 4), **DENSE}
RAVAN_T = {"l0.q.ravan_H": (4, 2, 2), "l0.q.ravan_s": (4,), **DENSE}
FIELDS: dict[str, Any] = dict(
    run="r", round=1, client="c", method="m", num_examples=5, local_steps=2, compute_s=0.5
)


def _state(template: dict, rank: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for k, shape in template.items():
        shape = (
            (rank, shape[1])
            if rank and k.endswith(A)
            else (shape[0], rank)
            if rank and k.endswith(B)
            else shape
        )
        out[k] = torch.randn(shape, generator=g)
    return out


# (spec, template, header fields, state, key): a LoRA update at rank 2, a bf16 one, a signed Ravan slice.
BASES: list[tuple[AdapterSpec, dict, dict, dict, bytes | None]] = [
    (LORA_SPEC, LORA_T, {**FIELDS, "rank": 2}, _state(LORA_T, rank=2), None),
    (LORA_SPEC, LORA_T, {**FIELDS, "rank": 4}, {k: v.bfloat16() for k, v in _state(LORA_T).items()}, None),
    (RAVAN_SPEC, RAVAN_T, {**FIELDS, "heads": [3, 1]}, ravan_slice(_state(RAVAN_T), [3, 1]), KEY),
]
PAYLOADS = [encode_update(s, spec=spec, key=key, **f) for spec, _, f, s, key in BASES]
FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode(i: int, payload: bytes) -> DecodedUpdate | None:
    """The decoded update, or ``None`` when refused with an EnvelopeError (anything else propagates)."""
    spec, template, _, _, key = BASES[i]
    try:
        return decode_update(
            payload, expected_run="r", expected_client="c", rounds={1}, spec=spec, template=template, key=key,
            max_bytes=1 << 20,
        )  # fmt: skip
    except EnvelopeError as e:
        assert e.message and str(e).startswith(e.reason.value)
        event(f"refused: {e.reason.value}")  # see --hypothesis-show-statistics
        return None


def same_state(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(
        got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and torch.equal(got[k], want[k])
        for k in want
    )


def header_and_blob(payload: bytes) -> tuple[dict, bytes]:
    return unpack(payload)


def assert_original(i: int, got: DecodedUpdate | None) -> None:
    if got is not None:
        _, _, fields, state, _ = BASES[i]
        assert same_state(got.state, state)
        assert (got.header.round, got.header.num_examples, got.header.rank) == (1, 5, fields.get("rank"))


base_index = st.integers(0, len(BASES) - 1)


def test_unmodified_payloads_decode_exactly() -> None:
    for i, payload in enumerate(PAYLOADS):
        got = decode(i, payload)
        assert got is not None
        assert_original(i, got)


@FUZZ
@given(st.one_of(st.binary(max_size=600), st.binary(max_size=600).map(lambda b: MAGIC + b)))
def test_random_bytes_are_refused(data: bytes) -> None:
    assert decode(0, data) is None


@FUZZ
@given(base_index, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), min_size=1, max_size=6))
def test_bit_flips_are_refused_or_harmless(i: int, flips: list[tuple[int, int]]) -> None:
    payload = bytearray(PAYLOADS[i])
    for pos, bit in flips:
        payload[pos % len(payload)] ^= 1 << bit
    assert_original(i, decode(i, bytes(payload)))


@FUZZ
@given(base_index, st.integers(0, 10**6), st.integers(0, 64), st.binary(max_size=64))
def test_truncations_and_splices_are_refused(i: int, at: int, cut: int, insert: bytes) -> None:
    payload = PAYLOADS[i]
    at %= len(payload)
    assert decode(i, payload[:at]) is None
    spliced = payload[:at] + insert + payload[at + cut :]
    assert_original(i, decode(i, spliced))


NEAR_VALID = ["r", "c", "m", 1, 0, -1, 2**31, 1e11, "0" * 32, "f" * 64, [0, 1]]
json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12), st.sampled_from(NEAR_VALID),
)  # fmt: skip
json_values = (
    json_leaves
    | st.lists(json_leaves, max_size=3)
    | st.dictionaries(st.text(max_size=6), json_leaves, max_size=3)
)


@FUZZ
@given(base_index, st.data())
def test_header_field_mutations_with_valid_mac(i: int, data: st.DataObject) -> None:
    header, blob = header_and_blob(PAYLOADS[i])
    field = data.draw(st.sampled_from([*header, "extra", "auth", "mac"]))
    if data.draw(st.booleans()):
        header.pop(field, None)
    else:
        header[field] = data.draw(json_values)
    got = decode(i, pack(header, blob, BASES[i][4]))
    if got is not None:  # a still-valid header: it must be exactly what was sent
        assert same_state(got.state, BASES[i][3])
        h = got.header
        assert (h.run, h.round, h.client, h.num_examples, h.local_steps) == tuple(
            header[k] for k in ("run", "round", "client", "num_examples", "local_steps")
        )
        assert (h.compute_s, h.sent_at, h.msg_id, h.rank) == (
            header["compute_s"], header["sent_at"], header["msg_id"], header["rank"]
        )  # fmt: skip
        assert h.heads == (None if header["heads"] is None else tuple(header["heads"]))


DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]


@FUZZ
@given(base_index, st.data())
def test_tensor_mutations_with_valid_mac(i: int, data: st.DataObject) -> None:
    state = dict(BASES[i][3])
    name = data.draw(st.sampled_from([*state, "l0.q.extra", "l0.q.ravan_heads"]))
    op = data.draw(st.sampled_from(["dtype", "shape", "nonfinite", "delete", "rename", "values"]))
    t = state.get(name, torch.zeros(2))
    if op == "dtype":
        state[name] = t.to(data.draw(st.sampled_from(DTYPES)))
    elif op == "shape":
        shape = data.draw(st.lists(st.integers(0, 6), max_size=4))
        state[name] = torch.zeros(shape, dtype=t.dtype)
    elif op == "nonfinite" and t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = data.draw(
            st.sampled_from([float("nan"), float("inf")])
        )
        state[name] = t
    elif op == "delete":
        state.pop(name, None)
    elif op == "rename" and name in state:
        state[name + data.draw(st.sampled_from(["x", ".lora_A.default.weight", "_"]))] = state.pop(name)
    elif op == "values":
        state[name] = torch.tensor(data.draw(st.lists(st.integers(-3, 5), max_size=5)), dtype=torch.int64)
    spec, _, fields, _, key = BASES[i]
    got = decode(i, encode_update(state, spec=spec, key=key, **fields))
    if got is not None:
        assert same_state(got.state, state)
        assert all(torch.isfinite(v).all() for v in got.state.values() if v.is_floating_point())


@FUZZ
@given(base_index, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_safetensors_byte_mutations_with_valid_mac(i: int, edits: list[tuple[int, int]]) -> None:
    """Hostile safetensors bytes behind a valid MAC: refused, or exactly what safetensors reads."""
    header, blob = header_and_blob(PAYLOADS[i])
    mutated = bytearray(blob)
    n = struct.unpack("<Q", blob[:8])[0]
    for pos, value in edits:  # mostly inside the safetensors JSON header, where parsing is hardest
        mutated[pos % (8 + n) if pos % 2 else pos % len(mutated)] = value
    got = decode(i, pack(header, bytes(mutated), BASES[i][4]))
    if got is not None:
        assert same_state(got.state, safetensors.torch.load(bytes(mutated)))


GLOBAL_PAYLOAD = encode_global(
    _state(LORA_T), run="r", round=4, method="m", spec=LORA_SPEC, deadline=10.0, clients=["a", "b"], rank=4
)
spec_fields = st.sampled_from([*LORA_SPEC.to_dict(), "extra"])


@FUZZ
@given(st.data())
def test_global_header_mutations_with_valid_mac(data: st.DataObject) -> None:
    header, blob = header_and_blob(GLOBAL_PAYLOAD)
    if data.draw(st.booleans()):  # mutate the embedded adapter spec, the only free-form field
        spec_json = dict(header["spec_json"])
        spec_json[data.draw(spec_fields)] = data.draw(json_values)
        header["spec_json"] = spec_json
    else:
        header[data.draw(st.sampled_from([*header, "extra"]))] = data.draw(json_values)
    try:
        got = decode_global(
            pack(header, blob, None), expected_run="r", spec=LORA_SPEC, template=LORA_T, key=None
        )
    except EnvelopeError as e:
        event(f"refused: {e.reason.value}")
        return
    assert AdapterSpec.from_dict(got.header.spec_json) == LORA_SPEC
    assert same_state(got.state, _state(LORA_T))
