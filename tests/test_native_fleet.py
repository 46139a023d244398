"""Native clients in a real fleet: a real mosquitto (TLS, passwords, ACL), a real coordinator, signed
envelopes both ways; a native client killed with SIGKILL and a broker restarted; hostile announcements.

Every native client here is a folder made by ``fleetlora flash --runtime native`` and started by its
``run-client.sh`` with no Python on its PATH.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from deploy_helpers import device, make_service, serve_in_thread, spec_for
from native_helpers import RUN, binary, flash_native, needs_native, pythonless_path, tiny_bundle

from broker.credentials import load_device, make_test_ca
from broker.mosquitto import BrokerConfig, Mosquitto
from coordinator.metrics import read_metrics
from export.bundle import Bundle
from fleetlora.cli import main as cli_main
from protocol.keys import read_key, write_key
from protocol.mqtt_link import LinkConfig, MqttLink
from protocol.topics import global_topic, up_subscription
from protocol.wire import encode_global

pytestmark = [needs_native, pytest.mark.executorch, pytest.mark.mqtt]
pytest.importorskip("executorch.extension.training", reason="executorch is not installed")

ROUNDS = 3
TIMEOUT_S = 180.0


def start_client(folder: Path, tmp: Path, *extra: str) -> subprocess.Popen[str]:
    """``run-client.sh`` of a flashed folder, with no Python on its PATH; its log goes to client.log."""
    env = {"PATH": pythonless_path(tmp), "HOME": str(tmp)}
    log = open(folder / "client.log", "a")  # noqa: SIM115 (the process owns it until it exits)
    return subprocess.Popen(
        [str(folder / "run-client.sh"), "--connect-jitter", "0", *extra],
        env=env, stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str], timeout_s: float = TIMEOUT_S) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    return out


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def rounds_of(state: Path) -> list[dict]:
    path = state / "metrics.jsonl"
    return [r for r in read_metrics(path) if r["event"] == "round"] if path.exists() else []


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    binary()  # built (or reused) before any flash
    return tiny_bundle()


def test_two_native_clients_and_a_python_client_over_tls_with_signed_envelopes(
    bundle: Bundle, start_mosquitto: Callable[..., Mosquitto], broker_dir: Path, tmp_path: Path
) -> None:
    pki, keys = broker_dir / "pki", broker_dir / "keys"
    make_test_ca(pki)
    names = ("dev0", "dev1", "dev2")
    for name in names:
        assert cli_main(["devices", "enroll", name, "--pki", str(pki), "--keys", str(keys)]) == 0
    # (the first enrolment made the coordinator's credentials too)
    coordinator_key = tmp_path / "coordinator.key"
    write_key(coordinator_key, secrets.token_bytes(32))
    broker = start_mosquitto(BrokerConfig(port=None, tls_port=0, credentials=pki))
    url = f"mqtts://127.0.0.1:{broker.port}"
    folders = []
    for i, name in enumerate(names[:2]):
        creds = ["--ca-file", str(pki / "ca.crt"), "--coordinator-key-file", str(coordinator_key)]
        creds += ["--password-file", str(pki / "clients" / f"{name}.password")]
        creds += ["--hmac-key-file", str(keys / f"{name}.key")]
        folders.append(flash_native(bundle, tmp_path / name, name, url, f"{i}/3", *creds))
    device_keys = {n: read_key(keys / f"{n}.key") for n in names}
    service = make_service(
        "fedit", tmp_path / "state", names, rounds=ROUNDS, deadline_s=120.0, device_keys=device_keys,
        coordinator_key=read_key(coordinator_key),
    )  # fmt: skip
    tls = {"tls": True, "ca_cert": pki / "ca.crt"}
    thread, stop = serve_in_thread(
        service, broker.port, username="coordinator", password=load_device(pki, "coordinator").password, **tls
    )
    python_client = device(
        "dev2", 2, "fedit", broker.port, key=device_keys["dev2"], coordinator_key=read_key(coordinator_key),
        link_overrides={"username": "dev2", "password": load_device(pki, "dev2").password, **tls},
    ).start()  # fmt: skip
    procs = [start_client(folder, tmp_path) for folder in folders]
    try:
        outs = [finish(p) for p in procs]
        python_client.join()
        thread.join(60)
    finally:
        stop.set()
        python_client.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
    for name, out in zip(names, outs, strict=False):
        assert f"{name} (native): last round {ROUNDS + 1}, outcome final" in out
    assert service.finished
    rounds = rounds_of(tmp_path / "state")
    assert [(r["round"], sorted(r["clients"])) for r in rounds] == [(k, list(names)) for k in (1, 2, 3)]
    assert all(r["rejected"] == {} for r in rounds) and not service.metrics.rejections
    final, first = service.global_state, make_service("fedit", tmp_path / "fresh", names)
    first.start()
    assert any(not torch.equal(final[k].cpu(), first.global_state[k].cpu()) for k in final)
    for folder in folders:  # the native client's log: a line per round, its training, no error
        log = (folder / "client.log").read_text()
        assert log.count("steps of") == ROUNDS and " ERROR " not in log, log[-2000:]


def test_a_native_client_survives_its_own_sigkill_and_broker_restarts(
    bundle: Bundle, start_mosquitto: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    """Killed with SIGKILL after its first update, restarted over a restarted broker, and the broker
    restarted again under it: every round is aggregated once with its update, none trained twice.

    Like the Python client, it resends its update when the coordinator re-announces a round it is
    still awaited in (after a reconnect); one that arrives after the round closed is refused as
    ``wrong_round`` (a late copy of an update the round already has), never anything else."""
    rounds = 4
    broker = start_mosquitto(BrokerConfig(persistence=True))
    folder = flash_native(bundle, tmp_path / "dev0", "dev0", f"mqtt://127.0.0.1:{broker.port}", "0/3")
    service = make_service("fedit", tmp_path / "state", ("dev0",), rounds=rounds, deadline_s=120.0)
    thread, stop = serve_in_thread(service, broker.port)
    slow = ("--local-steps", "300")  # rounds of about a second, so that the faults land inside them
    log = folder / "client.log"
    proc = start_client(folder, tmp_path, *slow)
    try:
        wait_for(lambda: "round 1: 300 steps" in log.read_text(), "round 1 to be trained")
        proc.send_signal(signal.SIGKILL)  # no clean exit: whatever it had on disk is what it has
        proc.wait(10)
        broker.restart()
        proc = start_client(folder, tmp_path, *slow)
        wait_for(lambda: len(rounds_of(tmp_path / "state")) >= 2, "round 2 to close")
        broker.restart()  # under the running client
        out = finish(proc)
        thread.join(60)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    assert f"dev0 (native): last round {rounds + 1}, outcome final" in out
    history = rounds_of(tmp_path / "state")
    assert [(r["round"], r["clients"]) for r in history] == [(k, ["dev0"]) for k in range(1, rounds + 1)]
    assert all(set(r["rejected"]) <= {"wrong_round"} for r in history)
    trained = [line for line in log.read_text().splitlines() if "300 steps" in line]
    # At most the round it was killed in is trained again (its update never left the device).
    assert rounds <= len(trained) <= rounds + 1, trained


def test_hostile_announcements_are_refused_in_words_and_nothing_is_trained_or_sent(
    bundle: Bundle, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    key = secrets.token_bytes(32)
    write_key(tmp_path / "coordinator.key", key)
    url = f"mqtt://127.0.0.1:{mosquitto.port}"
    key_file = ["--coordinator-key-file", str(tmp_path / "coordinator.key")]
    folder = flash_native(bundle, tmp_path / "dev0", "dev0", url, "0/3", *key_file)
    spec = spec_for("fedit")
    state = {k: torch.zeros(v) for k, v in bundle.info.trainable.items()}

    def announce(payload: bytes) -> None:
        link.publish(global_topic(RUN), payload, qos=1, retain=True).wait(10)

    def glob(**kw: object) -> bytes:
        fields = {"run": RUN, "round": 1, "method": "fedit", "spec": spec, "deadline": time.time() + 60,
                  "clients": ["dev0"], "rank": spec.rank, "key": key, **kw}  # fmt: skip
        return encode_global(state, **fields)  # type: ignore[arg-type]

    updates: list[bytes] = []
    link = MqttLink(LinkConfig("test", port=mosquitto.port)).start()
    link.subscribe(up_subscription(RUN), lambda topic, payload: updates.append(bytes(payload)))
    assert link.wait_subscribed(30)
    proc = start_client(folder, tmp_path)
    log = folder / "client.log"
    try:
        cases = [
            (glob(spec=spec.with_(seed=1)), "announcement refused: spec_mismatch"),
            (glob(key=secrets.token_bytes(32)), "announcement refused: bad_mac"),
            (glob()[:40], "announcement refused: truncated"),
            (glob()[:-1], "announcement refused: bad_mac"),
            (b"FLW\x01" + b"\0\0\0\2{}" + b"\0" * 40, "announcement refused: schema"),
        ]
        for i, (payload, line) in enumerate(cases):
            announce(payload)
            wait_for(lambda i=i: log.read_text().count("announcement refused") > i, line, 60)
            refused = [x for x in log.read_text().splitlines() if "announcement refused" in x]
            assert line in refused[-1], refused[-1]
        assert not updates and "steps of" not in log.read_text()
        progress = folder / "state" / "progress.json"
        assert not progress.exists() or json.loads(progress.read_text())["last_round"] == 0
        announce(glob(round=2, final=True))
        out = finish(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
        link.close()
    assert "dev0 (native): last round 2, outcome final" in out and not updates
    assert os.path.getsize(folder / "client.log") > 0


@pytest.mark.parametrize("method", ["fedsa_lora", "flora"])
def test_a_native_client_keeps_its_b_or_follows_the_base_delta(
    method: str, start_mosquitto: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    """FedSA-LoRA: the global carries A only and the device keeps its trained B between rounds (in
    <state file>.kept.safetensors). FLoRA: the global carries the coordinator's change of the base,
    which the program takes as inputs (a bundle exported with base-delta inputs)."""
    import safetensors

    binary()
    bundle = tiny_bundle(base_delta=method == "flora")
    broker = start_mosquitto()
    folder = flash_native(bundle, tmp_path / "dev0", "dev0", f"mqtt://127.0.0.1:{broker.port}", "0/3")
    service = make_service(method, tmp_path / "state", ("dev0",), rounds=2, deadline_s=120.0)
    thread, stop = serve_in_thread(service, broker.port)
    proc = start_client(folder, tmp_path)
    try:
        out = finish(proc)
        thread.join(60)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    assert "dev0 (native): last round 3, outcome final" in out
    history = rounds_of(tmp_path / "state")
    assert [(r["round"], r["clients"], r["rejected"]) for r in history] == [
        (1, ["dev0"], {}),
        (2, ["dev0"], {}),
    ]
    kept = folder / "state" / "progress.json.kept.safetensors"
    if method == "fedsa_lora":
        with safetensors.safe_open(kept, "pt") as f:
            assert f.metadata() == {"run": RUN}
            names = set(f.keys())
        assert names and names == {k for k in bundle.info.trainable if k.endswith(".lora_B.default.weight")}
    else:
        log = (folder / "client.log").read_text()
        assert not kept.exists() and " ERROR " not in log
        assert "round 2: the coordinator's base delta on" in log, log[-2000:]


def test_a_native_client_connects_with_its_client_certificate(
    bundle: Bundle, start_mosquitto: Callable[..., Mosquitto], broker_dir: Path, tmp_path: Path
) -> None:
    """Mutual TLS: the broker takes the certificate's name as the username (its ACL applies to it)."""
    from broker.credentials import add_device

    pki = broker_dir / "pki"
    make_test_ca(pki)
    dev, coordinator = add_device(pki, "dev0"), add_device(pki, "coordinator", role="coordinator")
    broker = start_mosquitto(BrokerConfig(port=None, tls_port=0, credentials=pki, require_certificate=True))
    creds = ["--ca-file", str(dev.ca_cert), "--cert-file", str(dev.cert), "--key-file", str(dev.key)]
    folder = flash_native(
        bundle, tmp_path / "dev0", "dev0", f"mqtts://127.0.0.1:{broker.port}", "0/3", *creds
    )
    service = make_service("fedit", tmp_path / "state", ("dev0",), rounds=2, deadline_s=120.0)
    tls = {"tls": True, "ca_cert": coordinator.ca_cert}
    thread, stop = serve_in_thread(
        service, broker.port, client_cert=coordinator.cert, client_key=coordinator.key, **tls
    )
    proc = start_client(folder, tmp_path)
    try:
        out = finish(proc)
        thread.join(60)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
    assert "dev0 (native): last round 3, outcome final" in out
    assert [(r["round"], r["clients"]) for r in rounds_of(tmp_path / "state")] == [
        (1, ["dev0"]),
        (2, ["dev0"]),
    ]
    assert "connected to 127.0.0.1" in (folder / "client.log").read_text()
