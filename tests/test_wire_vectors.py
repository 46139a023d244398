"""The envelope's test vectors (protocol/envelope_vectors) against the Python implementation.

The same files are checked by the native client (tests/test_native.py); here the committed files must
be exactly what ``protocol.wire_vectors`` writes, and each case must reach its verdict.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from export.spec import AdapterSpec
from protocol.wire import EnvelopeError, decode_global, decode_update, is_sampled
from protocol.wire_vectors import FOLDER, INDEX, build, index_text

INDEX_DATA: dict[str, Any] = json.loads((FOLDER / INDEX).read_text())
CASES = INDEX_DATA["cases"]


def test_the_committed_vectors_are_what_the_generator_writes() -> None:
    files, index = build()
    committed = {p.name for p in FOLDER.iterdir() if p.name != INDEX}
    assert committed == set(files), "regenerate: python -m protocol.wire_vectors"
    for name, payload in files.items():
        assert (FOLDER / name).read_bytes() == payload, f"{name} changed: the envelope format moved"
    assert (FOLDER / INDEX).read_text() == index_text(index)


def _decode(case: dict[str, Any]) -> Any:
    payload = (FOLDER / case["file"]).read_bytes()
    key = bytes.fromhex(INDEX_DATA["keys"][case["key"]]) if case["key"] else None
    spec = AdapterSpec.from_dict(INDEX_DATA["spec_json"])
    assert spec.digest() == INDEX_DATA["spec"]
    template = {k: tuple(v) for k, v in INDEX_DATA["template"].items()}
    receiver = INDEX_DATA["receiver"]
    if case["kind"] == "update":
        return decode_update(
            payload, expected_run=receiver["run"], expected_client=receiver["client"],
            rounds=set(receiver["rounds"]), spec=spec, template=template, key=key,
        )  # fmt: skip
    return decode_global(payload, expected_run=receiver["run"], spec=spec, template=template, key=key)


@pytest.mark.parametrize("case", CASES, ids=[f"{c['file']}-{c['key']}" for c in CASES])
def test_each_vector_reaches_its_verdict(case: dict[str, Any]) -> None:
    if case["expect"] != "ok":
        with pytest.raises(EnvelopeError) as info:
            _decode(case)
        assert info.value.reason.value == case["expect"], info.value
        return
    got = _decode(case)
    h = got.header
    derived = {"kind": case["kind"], "auth": "hmac-sha256" if h.signed else "sha256"}
    for name, want in case["header"].items():
        value = derived[name] if name in derived else getattr(h, name)
        assert (list(value) if isinstance(value, tuple) else value) == want, name
    assert set(got.state) == set(case["tensors"])
    for name, want in case["tensors"].items():
        t = got.state[name]
        assert list(t.shape) == want["shape"]
        assert torch.equal(t.flatten(), torch.tensor(want["values"], dtype=torch.float32)), name
    for client, sampled in case.get("sampled", {}).items():
        assert is_sampled(h, client) == sampled, client
    if "rank_choices" in case:
        assert list(h.rank_choices or ()) == case["rank_choices"]


def test_every_verdict_the_spec_names_is_covered() -> None:
    assert {c["expect"] for c in CASES} >= {
        "ok", "bad_mac", "schema", "truncated", "non_finite", "spec_mismatch"
    }  # fmt: skip
