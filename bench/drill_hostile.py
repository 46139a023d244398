"""Hostile-input drill: thousands of generated bad envelopes sent through a real broker to the coordinator.

Every kind of bad envelope (:data:`KINDS`) is generated from honest ones: cut, padded, re-framed,
re-signed with a wrong key or none, signed correctly but with a wrong dtype, shape, round, spec,
values (NaN, infinity, norms of 1e30), sent on another device's topic, from a device the round did
not sample, or an accepted update again (the same message: a replay the coordinator recognises; a new
message: a second update, refused). The coordinator runs with per-device HMAC keys and the norm limit
in ``reject`` mode. The drill checks that it survives, that each rejection is counted under the
reason its kind predicts, that the global adapter is untouched while the barrage lasts, and that the
round then closes on the honest updates alone, equal to a run without any of it.

``fleetlora bench hostile`` prints ``hostile: envelopes=... crashes=0 mismatched=0 ...``.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import struct
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from bench.drill_fleet import (
    LAYER,
    METHOD,
    RUN,
    client_names,
    dense_template,
    examples_of,
    make_service,
    reference_run,
    trained,
)
from broker.mosquitto import BrokerConfig, Mosquitto
from coordinator.service import RoundService
from coordinator.service_mqtt import serve
from export.spec import AdapterSpec
from export.state import LORA_A, State
from protocol.mqtt_link import LinkConfig, MqttLink
from protocol.topics import up_topic
from protocol.wire import MAGIC, decode_global, encode_update, pack, unpack
from protocol.wire_tensors import template_of

# kind of bad envelope -> the reason the coordinator must count it under
KINDS: dict[str, str] = {
    "truncated": "truncated",
    "oversized": "too_large",
    "not_an_envelope": "bad_magic",
    "garbled_header": "bad_header",
    "unknown_header_field": "schema",
    "wrong_dtype": "dtype",
    "wrong_shape": "shape",
    "unknown_tensor": "unknown_key",
    "nan": "non_finite",
    "inf": "non_finite",
    "wrong_round": "wrong_round",
    "forged_hmac": "bad_mac",
    "unsigned": "bad_mac",
    "topic_header_disagree": "topic_mismatch",
    "wrong_spec": "spec_mismatch",
    "enormous_norm": "outsized",
    "not_sampled": "not_sampled",
    "second_update": "replay",
    "replayed": "redelivered",  # the very same message again: acknowledged, never counted twice
}
MAX_BYTES = 64 * 1024


@dataclass
class HostileReport:
    envelopes: int = 0
    crashes: int = 0  # the service thread died
    counted: dict[str, int] = field(default_factory=dict)  # reason -> rejections counted
    expected: dict[str, int] = field(default_factory=dict)  # reason -> what the kinds predict
    global_untouched: bool = False
    honest_only: bool = False  # the accepted updates are exactly the honest ones, bit for bit
    final_equal: bool = False
    seconds: float = 0.0

    @property
    def mismatched(self) -> int:
        reasons = set(self.counted) | set(self.expected)
        return sum(abs(self.counted.get(r, 0) - self.expected.get(r, 0)) for r in reasons)

    def line(self) -> str:
        return (
            f"hostile: envelopes={self.envelopes} crashes={self.crashes} mismatched={self.mismatched} "
            f"global_untouched={self.global_untouched} honest_only={self.honest_only} "
            f"final_equal={self.final_equal} reasons={len(self.counted)} seconds={self.seconds:.1f}"
        )


def _resigned(envelope: bytes, key: bytes | None, blob: bytes | None = None, **changes: object) -> bytes:
    header, old_blob = unpack(envelope)
    return pack({**header, **changes}, old_blob if blob is None else blob, key)


class HostileGenerator:
    """Bad envelopes of every kind, built from the honest update each client would send."""

    def __init__(self, announced: State, spec: AdapterSpec, keys: Mapping[str, bytes], seed: int) -> None:
        self.announced, self.spec, self.keys = announced, spec, keys
        self.draw = random.Random(seed)

    def honest(
        self, client: str, state: State | None = None, key: bytes | None = None, **kw: object
    ) -> bytes:
        fields = {"num_examples": examples_of(client), "local_steps": 1, "compute_s": 0.0, **kw}
        return encode_update(
            trained(client, 1, self.announced) if state is None else state, run=RUN, round=1, client=client,
            method=METHOD, spec=self.spec, rank=self.spec.rank, key=self.keys[client] if key is None else key,
            **fields,  # type: ignore[arg-type]
        )  # fmt: skip

    def make(self, kind: str, client: str, other: str, outsider: str, accepted: bytes) -> tuple[str, bytes]:
        """``(topic, payload)`` of one bad envelope; ``accepted`` is ``client``'s accepted update."""
        d, key, topic = self.draw, self.keys[client], up_topic(RUN, client)
        state = trained(client, 1, self.announced)
        a_key = LAYER + LORA_A
        if kind == "truncated":
            (n,) = struct.unpack_from(">I", accepted, 4)
            return topic, accepted[: d.randrange(0, 8 + n)]
        if kind == "oversized":
            return topic, accepted + secrets.token_bytes(MAX_BYTES - len(accepted) + d.randrange(1, 4096))
        if kind == "not_an_envelope":
            return topic, b"X" + secrets.token_bytes(d.randrange(0, 2048))
        if kind == "garbled_header":
            # No "}" in the junk: a JSON object must close with one, so the header can never parse
            # (a lone "{}" once did, and was rightly counted as a schema error, not a bad header).
            junk = b"{" + secrets.token_bytes(d.randrange(1, 200)).replace(b"}", b"")
            return topic, MAGIC + struct.pack(">I", len(junk)) + junk
        if kind == "unknown_header_field":
            return topic, _resigned(accepted, key, extra=d.random())
        if kind in ("wrong_dtype", "wrong_shape", "unknown_tensor"):
            bad = dict(state)
            if kind == "wrong_dtype":
                bad[a_key] = bad[a_key].double()
            elif kind == "wrong_shape":
                rows, cols = bad[a_key].shape
                bad[a_key] = torch.zeros(rows, cols + d.randrange(1, 5))
            else:
                bad["evil.weight"] = torch.zeros(2, 2)
            return topic, _resigned(
                accepted, key, blob=safetensors.torch.save(bad), msg_id=secrets.token_hex(16)
            )
        if kind in ("nan", "inf", "enormous_norm"):
            bad = {k: v.clone() for k, v in state.items()}
            flat = bad[a_key].view(-1)
            if kind == "enormous_norm":
                flat.mul_(1e30)
            else:
                flat[d.randrange(flat.numel())] = float("nan") if kind == "nan" else float("inf")
            return topic, self.honest(client, bad)
        if kind == "wrong_round":
            return topic, _resigned(
                accepted, key, round=d.choice([0, 2, 3, 10**6]), msg_id=secrets.token_hex(16)
            )
        if kind == "forged_hmac":
            return topic, self.honest(client, key=secrets.token_bytes(32))
        if kind == "unsigned":
            return topic, _resigned(accepted, None)
        if kind == "topic_header_disagree":
            return up_topic(RUN, other), accepted
        if kind == "wrong_spec":
            return topic, _resigned(accepted, key, spec=secrets.token_hex(8), msg_id=secrets.token_hex(16))
        if kind == "not_sampled":
            return up_topic(RUN, outsider), self.honest(outsider)
        if kind == "second_update":
            return topic, self.honest(client)
        if kind == "replayed":
            return topic, accepted
        raise ValueError(f"unknown kind {kind!r}")


def run_hostile_drill(
    port: int, workdir: Path, *, envelopes: int = 10_000, clients: int = 20, payload_bytes: int = 4096,
    seed: int = 0, timeout_s: float = 600.0,
) -> HostileReport:  # fmt: skip
    """Send ``envelopes`` bad envelopes (every kind in turn) between two halves of an honest round."""
    names, outsiders = client_names(clients), client_names(4, prefix="x")
    keys = {c: secrets.token_bytes(32) for c in (*names, *outsiders)}
    template = dense_template(payload_bytes)
    service: RoundService = make_service(
        workdir / "state", names, template, device_keys=keys, clip_norm=10.0, clip_mode="reject",
        max_bytes=MAX_BYTES,
    )  # fmt: skip
    service.start()
    announced = decode_global(
        service.announcement, expected_run=RUN, spec=service.spec, template=template_of(template), key=None
    ).state
    gen = HostileGenerator(announced, service.spec, keys, seed)
    first, second = names[: clients // 2], names[clients // 2 :]
    honest = {c: gen.honest(c) for c in names}
    kinds = list(KINDS)
    barrage = [
        gen.make(kinds[i % len(kinds)], first[i % len(first)], names[(i + 1) % clients], outsiders[i % 4],
                 honest[first[i % len(first)]])
        for i in range(envelopes)
    ]  # fmt: skip
    report = HostileReport(envelopes=envelopes)
    report.expected = dict(Counter(KINDS[kinds[i % len(kinds)]] for i in range(envelopes)))
    redeliveries = report.expected.pop("redelivered")
    initial = {k: v.clone() for k, v in service.global_state.items()}
    stop, ready = threading.Event(), threading.Event()
    crashed: list[BaseException] = []

    def serve_guarded() -> None:
        try:
            serve(service, LinkConfig("coordinator", port=port), stop, ready=ready)
        except BaseException as e:
            crashed.append(e)

    thread = threading.Thread(target=serve_guarded, daemon=True)
    attacker = MqttLink(
        LinkConfig("attacker", port=port, max_queued_messages=envelopes + clients, max_queued_bytes=2**31)
    ).start()
    start = time.monotonic()
    try:
        thread.start()
        _wait(lambda: ready.is_set() or bool(crashed), timeout_s)
        _send(attacker, [(up_topic(RUN, c), honest[c]) for c in first])
        _wait(lambda: len(service.accepted) == len(first) or bool(crashed), timeout_s)
        _send(attacker, barrage)
        total = lambda: sum(service.tally.rejected.values()) + service.tally.redelivered  # noqa: E731
        _wait(lambda: total() >= envelopes or bool(crashed) or not thread.is_alive(), timeout_s)
        report.counted = {**service.tally.rejected, "redelivered": service.tally.redelivered}
        report.global_untouched = service.round == 1 and all(
            torch.equal(initial[k], service.global_state[k]) for k in initial
        )
        report.honest_only = sorted(service.accepted) == sorted(first) and all(
            torch.equal(service.accepted[c].update.state[k], v)
            for c in first
            for k, v in trained(c, 1, announced).items()
        )
        _send(attacker, [(up_topic(RUN, c), honest[c]) for c in second])
        thread.join(timeout_s)
    finally:
        stop.set()
        attacker.close()
    report.crashes = len(crashed) + (1 if thread.is_alive() else 0)
    report.seconds = time.monotonic() - start
    report.expected["redelivered"] = redeliveries
    expected, _ = reference_run(workdir / "reference", names, template, rounds=1)
    report.final_equal = service.finished and all(
        torch.equal(service.global_state[k].cpu(), expected[k]) for k in expected
    )
    return report


def _send(link: MqttLink, messages: list[tuple[str, bytes]]) -> None:
    deliveries = [link.publish(topic, payload) for topic, payload in messages]
    for delivery in deliveries:
        if not (delivery.wait(300) and delivery.ok):
            raise RuntimeError(f"the broker did not take a message: {delivery.error}")


def _wait(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the coordinator did not process the envelopes within {timeout_s} s")
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fleetlora bench hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--envelopes", type=int, default=10_000, help="bad envelopes (default 10000)")
    parser.add_argument("--clients", type=int, default=20, help="honest devices (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="fleetlora-hostile-"))
    os.chmod(workdir, 0o755)  # mosquitto started as root drops to its own user
    try:
        with Mosquitto(workdir / "broker", BrokerConfig()) as broker:
            report = run_hostile_drill(
                broker.port, workdir, envelopes=args.envelopes, clients=args.clients, seed=args.seed
            )
        for reason in sorted(set(report.counted) | set(report.expected)):
            print(
                f"{reason:>15}: counted {report.counted.get(reason, 0):6d}  "
                f"expected {report.expected.get(reason, 0):6d}"
            )
        print(report.line())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ok = not report.crashes and not report.mismatched and report.global_untouched and report.final_equal
    return 0 if ok else 1
