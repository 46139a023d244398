"""The reliability scenarios of RELIABILITY.md against a real mosquitto: coordinator crashes, broker
faults, dropouts and stragglers, hostile input, load, access control. The full-size runs are the
``fleetlora bench crash|load|hostile`` commands; these are their CI-sized versions."""

from __future__ import annotations

import base64
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fault_proxy import FaultProxy

from bench.drill_crash import run_crash_drill
from bench.drill_fleet import RUN, DrillFleet, client_names, dense_template, make_service, reference_run
from bench.drill_hostile import KINDS, run_hostile_drill
from bench.drill_load import run_load_drill
from broker.credentials import load_device, make_test_ca
from broker.mosquitto import BrokerConfig, Mosquitto
from coordinator.metrics import read_metrics
from coordinator.service import RoundService
from coordinator.service_mqtt import serve
from fleetlora.cli import main as cli_main
from protocol.keys import read_keyring
from protocol.mqtt_link import LinkConfig, MqttLink, PublishRefused
from protocol.topics import global_topic, up_topic

pytestmark = pytest.mark.mqtt


@pytest.mark.drill
def test_coordinator_sigkilled_20_times_ends_with_the_uninterrupted_global(
    mosquitto: Mosquitto, broker_dir: Path
) -> None:
    report = run_crash_drill(
        mosquitto.port, broker_dir, kills=20, clients=6, rounds=100, payload_bytes=4096, max_delay_s=0.5
    )
    assert report.kills == 20 and report.lives == 21
    assert report.rounds == 100 and all(len(clients) == 6 for clients in report.aggregated)
    assert report.equal, "the final global differs from the uninterrupted run with the same updates"
    assert any(report.resumed_updates), "no kill landed mid-round with updates on disk"
    assert set(report.rejected) <= {"wrong_round"}  # only stale resends of closed rounds


# ---- broker faults, dropouts and stragglers ---------------------------------------------------------


def serve_drill(service: RoundService, port: int) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    link = LinkConfig("coordinator", port=port, backoff_max_s=0.5)
    thread = threading.Thread(target=serve, args=(service, link, stop), daemon=True)
    thread.start()
    return thread, stop


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_broker_sigkilled_mid_round_every_client_resumes_and_no_round_is_corrupted(
    start_mosquitto: Callable[..., Mosquitto], broker_dir: Path
) -> None:
    broker = start_mosquitto()  # no persistence: a SIGKILL forgets sessions, queues and the retained global
    names, template = client_names(6), dense_template(8192)
    service = make_service(broker_dir / "state", names, template, rounds=3)
    thread, stop = serve_drill(service, broker.port)
    fleet = DrillFleet(broker.port, names[:3], template).start()
    try:
        wait_for(lambda: len(service.accepted) >= 2, "updates of round 1")
        broker.kill()
        broker.start()
        for late in names[3:]:
            fleet.join(late)
        thread.join(90)
        assert service.finished
        wait_for(fleet.finished, "every device to see the final announcement")
    finally:
        stop.set()
        fleet.close()
    expected, expected_clients = reference_run(broker_dir / "reference", names, template, rounds=3)
    assert [r["clients"] for r in service.history] == expected_clients
    assert all(torch.equal(service.global_state[k].cpu(), expected[k]) for k in expected)
    assert set(service.metrics.rejections) <= {"wrong_round"}


def test_updates_a_restarted_broker_acknowledged_but_never_delivered_are_sent_again(
    start_mosquitto: Callable[..., Mosquitto], broker_dir: Path
) -> None:
    # The coordinator takes one delivery at a time (receive maximum 1) and holds it, so the broker
    # acknowledges every device's update and keeps all but one queued, in memory only; then it dies.
    broker = start_mosquitto()
    names, template = client_names(4), dense_template(8192)
    service = make_service(broker_dir / "state", names, template, rounds=1)
    gate, admit = threading.Event(), service.admit
    service.admit = lambda messages: (gate.wait(60), admit(messages))[1]  # type: ignore[method-assign]
    stop = threading.Event()
    link = LinkConfig("coordinator", port=broker.port, backoff_max_s=0.5, receive_maximum=1)
    thread = threading.Thread(target=serve, args=(service, link, stop), daemon=True)
    thread.start()
    fleet = DrillFleet(broker.port, names, template).start()
    try:
        sent = lambda: all(d.progress.last_round == 1 and d.settle() for d in fleet.devices.values())  # noqa: E731
        wait_for(sent, "every update acknowledged by the broker")
        broker.kill()
        broker.start()
        gate.set()
        thread.join(60)
        assert service.finished, "the round waited for updates the restarted broker had forgotten"
    finally:
        gate.set()
        stop.set()
        fleet.close()
    assert service.history[0]["clients"] == list(names)
    expected, _ = reference_run(broker_dir / "reference", names, template, rounds=1)
    assert all(torch.equal(service.global_state[k].cpu(), expected[k]) for k in expected)


def test_a_connection_cut_during_upload_is_resumed_and_counted_once(
    mosquitto: Mosquitto, broker_dir: Path
) -> None:
    names, template = client_names(3), dense_template(256 * 1024)
    proxy = FaultProxy(mosquitto.port)
    service = make_service(broker_dir / "state", names, template, rounds=1)
    thread, stop = serve_drill(service, mosquitto.port)
    fleet = DrillFleet(mosquitto.port, names[:2], template)
    fleet.port = proxy.port  # the third device reaches the broker through the flaky line
    proxy.cut_after(64 * 1024)  # its connect and subscribe are ~100 bytes: the cut lands in the update
    flaky = fleet.join(names[2])
    fleet.start()
    try:
        thread.join(90)
        assert service.finished
        wait_for(fleet.finished, "every device to see the final announcement")
    finally:
        stop.set()
        fleet.close()
        proxy.close()
    assert proxy.cuts == 1 and flaky.link.connects >= 2
    assert service.history[0]["clients"] == list(names) and not service.metrics.rejections
    expected, _ = reference_run(broker_dir / "reference", names, template, rounds=1)
    assert all(torch.equal(service.global_state[k].cpu(), expected[k]) for k in expected)


def test_dropouts_close_at_the_deadline_with_the_quorum_and_too_few_extend(
    mosquitto: Mosquitto, broker_dir: Path
) -> None:
    names, template = client_names(10), dense_template(4096)
    vanished = names[:3]  # 30% of round 1's clients vanish when it is announced
    service = make_service(broker_dir / "state", names, template, rounds=2, min_clients=5, deadline_s=3.0)
    thread, stop = serve_drill(service, mosquitto.port)
    fleet = DrillFleet(mosquitto.port, names, template, vanish={1: vanished}).start()
    try:
        wait_for(lambda: service.state is not None and service.round == 2, "round 1 to close at its deadline")
        service.config = dataclasses.replace(service.config, min_clients=8)  # round 2 needs 8 of the 7 left
        metrics = broker_dir / "state" / "metrics.jsonl"
        extended = lambda: any(e["event"] == "deadline_extended" for e in read_metrics(metrics))  # noqa: E731
        wait_for(extended, "round 2's deadline to be extended")
        fleet.join(vanished[0])  # a straggler comes back, with no memory of the run
        thread.join(120)
        assert service.finished
    finally:
        stop.set()
        fleet.close()
    first, second = service.history
    assert first["clients"] == sorted(set(names) - set(vanished)) and first["deadline_extensions"] == 0
    assert second["participants"] == 8 and second["deadline_extensions"] >= 1
    assert vanished[0] in second["clients"]
    assert all(r["participants"] >= 5 for r in service.history)


# ---- hostile input -----------------------------------------------------------------------------------


@pytest.mark.drill
def test_10000_hostile_envelopes_crash_nothing_touch_nothing_and_are_counted_by_reason(
    mosquitto: Mosquitto, broker_dir: Path
) -> None:
    report = run_hostile_drill(mosquitto.port, broker_dir, envelopes=10_000, clients=20)
    assert report.crashes == 0
    assert report.counted == report.expected and report.mismatched == 0
    assert set(report.expected) == set(KINDS.values())  # every kind was sent and counted
    assert report.global_untouched and report.honest_only and report.final_equal
    logged = Counter(
        r["reason"] for r in read_metrics(broker_dir / "state" / "metrics.jsonl") if r["event"] == "rejected"
    )
    assert logged == {k: v for k, v in report.expected.items() if k != "redelivered"}


# ---- load ------------------------------------------------------------------------------------------


@pytest.mark.drill
def test_1000_devices_publishing_in_the_same_second_lose_nothing(
    mosquitto: Mosquitto, broker_dir: Path
) -> None:
    report = run_load_drill(mosquitto.port, broker_dir, clients=1000, payload_bytes=10_000, broker_queue=0)
    assert report.lost == 0
    # Memory: the round's decoded updates plus aggregation; nothing that grows beyond the round.
    assert report.rss_peak_mb - report.rss_before_mb < 12 * report.clients * report.payload_bytes / 2**20 + 64


# ---- access -----------------------------------------------------------------------------------------


def test_enrolled_devices_over_tls_cannot_impersonate_or_publish_the_global_and_no_secret_is_logged(
    start_mosquitto: Callable[..., Mosquitto],
    broker_dir: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    pki, keys = broker_dir / "pki", broker_dir / "keys"
    make_test_ca(pki)
    names = client_names(3)
    for name in names:
        assert cli_main(["devices", "enroll", name, "--pki", str(pki), "--keys", str(keys)]) == 0
    assert cli_main(["devices", "enroll", names[0], "--pki", str(pki), "--keys", str(keys)]) == 2  # once only
    enroll_output = capsys.readouterr()
    acl = (pki / "acl").read_text()
    assert "pattern write fleetlora/+/up/%u" in acl and "user coordinator" in acl
    broker = start_mosquitto(BrokerConfig(port=None, tls_port=0, credentials=pki))

    def tls(name: str) -> dict[str, object]:
        password = load_device(pki, name).password
        return {
            "username": name,
            "password": password,
            "tls": True,
            "ca_cert": pki / "ca.crt",
        }

    template = dense_template(4096)
    service = make_service(broker_dir / "state", names, template, rounds=2, device_keys=read_keyring(keys))
    stop = threading.Event()
    coordinator = LinkConfig("coordinator", port=broker.port, backoff_max_s=0.5, **tls("coordinator"))  # type: ignore[arg-type]
    thread = threading.Thread(target=serve, args=(service, coordinator, stop), daemon=True)
    thread.start()
    fleet = DrillFleet(broker.port, names, template, link_options=tls, keys=read_keyring(keys)).start()
    impostor = MqttLink(LinkConfig(names[0] + "-2", port=broker.port, **tls(names[0]))).start()  # type: ignore[arg-type]
    try:
        as_other = impostor.publish(up_topic(RUN, names[1]), b"forged")
        as_global = impostor.publish(global_topic(RUN), b"forged", retain=True)
        for refused in (as_other, as_global):
            assert refused.wait(30) and isinstance(refused.error, PublishRefused)
            assert "Not authorized" in str(refused.error)
        thread.join(120)
        assert service.finished
        wait_for(fleet.finished, "every device to take the final announcement")
    finally:
        stop.set()
        fleet.close()
        impostor.close()
    assert [r["clients"] for r in service.history] == [list(names)] * 2 and not service.metrics.rejections
    secrets = [load_device(pki, n).password for n in (*names, "coordinator")]
    secrets += [
        f.read_text().strip() for f in [*keys.glob("*.key"), pki / "clients" / "coordinator.announce.key"]
    ]
    secrets += [base64.b64encode(bytes.fromhex(f.read_text().strip())).decode() for f in keys.glob("*.key")]
    logs = {
        "logging": caplog.text,
        "cli": enroll_output.out + enroll_output.err,
        "metrics": (broker_dir / "state" / "metrics.jsonl").read_text(),
        "broker": broker.log_tail(10**7),
    }
    assert all(len(s) >= 24 for s in secrets) and caplog.records and names[0] in logs["broker"]
    leaks = [(where, s[:6]) for where, text in logs.items() for s in secrets if s in text]
    assert not leaks, f"secrets in the logs: {leaks}"
