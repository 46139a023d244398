"""Why a link cannot connect, in words: refused, TLS, credentials; and a clear exit when they are refused."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.child import free_port
from broker.credentials import add_device, make_test_ca
from broker.mosquitto import BrokerConfig, Mosquitto
from fleetlora.cli import main as cli_main
from protocol.mqtt_link import LinkConfig, MqttLink

pytestmark = pytest.mark.mqtt
WAIT = 30.0
ROOT = Path(__file__).resolve().parent.parent


def warnings_until(caplog: pytest.LogCaptureFixture, text: str, timeout_s: float = WAIT) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [
            r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()
        ]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no warning with {text!r}; got {[r.getMessage() for r in caplog.records]}")


def link(**kwargs: object) -> MqttLink:
    return MqttLink(LinkConfig("dev0", backoff_min_s=0.05, backoff_max_s=0.2, **kwargs)).start()  # type: ignore[arg-type]


def test_nobody_listening_is_a_warning_naming_the_broker_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()
    refused = link(port=port)
    try:
        message = warnings_until(caplog, "connection refused")
        assert f"cannot reach the broker at 127.0.0.1:{port}: connection refused; is it running" in message
        time.sleep(1.0)  # several more attempts: said once, then at DEBUG until WARN_EVERY_S passes
        said = [
            r
            for r in caplog.records
            if r.levelno >= logging.WARNING and "connection refused" in r.getMessage()
        ]
        tried = [r for r in caplog.records if "connection refused" in r.getMessage()]
        assert len(said) == 1 and len(tried) > 2
    finally:
        refused.close()


@pytest.fixture
def secure(start_mosquitto: Callable[..., Mosquitto], broker_dir: Path) -> tuple[Mosquitto, Path]:
    pki = broker_dir / "pki"
    make_test_ca(pki)
    add_device(pki, "dev0")
    return start_mosquitto(BrokerConfig(port=0, tls_port=0, credentials=pki)), pki


def test_tls_failures_name_the_ca_and_the_port(
    secure: tuple[Mosquitto, Path], broker_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker, pki = secure
    other = make_test_ca(broker_dir / "other")  # a CA that did not sign the broker's certificate
    password = (pki / "clients" / "dev0.password").read_text().strip()
    common = {"username": "dev0", "password": password}
    wrong_ca = link(port=broker.tls_port, tls=True, ca_cert=other.ca_cert, **common)
    tls_to_plain = link(port=broker.plain_port, tls=True, ca_cert=pki / "ca.crt", **common)
    plain_to_tls = link(port=broker.tls_port, **common)
    try:
        message = warnings_until(caplog, f"TLS with 127.0.0.1:{broker.tls_port} failed: ")
        assert f"is the broker's certificate signed by {other.ca_cert}, for host 127.0.0.1?" in message
        message = warnings_until(caplog, f"TLS handshake with 127.0.0.1:{broker.plain_port} failed")
        assert "is that port a TLS listener? (a plain one takes mqtt://)" in message
        message = warnings_until(caplog, "closed the connection before accepting it")
        assert f"127.0.0.1:{broker.tls_port}" in message and "use mqtts://" in message
    finally:
        for each in (wrong_ca, tls_to_plain, plain_to_tls):
            each.close()


def test_refused_credentials_name_the_user_and_file_then_the_link_gives_up(
    secure: tuple[Mosquitto, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker, _ = secure
    wrong = tmp_path / "dev0.password"
    wrong.write_text("not the password\n")
    refused = link(
        port=broker.plain_port, username="dev0", password="not the password", password_file=wrong,
        max_auth_failures=3,
    )  # fmt: skip
    unknown = link(port=broker.plain_port, username="dev9", password="x")  # keeps trying (0: no limit)
    try:
        message = warnings_until(caplog, "refused user 'dev0'")
        assert (
            f"(password from {wrong}): Not authorized; is dev0 enrolled? `fleetlora devices enroll dev0"
            in message
        )
        deadline = time.monotonic() + WAIT
        while refused.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert refused.failure is not None and refused.failure.startswith("gave up after 3 refusals: ")
        assert "is dev9 enrolled?" in warnings_until(caplog, "refused user 'dev9'")
        assert unknown.failure is None
    finally:
        refused.close()
        unknown.close()


def test_the_client_exits_when_its_credentials_are_refused(
    secure: tuple[Mosquitto, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broker, _ = secure
    wrong = tmp_path / "dev0.password"
    wrong.write_text("not the password\n")
    args = ["client", "--run", "r", "--id", "dev0", "--dataset", "trec6", "--max-examples", "16"]
    args += ["--broker", f"mqtt://127.0.0.1:{broker.plain_port}", "--password-file", str(wrong)]
    args += ["--max-auth-failures", "2", "--connect-jitter", "0"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "dev0: gave up after 2 refusals: the broker at 127.0.0.1:" in err
    assert f"refused user 'dev0' (password from {wrong}): Not authorized; is dev0 enrolled?" in err


def test_a_tls_client_without_the_coordinators_key_warns_once(broker_dir: Path) -> None:
    """Announcements it cannot verify are still taken (the broker's ACL guards the topic), but said."""
    pki = make_test_ca(broker_dir / "pki")
    port = free_port()  # nobody listens: the client keeps trying, after its warnings
    (pki.root / "broker.json").write_text(
        json.dumps({"url": f"mqtts://127.0.0.1:{port}"})
    )  # broker run's record
    args = [sys.executable, "-m", "fleetlora", "client", "--run", "r", "--id", "dev0", "--dataset", "trec6"]
    args += ["--max-examples", "16", "--ca", str(pki.ca_cert), "--connect-jitter", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)  # mqtts:// from the CA
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "cannot reach the broker" in line:  # it got as far as connecting: the warning came first
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    warned = [line for line in lines if "no --coordinator-key" in line]
    assert len(warned) == 1 and "announcements from the broker are trusted unverified" in warned[0]
    assert any(f"127.0.0.1:{port} over TLS" in line for line in lines)
