"""Test vectors of the envelope (``protocol/ENVELOPE.md``): encoded payloads, their keys and verdicts.

Every implementation of the envelope checks itself against the same files: the Python decoder in
``tests/test_wire_vectors.py``, the native client with ``fleetlora-client check-vectors``. The files are
made here, deterministically (fixed message ids, times and tensor values), and committed under
``protocol/envelope_vectors/``; the test also checks that this module still writes exactly them, so
a change of the format shows up as a diff of the vectors, never silently.

``vectors.json`` holds the keys (hex), the adapter spec and its digest, the template (name -> shape),
and one case per payload: the file, the key the receiver holds (``device``, ``coordinator`` or none),
what the receiver expects (run, client, rounds), and the verdict: ``ok`` with the decoded header fields
and tensors, or the refusal reason.

Regenerate (after a deliberate format change): ``python -m protocol.wire_vectors``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path
from typing import Any

import torch

from export.spec import AdapterSpec
from export.state import LORA_A, LORA_B
from protocol.wire import (
    MAC_BYTES,
    MAGIC,
    GlobalHeader,
    decode_global,
    encode_global,
    encode_update,
    is_sampled,
    unpack,
)
from protocol.wire_schema import SCHEMA_VERSION

FOLDER = Path(__file__).with_name("envelope_vectors")
INDEX = "vectors.json"
DEVICE_KEY = bytes(range(32))
COORDINATOR_KEY = bytes(range(100, 132))
SPEC = AdapterSpec(target_modules=("q",), rank=2, alpha=4.0)
OTHER_SPEC = SPEC.with_(seed=7)
TEMPLATE = {
    "l0.q" + LORA_A: (2, 3),
    "l0.q" + LORA_B: (4, 2),
    "classifier.weight": (2, 4),
    "classifier.bias": (2,),
}
RUN, CLIENT, ROUND = "vec-run", "dev-1", 3
MSG_ID = "0123456789abcdef0123456789abcdef"
SENT_AT = 1767225600.25
# A float whose shortest repr (Python's) differs from what other JSON writers print, e.g. nlohmann's
# 17 significant digits: the MAC must not care.
FOREIGN_FLOAT_TEXT, FOREIGN_FLOAT = "151.70637073051861", 151.7063707305186


def _tensor(shape: tuple[int, ...], offset: int) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    # Multiples of 1/8: exact in float32 and in any decimal printing.
    return ((torch.arange(n, dtype=torch.float32) + offset - n / 2) / 8).reshape(shape)


def _state(rank: int = 2) -> dict[str, torch.Tensor]:
    out = {}
    for i, (key, shape) in enumerate(TEMPLATE.items()):
        if key.endswith(LORA_A):
            shape = (rank, shape[1])
        elif key.endswith(LORA_B):
            shape = (shape[0], rank)
        out[key] = _tensor(shape, 3 * i)
    return out


def _update(key: bytes | None, rank: int = 2, **overrides: Any) -> bytes:
    fields: dict[str, Any] = dict(
        run=RUN, round=ROUND, client=CLIENT, method="fedit", spec=SPEC, num_examples=40, local_steps=5,
        compute_s=1.5, rank=rank, heads=None, key=key, msg_id=MSG_ID, sent_at=SENT_AT,
    )  # fmt: skip
    fields.update(overrides)
    return encode_update(_state(rank), **fields)


def _global(state: dict[str, torch.Tensor], key: bytes | None, spec: AdapterSpec = SPEC, **kw: Any) -> bytes:
    return encode_global(
        state, run=RUN, round=ROUND, method=kw.pop("method", "fedit"), spec=spec, deadline=1767225660.5,
        rank=2, key=key, msg_id=MSG_ID[::-1], sent_at=SENT_AT, **kw,
    )  # fmt: skip


def _framed(text: bytes, blob: bytes, key: bytes | None) -> bytes:
    body = MAGIC + struct.pack(">I", len(text)) + text + blob
    mac = hashlib.sha256(body) if key is None else hmac.new(key, body, hashlib.sha256)
    return body + mac.digest()


def _foreign_update() -> bytes:
    """A signed update whose header another JSON writer made: key order, spacing, 17-digit floats."""
    header, blob = unpack(_update(DEVICE_KEY))
    header["auth"] = "hmac-sha256"
    header["compute_s"] = FOREIGN_FLOAT
    text = json.dumps(dict(reversed(header.items())), indent=1)
    text = text.replace(json.dumps(FOREIGN_FLOAT), FOREIGN_FLOAT_TEXT)
    assert FOREIGN_FLOAT_TEXT in text and float(FOREIGN_FLOAT_TEXT) == FOREIGN_FLOAT
    return _framed(text.encode(), blob, DEVICE_KEY)


def _schema_1_update() -> bytes:
    """An update as schema 1 framed it: a ``mac`` header field over the re-serialized header, no trailer."""
    header, blob = unpack(_update(None))
    h = {**header, "v": 1, "auth": "sha256"}
    canonical = json.dumps(h, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(struct.pack(">I", len(canonical)) + canonical + blob).hexdigest()
    text = json.dumps({**h, "mac": digest}, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack(">I", len(text)) + text + blob


def _flipped(payload: bytes, at: int) -> bytes:
    return payload[:at] + bytes([payload[at] ^ 0x01]) + payload[at + 1 :]


def _edited(payload: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and payload.count(old) == 1
    return payload.replace(old, new)


def _header_fields(payload: bytes) -> dict[str, Any]:
    return {k: v for k, v in unpack(payload)[0].items() if k != "v"}


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    return {k: {"shape": list(t.shape), "values": t.flatten().tolist()} for k, t in sorted(state.items())}


def build() -> tuple[dict[str, bytes], dict[str, Any]]:
    """``(file name -> payload, the vectors.json index)``."""
    signed = _update(DEVICE_KEY)
    unsigned_rank1 = _update(None, rank=1)
    full = _state()
    shared = {k: v for k, v in full.items() if not k.endswith(LORA_B)}
    g_signed = _global(full, COORDINATOR_KEY, clients=["dev-1", "dev-2"])
    g_fedsa = _global(shared, None, method="fedsa_lora", sample_fraction=0.5, keep_local=[LORA_B])
    g_ranks = _global(full, None, method="hetlora", clients=["dev-1"], rank_choices=[1, 2])
    nan_state = {**full, "classifier.bias": torch.tensor([0.0, float("nan")])}
    (n,) = struct.unpack_from(">I", signed, 4)
    files = {
        "update_hmac.env": signed,
        "update_sha256_rank1.env": unsigned_rank1,
        "update_foreign_json.env": _foreign_update(),
        "global_hmac_clients.env": g_signed,
        "global_sha256_fraction_keep_local.env": g_fedsa,
        "global_sha256_rank_choices.env": g_ranks,
        "update_schema1.env": _schema_1_update(),
        "update_blob_byte_flipped.env": _flipped(signed, len(signed) - MAC_BYTES - 3),
        "update_header_edited.env": _edited(signed, b'"num_examples":40', b'"num_examples":41'),
        "update_truncated.env": signed[: 8 + n // 2],
        "global_nan.env": _global(nan_state, COORDINATOR_KEY, clients=["dev-1"]),
        "global_other_spec.env": _global(full, COORDINATOR_KEY, OTHER_SPEC, clients=["dev-1"]),
    }
    receiver = {"run": RUN, "client": CLIENT, "rounds": [ROUND]}
    foreign_header = {**_header_fields(signed), "compute_s": FOREIGN_FLOAT}
    fedsa_clients = [f"dev-{i}" for i in range(8)]
    cases: list[dict[str, Any]] = [
        {"file": "update_hmac.env", "kind": "update", "key": "device", "expect": "ok",
         "header": _header_fields(signed), "tensors": _tensors(full)},
        {"file": "update_hmac.env", "kind": "update", "key": "coordinator", "expect": "bad_mac"},
        {"file": "update_hmac.env", "kind": "update", "key": None, "expect": "bad_mac"},
        {"file": "update_sha256_rank1.env", "kind": "update", "key": None, "expect": "ok",
         "header": _header_fields(unsigned_rank1), "tensors": _tensors(_state(rank=1))},
        {"file": "update_sha256_rank1.env", "kind": "update", "key": "device", "expect": "bad_mac"},
        {"file": "update_foreign_json.env", "kind": "update", "key": "device", "expect": "ok",
         "header": foreign_header, "tensors": _tensors(full)},
        {"file": "global_hmac_clients.env", "kind": "global", "key": "coordinator", "expect": "ok",
         "header": _header_fields(g_signed), "tensors": _tensors(full),
         "sampled": {"dev-1": True, "dev-2": True, "dev-3": False}},
        {"file": "global_sha256_fraction_keep_local.env", "kind": "global", "key": None, "expect": "ok",
         "header": _header_fields(g_fedsa), "tensors": _tensors(shared),
         "sampled": {c: is_sampled(_decoded_header(g_fedsa), c) for c in fedsa_clients}},
        # The ranks a device may train instead of the global one (an optional field: a receiver that
        # trains the global rank only accepts it and may ignore it).
        {"file": "global_sha256_rank_choices.env", "kind": "global", "key": None, "expect": "ok",
         "header": {k: v for k, v in _header_fields(g_ranks).items() if k != "rank_choices"},
         "rank_choices": [1, 2], "tensors": _tensors(full)},
        {"file": "update_schema1.env", "kind": "update", "key": None, "expect": "schema"},
        {"file": "update_blob_byte_flipped.env", "kind": "update", "key": "device", "expect": "bad_mac"},
        {"file": "update_header_edited.env", "kind": "update", "key": "device", "expect": "bad_mac"},
        {"file": "update_truncated.env", "kind": "update", "key": "device", "expect": "truncated"},
        {"file": "global_nan.env", "kind": "global", "key": "coordinator", "expect": "non_finite"},
        {"file": "global_other_spec.env", "kind": "global", "key": "coordinator", "expect": "spec_mismatch"},
    ]  # fmt: skip
    index = {
        "schema": SCHEMA_VERSION,
        "about": "protocol/ENVELOPE.md: every implementation must reach each case's verdict",
        "keys": {"device": DEVICE_KEY.hex(), "coordinator": COORDINATOR_KEY.hex()},
        "spec": SPEC.digest(),
        "spec_json": SPEC.to_dict(),
        "template": {k: list(v) for k, v in TEMPLATE.items()},
        "receiver": receiver,
        "cases": cases,
    }
    return files, index


def _decoded_header(payload: bytes) -> GlobalHeader:
    return decode_global(payload, expected_run=RUN, spec=SPEC, template=TEMPLATE, key=None).header


def index_text(index: dict[str, Any]) -> str:
    return json.dumps(index, indent=1, sort_keys=True) + "\n"


def write(folder: Path = FOLDER) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files, index = build()
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
    (folder / INDEX).write_text(index_text(index))


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else FOLDER)
    print(f"wrote the envelope test vectors to {FOLDER if len(sys.argv) < 2 else sys.argv[1]}")
