"""The broker side: rendered config, ACL, credentials, the process manager, the CLI, the amqtt fallback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import broker.mosquitto as broker_mod
from broker.child import free_port
from broker.credentials import add_device, load_device, make_test_ca, render_acl
from broker.embedded import EmbeddedBroker, amqtt_available
from broker.mosquitto import BrokerConfig, BrokerError, Mosquitto, local_broker, render_config
from fleetlora.cli import main as cli_main
from protocol.mqtt_link import LinkConfig, MqttLink

needs_credential_tools = pytest.mark.skipif(
    shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None,
    reason="needs the openssl CLI and mosquitto_passwd (apt-get install -y openssl mosquitto)",
)


def _pki(broker_dir: Path) -> Path:
    pki = broker_dir / "pki"
    make_test_ca(pki)
    return pki


def test_render_config_binds_loopback_with_auth_acl_and_limits(tmp_path: Path) -> None:
    cfg = BrokerConfig(
        port=0,
        tls_port=0,
        credentials=tmp_path / "pki",
        require_certificate=True,
        max_packet_size=1000,
        max_queued_messages=5000,
        max_queued_bytes=7000,
    )
    text = render_config(cfg, tmp_path, 1883, 8883)
    lines = set(text.splitlines())
    assert {
        "listener 1883 127.0.0.1",
        "listener 8883 127.0.0.1",
        "allow_anonymous false",
        f"password_file {tmp_path / 'pki' / 'passwd'}",
        f"acl_file {tmp_path / 'pki' / 'acl'}",
        f"certfile {tmp_path / 'pki' / 'server.crt'}",
        "require_certificate true",
        "use_identity_as_username true",
        "max_packet_size 1000",
        "max_queued_messages 5000",
        "max_queued_bytes 7000",
        "persistence false",
        f"log_dest file {tmp_path / 'mosquitto.log'}",
    } <= lines
    assert "0.0.0.0" not in text


def test_render_config_without_credentials_is_anonymous_plain_only(tmp_path: Path) -> None:
    text = render_config(BrokerConfig(), tmp_path, 1883, None)
    assert "allow_anonymous true" in text
    assert "password_file" not in text and "acl_file" not in text and "certfile" not in text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": None, "tls_port": None},
        {"tls_port": 0},  # TLS without credentials
        {"require_certificate": True, "credentials": Path("x")},  # mutual TLS without a TLS listener
        {"max_packet_size": 0},
    ],
)
def test_broker_config_rejects_bad_combinations(kwargs: dict[str, object]) -> None:
    with pytest.raises(BrokerError):
        BrokerConfig(**kwargs)  # type: ignore[arg-type]


def test_acl_confines_devices_to_their_own_topics() -> None:
    acl = render_acl({"dev1": "device", "coord": "coordinator"}).splitlines()
    assert "pattern write fleetlora/+/up/%u" in acl
    assert "pattern write fleetlora/+/status/%u" in acl
    assert "pattern read fleetlora/+/global" in acl
    coord = acl.index("user coord")
    assert acl[coord + 1 : coord + 4] == [
        "topic write fleetlora/+/global",
        "topic read fleetlora/+/up/+",
        "topic read fleetlora/+/status/+",
    ]
    assert "user dev1" not in acl  # devices get the patterns only


def test_missing_mosquitto_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_mod, "find_mosquitto", lambda: None)
    with pytest.raises(BrokerError, match="apt-get install -y mosquitto"):
        Mosquitto(tmp_path)


@needs_credential_tools
def test_credentials_are_private_and_verifiable(broker_dir: Path) -> None:
    pki = _pki(broker_dir)
    creds = add_device(pki, "dev-1")
    add_device(pki, "coord", role="coordinator")
    for secret in (pki / "ca.key", pki / "server.key", pki / "passwd", creds.key, creds.password_file):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert creds.password not in repr(creds)
    passwd = (pki / "passwd").read_text()
    assert passwd.startswith("dev-1:$7$") and creds.password not in passwd
    assert "user coord" in (pki / "acl").read_text()
    assert load_device(pki, "dev-1") == creds
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(pki / "ca.crt"), str(creds.cert), str(pki / "server.crt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    with pytest.raises(BrokerError, match="already exists"):
        add_device(pki, "dev-1")
    with pytest.raises(BrokerError, match="invalid client name"):
        add_device(pki, "a/b")
    with pytest.raises(BrokerError, match="already holds a CA"):
        make_test_ca(pki)


def test_add_device_needs_a_ca(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="init-ca"):
        add_device(tmp_path, "dev")


@pytest.mark.mqtt
def test_stop_and_restart_on_the_same_port(mosquitto: Mosquitto) -> None:
    port, first_pid = mosquitto.port, mosquitto.pid
    assert first_pid is not None
    mosquitto.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(first_pid, 0)
    with pytest.raises(OSError):
        socket.create_connection((mosquitto.host, port), timeout=1).close()
    mosquitto.start()
    assert mosquitto.port == port and mosquitto.pid != first_pid
    socket.create_connection((mosquitto.host, port), timeout=1).close()


@pytest.mark.mqtt
def test_start_failure_reports_the_log(start_mosquitto: Callable[..., Mosquitto], broker_dir: Path) -> None:
    missing = broker_dir / "no-such-pki"  # no password file: mosquitto exits at start
    with pytest.raises(BrokerError, match=r"exited with status(.|\n)*passwd"):
        start_mosquitto(BrokerConfig(credentials=missing))


@pytest.mark.mqtt
@pytest.mark.skipif(os.geteuid() != 0, reason="only root's mosquitto drops to another user")
def test_unreachable_directory_is_a_clear_error(
    start_mosquitto: Callable[..., Mosquitto], tmp_path: Path
) -> None:
    with pytest.raises(BrokerError, match="cannot enter"):
        Mosquitto(tmp_path / "broker").start()  # pytest's tmp_path is 0700 root


@needs_credential_tools
def test_cli_init_ca_then_one_enrolment_makes_the_device_and_the_coordinator(
    broker_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki, keys = broker_dir / "pki", broker_dir / "keys"
    assert cli_main(["broker", "init-ca", str(pki), "--hosts", "127.0.0.1,broker.lan"]) == 0
    out = capsys.readouterr().out
    assert "for 127.0.0.1, broker.lan" in out and f"next: fleetlora devices enroll NAME --pki {pki}" in out
    assert cli_main(["devices", "enroll", "jetson-01", "--pki", str(pki), "--keys", str(keys)]) == 0
    out = capsys.readouterr().out
    assert load_device(pki, "jetson-01").password not in out
    assert "enrolled the coordinator too" in out and "coordinator.announce.key" in out
    assert "user coordinator" in (pki / "acl").read_text()
    announce = (pki / "clients" / "coordinator.announce.key").read_text()
    assert (
        announce.strip() not in out
        and oct((pki / "clients" / "coordinator.announce.key").stat().st_mode)[-3:] == "600"
    )
    assert cli_main(["devices", "enroll", "jetson-02", "--pki", str(pki), "--keys", str(keys)]) == 0
    out = capsys.readouterr().out
    assert "coordinator" not in out.replace("the coordinator's", "")  # made once, with the first device
    assert (pki / "clients" / "coordinator.announce.key").read_text() == announce
    assert cli_main(["devices", "enroll", "jetson-01", "--pki", str(pki)]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one command for one job: devices enroll
        cli_main(["broker", "add-device", str(pki), "x"])
    assert cli_main(["broker", "run", "--tls"]) == 2  # --tls without --dir


@needs_credential_tools
def test_enrolment_says_why_it_cannot_make_the_coordinator(
    broker_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = broker_dir / "pki"
    make_test_ca(pki)
    assert cli_main(["devices", "enroll", "coordinator", "--pki", str(pki)]) == 2
    assert "'coordinator' is the coordinator's name" in capsys.readouterr().err
    add_device(pki, "coordinator")  # a folder where a device took the name (made before this check)
    assert cli_main(["devices", "enroll", "dev1", "--pki", str(pki)]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "'coordinator' is enrolled as a device, so the coordinator was not" in err


@pytest.mark.mqtt
@pytest.mark.skipif(not broker_mod.mosquitto_available(), reason="mosquitto is not installed")
def test_cli_run_serves_until_sigterm(broker_dir: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetlora",
            "broker",
            "run",
            "--port",
            str(port),
            "--workdir",
            str(broker_dir / "run"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None
        assert f"127.0.0.1:{port}" in proc.stdout.readline()
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(not amqtt_available(), reason="amqtt is not installed (pip install amqtt==0.12.1)")
def test_embedded_broker_round_trip(broker_dir: Path) -> None:
    received: list[tuple[str, bytes]] = []
    arrived = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        received.append((topic, payload))
        arrived.set()

    with local_broker(broker_dir / "amqtt", embedded=True) as broker:
        assert isinstance(broker, EmbeddedBroker) and broker.url.startswith("mqtt://127.0.0.1:")
        sub = MqttLink(LinkConfig("sub", port=broker.port, protocol="3.1.1")).start()
        pub = MqttLink(LinkConfig("pub", port=broker.port, protocol="3.1.1")).start()
        try:
            sub.subscribe("fleetlora/r/up/+", on_message)
            assert sub.wait_subscribed(10) and pub.wait_connected(10)
            payload = os.urandom(200_000)
            delivery = pub.publish("fleetlora/r/up/pub", payload)
            assert delivery.wait(10) and delivery.ok
            assert arrived.wait(10)
            assert received == [("fleetlora/r/up/pub", payload)]
        finally:
            sub.close()
            pub.close()
