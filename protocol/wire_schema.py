"""The envelope header schema: every field, its type and range, checked before anything else is read.

A header must have exactly the fields of its kind (no missing, no unknown ones). Integers are never
booleans, numbers are finite, ids use the topic charset, and hex fields are lowercase of a fixed
length: ambiguous values (``true`` for 1, ``"A"`` for ``"a"``) are refused, never coerced.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from export.state import LORA_A, LORA_B
from protocol.topics import ID_RE
from protocol.wire_errors import EnvelopeError, Reason

# 2: the MAC is a 32-byte trailer over the payload as sent (protocol/ENVELOPE.md). 1 had a "mac"
# header field over Python's re-serialization of the header, which other languages cannot reproduce.
SCHEMA_VERSION = 2
HMAC_SHA256 = "hmac-sha256"
SHA256 = "sha256"

_HEX16 = re.compile(r"[0-9a-f]{16}\Z")
_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_METHOD_RE = re.compile(r"[a-z0-9][a-z0-9_\-]{0,31}\Z")

Check = Callable[[Any], bool]


def _int(lo: int, hi: int) -> Check:
    return lambda x: isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _num(lo: float, hi: float) -> Check:
    # Ints are compared exactly (math.isfinite would overflow on a 400-digit JSON integer).
    return lambda x: (
        ((isinstance(x, float) and math.isfinite(x)) or (isinstance(x, int) and not isinstance(x, bool)))
        and lo <= x <= hi
    )


def _match(pattern: re.Pattern[str]) -> Check:
    return lambda x: isinstance(x, str) and pattern.match(x) is not None


def _optional(check: Check) -> Check:
    return lambda x: x is None or check(x)


def _unique_list(item: Check, max_len: int, min_len: int = 1) -> Check:
    return lambda x: (
        isinstance(x, list)
        and min_len <= len(x) <= max_len
        and all(item(i) for i in x)
        and len(set(x)) == len(x)
    )


_ROUND = _int(0, 2**31 - 1)
_COMMON: dict[str, Check] = {
    "v": lambda x: type(x) is int and x == SCHEMA_VERSION,
    "run": _match(ID_RE),
    "round": _ROUND,
    "method": _match(_METHOD_RE),
    "spec": _match(_HEX16),
    "rank": _optional(_int(1, 65536)),
    "msg_id": _match(_HEX32),
    "sent_at": _num(0, 1e11),
    "auth": lambda x: x in (HMAC_SHA256, SHA256),
}
UPDATE_FIELDS: dict[str, Check] = {
    **_COMMON,
    "kind": lambda x: x == "update",
    "client": _match(ID_RE),
    "num_examples": _int(1, 10**12),
    "local_steps": _int(0, 10**9),
    "compute_s": _num(0, 1e9),
    "heads": _optional(_unique_list(_int(0, 65535), 65536)),
}
# Optional update fields (absent from the envelopes of devices that do not measure them): the received
# global's loss and accuracy on the device's local validation part (federated evaluation; the three
# eval_* go together) and the mean loss of its local training steps.
UPDATE_OPTIONAL: dict[str, Check] = {
    "eval_loss": _num(0, 1e9),
    "eval_accuracy": _num(0, 1),
    "eval_examples": _int(1, 10**12),
    "train_loss": _num(0, 1e9),
}
GLOBAL_FIELDS: dict[str, Check] = {
    **_COMMON,
    "kind": lambda x: x == "global",
    "spec_json": lambda x: isinstance(x, dict),
    "deadline": _num(0, 1e11),
    # The clients still awaited: empty once every sampled update is in (the round is about to close).
    "clients": _optional(_unique_list(_match(ID_RE), 10**6, min_len=0)),
    "sample_fraction": _optional(_num(0, 1)),
    "final": lambda x: isinstance(x, bool),
    # Suffixes of the tensors each client keeps between rounds instead of downloading or uploading
    # them (FedSA-LoRA keeps B): at most one of the LoRA factors, so the other one always travels.
    "keep_local": _unique_list(lambda x: x in (LORA_A, LORA_B), 1, min_len=0),
}


# Optional announcement fields: the model and class count the coordinator trains, so a device with
# another bundle can say so in words instead of "unknown_key"; the LoRA ranks a device may train
# instead of the global rank (methods that aggregate heterogeneous ranks; absent: the global rank).
GLOBAL_OPTIONAL: dict[str, Check] = {
    "model": _match(ID_RE),
    "num_classes": _int(1, 10**6),
    "rank_choices": _unique_list(_int(1, 65536), 64),
}


def check_schema(
    d: object, fields: dict[str, Check], kind: str, optional: dict[str, Check] | None = None
) -> dict[str, Any]:
    """``d`` if it has every field of ``fields``, any of ``optional`` and nothing else, all valid."""
    if not isinstance(d, dict):
        raise EnvelopeError(Reason.SCHEMA, "header is not a JSON object")
    if d.get("kind") != kind:
        raise EnvelopeError(
            Reason.SCHEMA, f"expected a {kind!r} envelope, got kind {str(d.get('kind'))[:20]!r}"
        )
    if d.get("v") != SCHEMA_VERSION:
        older = type(d.get("v")) is int and d["v"] < SCHEMA_VERSION
        hint = ": the sender is older than this receiver (update it; protocol/ENVELOPE.md)"
        raise EnvelopeError(
            Reason.SCHEMA,
            f"schema version {str(d.get('v'))[:20]!r}, expected {SCHEMA_VERSION}" + (hint if older else ""),
        )
    extra = optional or {}
    missing = sorted(set(fields) - set(d))
    unknown = sorted(set(d) - set(fields) - set(extra))
    if missing or unknown:
        raise EnvelopeError(
            Reason.SCHEMA, f"header fields missing {missing}, unknown {[u[:30] for u in unknown[:5]]}"
        )
    checks = {**fields, **{name: check for name, check in extra.items() if name in d}}
    bad = [name for name, check in checks.items() if not check(d[name])]
    if bad:
        raise EnvelopeError(Reason.SCHEMA, f"header fields with wrong type or out of range: {bad}")
    return d
