"""The update envelope: one MQTT payload = magic + length-prefixed JSON header + safetensors + MAC.

Layout (``protocol/ENVELOPE.md`` is the language-neutral specification, with test vectors)::

    b"FLW\\x01" | header length N (uint32 BE) | header (N bytes, UTF-8 JSON) | safetensors | MAC (32 bytes)

Two kinds: ``update`` (client -> coordinator, on ``up/{client}``) and ``global`` (coordinator ->
clients, retained on ``global``: the global adapter plus the round announcement). The MAC is an
HMAC-SHA256 with the sender's key when keys are configured (header ``auth: "hmac-sha256"``), else a
SHA-256 checksum (``auth: "sha256"``), over every byte of the payload before it: the header bytes
exactly as sent and the blob. The receiver never re-serializes anything, so a sender in any language
may write the header JSON as its own library does (schema 2; schema 1 MACed Python's re-serialization
of the header and is refused with ``schema``).

Decoding checks everything before any tensor is used, cheapest and most fundamental first: size,
framing, header schema, spec hash, topic agreement, round, MAC, then the tensors (safetensors header
bounded by our own parser, dtypes, names and shapes against the template, finite values). Every
refusal is an :class:`EnvelopeError` with a :class:`Reason`; nothing else escapes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import struct
import time
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from export.spec import AdapterSpec, SpecError
from export.state import State, without_kept
from protocol.wire_errors import EnvelopeError, Reason
from protocol.wire_schema import (
    GLOBAL_FIELDS,
    GLOBAL_OPTIONAL,
    HMAC_SHA256,
    SCHEMA_VERSION,
    SHA256,
    UPDATE_FIELDS,
    UPDATE_OPTIONAL,
    check_schema,
)
from protocol.wire_tensors import (
    Template,
    check_against_template,
    check_dtypes,
    encode_tensors,
    load_checked,
    parse_tensor_header,
    strict_json,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAC_BYTES",
    "MAGIC",
    "DecodedGlobal",
    "DecodedUpdate",
    "EnvelopeError",
    "GlobalHeader",
    "Reason",
    "UpdateHeader",
    "client_hash",
    "decode_global",
    "decode_update",
    "encode_global",
    "encode_update",
    "is_sampled",
    "pack",
    "sample_clients",
    "unpack",
]

MAGIC = b"FLW\x01"
_PREFIX = struct.Struct(">4sI")  # magic, header length
MAX_HEADER_BYTES = 256 * 1024  # a global header lists the sampled client ids: ~20 bytes each
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# -- headers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateHeader:
    """A client's update: who, which round, what it trained and at what cost.

    ``rank``: the LoRA rank of the uploaded A/B (``None`` without LoRA layers). ``heads``: the Ravan
    heads uploaded (``None`` = all, or no Ravan layers). ``msg_id``: a random nonce, for replay checks.
    ``signed``: the mac was an HMAC with the client's key (else a plain checksum).
    Optional measurements (``None`` when the device sent none): ``eval_loss`` and ``eval_accuracy``
    of the global it received, on its ``eval_examples`` local validation examples, before training;
    ``train_loss``, the mean loss of its local steps.
    """

    run: str
    round: int
    client: str
    method: str
    spec: str
    num_examples: int
    local_steps: int
    compute_s: float
    rank: int | None
    heads: tuple[int, ...] | None
    msg_id: str
    sent_at: float
    signed: bool
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    eval_examples: int | None = None
    train_loss: float | None = None


@dataclass(frozen=True)
class GlobalHeader:
    """The round announcement that travels with the global adapter.

    The round's participants still awaited are ``clients`` when given (the sampled clients whose
    update the coordinator does not hold yet; empty just before the round closes), else every client
    for which :func:`is_sampled` draws below ``sample_fraction``. Updates are due by ``deadline`` (Unix time).
    ``final``: the run is over, clients may disconnect.
    """

    run: str
    round: int
    method: str
    spec: str
    spec_json: dict[str, Any]
    deadline: float
    clients: tuple[str, ...] | None
    sample_fraction: float | None
    rank: int | None
    final: bool
    msg_id: str
    sent_at: float
    signed: bool
    keep_local: tuple[str, ...] = ()  # suffixes of the tensors clients keep (FedSA-LoRA's B)
    model: str | None = None  # the registered model the coordinator trains (None: not announced)
    num_classes: int | None = None
    # The LoRA ranks a device may train (edge_client.planner); None: the global rank only.
    rank_choices: tuple[int, ...] | None = None


@dataclass
class DecodedUpdate:
    header: UpdateHeader
    state: State


@dataclass
class DecodedGlobal:
    header: GlobalHeader
    state: State


def client_hash(salt: object, round: int, client: str) -> int:
    """A client's stable 64-bit draw for a round: the first 8 bytes of SHA-256 of
    ``"{salt}:{round}:{client}"``, big-endian (``protocol/ENVELOPE.md``, *Sampling*)."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{round}:{client}".encode()).digest()[:8], "big")


def sample_clients(seed: int, round: int, enrolled: Iterable[str], k: int) -> list[str]:
    """Who takes part in ``round``: the ``k`` enrolled clients with the smallest
    :func:`client_hash` under ``seed`` (all of them when ``k`` is 0), sorted.

    The one sampler: the coordinator names them in the announcement, the simulator trains them.
    """
    roster = sorted(enrolled)
    if not k or k >= len(roster):
        return roster
    return sorted(sorted(roster, key=lambda c: (client_hash(seed, round, c), c))[:k])


def is_sampled(header: GlobalHeader, client: str) -> bool:
    """Whether ``client`` takes part in the announced round: listed (:func:`sample_clients` chose the
    list), or, in an open fleet, its :func:`client_hash` under the run falls below the fraction."""
    if header.clients is not None:
        return client in header.clients
    assert header.sample_fraction is not None  # the schema requires one of the two
    return client_hash(header.run, header.round, client) / 2**64 < header.sample_fraction


# -- framing and MAC -------------------------------------------------------------------------------

MAC_BYTES = 32  # an HMAC-SHA256 or SHA-256 digest, raw, at the very end of the payload


def _header_bytes(header: Mapping[str, Any]) -> bytes:
    # Any JSON writer will do (the MAC covers these bytes as sent); this one is compact and ASCII.
    return json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _mac(parts: Sequence[bytes | memoryview], key: bytes | None) -> bytes:
    """HMAC-SHA256 (with ``key``) or SHA-256 of ``parts``: every payload byte before the MAC, in order."""
    mac = hashlib.sha256() if key is None else hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.digest()


def _check_key(key: bytes | None) -> None:
    if key is not None and (not isinstance(key, bytes) or len(key) < 16):
        raise ValueError("a device key must be bytes of at least 16 bytes")


def pack(header: Mapping[str, Any], blob: bytes, key: bytes | None) -> bytes:
    """Frame a header (without ``auth``) and a safetensors blob, and append the MAC.

    The low-level half of :func:`encode_update` / :func:`encode_global`; it does not validate.
    """
    _check_key(key)
    text = _header_bytes({**header, "auth": SHA256 if key is None else HMAC_SHA256})
    prefix = _PREFIX.pack(MAGIC, len(text))
    return b"".join((prefix, text, blob, _mac((prefix, text, blob), key)))  # the blob is copied once


def unpack(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """``(header without auth, blob)`` of a well-framed payload, MAC unchecked: :func:`pack`'s inverse.

    For tools that forge or re-sign envelopes (tests, the hostile drill), never for receiving.
    """
    _, n = _PREFIX.unpack_from(payload)
    header = json.loads(payload[_PREFIX.size : _PREFIX.size + n])
    return {k: v for k, v in header.items() if k != "auth"}, payload[_PREFIX.size + n : -MAC_BYTES]


@dataclass(frozen=True)
class _Framed:
    header: object  # the parsed JSON, schema unchecked
    body: memoryview  # every byte the MAC covers
    blob: memoryview
    mac: bytes


def _unframe(payload: bytes | memoryview, max_bytes: int) -> _Framed:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise EnvelopeError(Reason.BAD_MAGIC, f"payload is {type(payload).__name__}, not bytes")
    # Immutable from here on: bytes, or a read-only view whose exporter nobody else holds (the MQTT
    # reader's packet buffers, protocol.mqtt_reader); anything else is copied once.
    if not (isinstance(payload, bytes) or (isinstance(payload, memoryview) and payload.readonly)):
        payload = bytes(payload)
    if len(payload) > max_bytes:
        raise EnvelopeError(
            Reason.TOO_LARGE, f"payload of {len(payload)} bytes exceeds the {max_bytes} limit"
        )
    if not payload[: len(MAGIC)] == MAGIC[: len(payload)]:
        raise EnvelopeError(Reason.BAD_MAGIC, "not a fleetlora envelope")
    if len(payload) < _PREFIX.size:
        raise EnvelopeError(Reason.TRUNCATED, f"payload of {len(payload)} bytes is shorter than the framing")
    _, n = _PREFIX.unpack_from(payload)
    if n > MAX_HEADER_BYTES:
        raise EnvelopeError(Reason.TOO_LARGE, f"header of {n} bytes exceeds the {MAX_HEADER_BYTES} limit")
    end = _PREFIX.size + n
    if end > len(payload):
        raise EnvelopeError(
            Reason.TRUNCATED, f"header of {n} bytes but only {len(payload) - _PREFIX.size} follow"
        )
    try:
        header = strict_json(payload[_PREFIX.size : end])
    except ValueError as e:
        raise EnvelopeError(Reason.BAD_HEADER, f"header is not valid JSON: {str(e)[:200]}") from e
    view = memoryview(payload)
    if len(payload) < end + MAC_BYTES:
        # Reported after the schema check: an old (schema 1) envelope has no MAC trailer at all.
        return _Framed(header, view[:0], view[:0], b"")
    mac_at = len(payload) - MAC_BYTES
    # The blob without a copy: updates are megabytes.
    return _Framed(header, view[:mac_at], view[end:mac_at], bytes(view[mac_at:]))


def _verify_mac(framed: _Framed, auth: str, key: bytes | None) -> None:
    if not framed.mac:
        raise EnvelopeError(Reason.TRUNCATED, f"no room for the {MAC_BYTES}-byte MAC after the header")
    if key is not None and auth != HMAC_SHA256:
        raise EnvelopeError(Reason.BAD_MAC, "unsigned envelope refused: this receiver requires an HMAC")
    if key is None and auth != SHA256:
        raise EnvelopeError(Reason.BAD_MAC, "signed envelope but no key is configured to verify it")
    if not hmac.compare_digest(_mac((framed.body,), key), framed.mac):
        raise EnvelopeError(Reason.BAD_MAC, f"{auth} does not verify")


def _tensors(
    blob: memoryview,
    template: Template,
    rank: int | None,
    heads: Sequence[int] | None,
    *,
    copy: bool,
    base_delta: bool = False,
) -> State:
    entries = parse_tensor_header(blob)
    check_dtypes(entries)
    check_against_template(entries, template, rank, heads, base_delta=base_delta)
    return load_checked(blob, entries, heads, copy=copy)


def _check_spec(d: Mapping[str, Any], spec: AdapterSpec, method: str | None) -> None:
    if d["spec"] != spec.digest():
        raise EnvelopeError(Reason.SPEC_MISMATCH, f"adapter spec {d['spec']} != this run's {spec.digest()}")
    if method is not None and d["method"] != method:
        raise EnvelopeError(Reason.SPEC_MISMATCH, f"method {d['method']!r} != this run's {method!r}")


def _fresh(msg_id: str | None, sent_at: float | None) -> tuple[str, float]:
    return (msg_id or secrets.token_hex(16), time.time() if sent_at is None else sent_at)


# -- updates ---------------------------------------------------------------------------------------


def encode_update(
    state: Mapping[str, torch.Tensor],
    *,
    run: str,
    round: int,
    client: str,
    method: str,
    spec: AdapterSpec,
    num_examples: int,
    local_steps: int,
    compute_s: float,
    rank: int | None = None,
    heads: Sequence[int] | None = None,
    key: bytes | None = None,
    msg_id: str | None = None,
    sent_at: float | None = None,
    eval_loss: float | None = None,
    eval_accuracy: float | None = None,
    eval_examples: int | None = None,
    train_loss: float | None = None,
) -> bytes:
    """A client's update as one payload (see :class:`UpdateHeader` for the fields).

    Raises :class:`EnvelopeError` (``schema``) when a field is out of range, so a client never sends
    what the coordinator would refuse for its header.
    """
    msg_id, sent_at = _fresh(msg_id, sent_at)
    header = {
        "v": SCHEMA_VERSION, "kind": "update", "run": run, "round": round, "client": client,
        "method": method, "spec": spec.digest(), "num_examples": num_examples,
        "local_steps": local_steps, "compute_s": compute_s, "rank": rank,
        "heads": None if heads is None else [int(i) for i in heads], "msg_id": msg_id, "sent_at": sent_at,
    }  # fmt: skip
    measured = {
        "eval_loss": eval_loss, "eval_accuracy": eval_accuracy, "eval_examples": eval_examples,
        "train_loss": train_loss,
    }  # fmt: skip
    header.update({k: v for k, v in measured.items() if v is not None})
    _check_evaluation(header)
    check_schema({**header, "auth": SHA256}, UPDATE_FIELDS, "update", UPDATE_OPTIONAL)
    return pack(header, encode_tensors(state), key)


_EVALUATION = ("eval_loss", "eval_accuracy", "eval_examples")


def _check_evaluation(d: Mapping[str, Any]) -> None:
    given = [k for k in _EVALUATION if k in d]
    if given and len(given) != len(_EVALUATION):
        raise EnvelopeError(Reason.SCHEMA, f"{given} without {sorted(set(_EVALUATION) - set(given))}")


def decode_update(
    payload: bytes | memoryview,
    *,
    expected_run: str,
    expected_client: str,
    rounds: int | Container[int],
    spec: AdapterSpec,
    template: Template,
    key: bytes | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    method: str | None = None,
) -> DecodedUpdate:
    """Validate and open a client's update; :class:`EnvelopeError` for anything not exactly right.

    Parameters
    ----------
    expected_run, expected_client : str
        From the topic the payload arrived on (:func:`protocol.topics.parse_up_topic`).
    rounds : int or container of int
        The round(s) the coordinator accepts now.
    spec : AdapterSpec
        The run's adapter; the header's spec hash must be its digest.
    template : dict of str to shape
        The full-rank shapes of the global adapter's trainable tensors
        (:func:`protocol.wire_tensors.template_of`).
    key : bytes or None
        The client's device key: the header must carry a valid HMAC. ``None``: a valid SHA-256.
    max_bytes : int
        Payloads above this are refused before anything is parsed.
    method : str, optional
        When given, the header's method must equal it.
    """
    _check_key(key)
    framed = _unframe(payload, max_bytes)
    d = check_schema(framed.header, UPDATE_FIELDS, "update", UPDATE_OPTIONAL)
    _check_evaluation(d)
    _check_spec(d, spec, method)
    if d["run"] != expected_run or d["client"] != expected_client:
        raise EnvelopeError(
            Reason.TOPIC_MISMATCH,
            f"header says run {d['run']!r} client {d['client']!r}, "
            f"topic says run {expected_run!r} client {expected_client!r}",
        )
    accepted = (rounds,) if isinstance(rounds, int) else rounds
    if d["round"] not in accepted:
        raise EnvelopeError(Reason.WRONG_ROUND, f"round {d['round']} is not open")
    _verify_mac(framed, d["auth"], key)
    heads = None if d["heads"] is None else tuple(d["heads"])
    # Views of the payload, not copies: the coordinator only reads updates (it aggregates into new
    # tensors), and a copy of every megabyte it receives cost it as much CPU as the SHA-256.
    state = _tensors(framed.blob, template, d["rank"], heads, copy=False)
    header = UpdateHeader(
        run=d["run"], round=d["round"], client=d["client"], method=d["method"], spec=d["spec"],
        num_examples=d["num_examples"], local_steps=d["local_steps"], compute_s=float(d["compute_s"]),
        rank=d["rank"], heads=heads, msg_id=d["msg_id"], sent_at=float(d["sent_at"]),
        signed=d["auth"] == HMAC_SHA256, eval_loss=_optional_float(d, "eval_loss"),
        eval_accuracy=_optional_float(d, "eval_accuracy"), eval_examples=d.get("eval_examples"),
        train_loss=_optional_float(d, "train_loss"),
    )  # fmt: skip
    return DecodedUpdate(header, state)


def _optional_float(d: Mapping[str, Any], name: str) -> float | None:
    return float(d[name]) if name in d else None


# -- global adapter + round announcement -----------------------------------------------------------


def encode_global(
    state: Mapping[str, torch.Tensor],
    *,
    run: str,
    round: int,
    method: str,
    spec: AdapterSpec,
    deadline: float,
    clients: Sequence[str] | None = None,
    sample_fraction: float | None = None,
    rank: int | None = None,
    final: bool = False,
    key: bytes | None = None,
    msg_id: str | None = None,
    sent_at: float | None = None,
    keep_local: Sequence[str] = (),
    model: str | None = None,
    num_classes: int | None = None,
    rank_choices: Sequence[int] | None = None,
) -> bytes:
    """The global adapter and the round announcement as one (retained) payload.

    Exactly one of ``clients`` (the sampled ids) and ``sample_fraction`` (see :func:`is_sampled`)
    names the round's participants. ``keep_local``: suffixes of the tensors every client keeps
    between rounds (they are neither in ``state`` nor in any update). ``model``, ``num_classes``: what
    the coordinator trains (optional), so a device of another model says so. ``rank_choices``: the
    LoRA ranks a device may train instead of ``rank`` (methods that aggregate heterogeneous ranks);
    each device takes its slice of the one global (:func:`export.adapters.rank_view`).
    """
    if (clients is None) == (sample_fraction is None):
        raise EnvelopeError(Reason.SCHEMA, "give exactly one of clients and sample_fraction")
    msg_id, sent_at = _fresh(msg_id, sent_at)
    header = {
        "v": SCHEMA_VERSION, "kind": "global", "run": run, "round": round, "method": method,
        "spec": spec.digest(), "spec_json": spec.to_dict(), "deadline": deadline,
        "clients": None if clients is None else list(clients), "sample_fraction": sample_fraction,
        "rank": rank, "final": final, "msg_id": msg_id, "sent_at": sent_at, "keep_local": list(keep_local),
    }  # fmt: skip
    header.update({k: v for k, v in (("model", model), ("num_classes", num_classes)) if v is not None})
    if rank_choices is not None:
        if rank is None or any(r > rank for r in rank_choices):
            raise EnvelopeError(Reason.SCHEMA, f"rank_choices {list(rank_choices)} above the rank {rank}")
        header["rank_choices"] = [int(r) for r in rank_choices]
    check_schema({**header, "auth": SHA256}, GLOBAL_FIELDS, "global", GLOBAL_OPTIONAL)
    stray = [k for k in state if k.endswith(tuple(keep_local))]
    if stray:
        raise EnvelopeError(Reason.UNKNOWN_KEY, f"{stray[0]} is kept by the clients, not sent")
    return pack(header, encode_tensors(state), key)


def decode_global(
    payload: bytes,
    *,
    expected_run: str,
    spec: AdapterSpec,
    template: Template,
    key: bytes | None,
    min_round: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    model: str | None = None,
    num_classes: int | None = None,
) -> DecodedGlobal:
    """Validate and open a global adapter on a client; :class:`EnvelopeError` for anything not right.

    ``spec`` is the client's own (from its bundle): the header's hash and embedded spec must match it.
    ``model``, ``num_classes``: the client's own; an announcement naming others is refused
    (``model_mismatch``), and a spec that differs is refused naming the fields that differ.
    ``min_round`` refuses stale announcements (a retained message older than what the client has).
    ``key``: the coordinator's key when globals are signed.
    """
    _check_key(key)
    framed = _unframe(payload, max_bytes)
    d = check_schema(framed.header, GLOBAL_FIELDS, "global", GLOBAL_OPTIONAL)
    if (d["clients"] is None) == (d["sample_fraction"] is None):
        raise EnvelopeError(Reason.SCHEMA, "exactly one of clients and sample_fraction must be set")
    if "rank_choices" in d and (d["rank"] is None or max(d["rank_choices"]) > d["rank"]):
        raise EnvelopeError(Reason.SCHEMA, f"rank_choices {d['rank_choices']} above the rank {d['rank']}")
    try:
        embedded = AdapterSpec.from_dict(d["spec_json"]).digest()
    except (SpecError, TypeError, ArithmeticError) as e:
        raise EnvelopeError(Reason.SCHEMA, f"spec_json is not an adapter spec: {str(e)[:200]}") from e
    if embedded != d["spec"]:
        raise EnvelopeError(Reason.SPEC_MISMATCH, f"spec_json hashes to {embedded}, header says {d['spec']}")
    _check_model(d, model, num_classes)
    if d["spec"] != spec.digest():
        differences = spec_differences(d["spec_json"], spec)
        raise EnvelopeError(
            Reason.SPEC_MISMATCH, f"the coordinator's adapter spec differs from this device's: {differences}"
        )
    if d["run"] != expected_run:
        raise EnvelopeError(
            Reason.TOPIC_MISMATCH, f"header says run {d['run']!r}, topic says {expected_run!r}"
        )
    if d["round"] < min_round:
        raise EnvelopeError(Reason.WRONG_ROUND, f"round {d['round']} is older than {min_round}")
    _verify_mac(framed, d["auth"], key)
    kept = tuple(d["keep_local"])
    if kept:
        if not any(name.endswith(kept) for name in template):
            raise EnvelopeError(Reason.SCHEMA, f"keep_local names {list(kept)}, which this adapter lacks")
        template = without_kept(template, kept)
    # Copies: a trainer may train them in place. FLoRA and FedEx-LoRA send their change of the base.
    state = _tensors(framed.blob, template, d["rank"], None, copy=True, base_delta=True)
    header = GlobalHeader(
        run=d["run"], round=d["round"], method=d["method"], spec=d["spec"], spec_json=d["spec_json"],
        deadline=float(d["deadline"]), sample_fraction=d["sample_fraction"], rank=d["rank"],
        clients=None if d["clients"] is None else tuple(d["clients"]), final=d["final"],
        msg_id=d["msg_id"], sent_at=float(d["sent_at"]), signed=d["auth"] == HMAC_SHA256, keep_local=kept,
        model=d.get("model"), num_classes=d.get("num_classes"),
        rank_choices=tuple(d["rank_choices"]) if "rank_choices" in d else None,
    )  # fmt: skip
    return DecodedGlobal(header, state)


def _check_model(d: Mapping[str, Any], model: str | None, num_classes: int | None) -> None:
    theirs = (d.get("model"), d.get("num_classes"))
    mine = (model, num_classes)
    if all(t is None or m is None or t == m for t, m in zip(theirs, mine, strict=True)):
        return
    raise EnvelopeError(
        Reason.MODEL_MISMATCH,
        f"the coordinator trains {theirs[0] or 'a model'} with {theirs[1] or '?'} classes; this device has "
        f"{model or 'a model'} with {num_classes or '?'} classes (flash the coordinator's bundle)",
    )


def spec_differences(theirs: Mapping[str, Any], mine: AdapterSpec) -> str:
    """The fields in which an announced spec differs from ``mine``, in words (``rank 8, here 4``)."""
    own = mine.to_dict()
    changed = [f"{k} {theirs.get(k)!r}, here {own[k]!r}" for k in sorted(own) if theirs.get(k) != own[k]]
    return "; ".join(changed) or "the same fields, another hash"
