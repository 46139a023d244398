"""MQTT over secure WebSockets (``wss://``), for devices behind firewalls that pass only HTTPS.

The shipped mosquitto config gains a TLS WebSockets listener with the same certificate, passwords and
ACL as the mqtts one; devices connect with ``wss://host:port/path`` (paho's websockets transport).
Debian 12's mosquitto 2.0.11 is built without websockets: there the mosquitto fleet test is skipped
(saying so) and the broker refuses a wss listener in words; the same mixed fleet (wss:// and mqtts://
devices, one coordinator) runs on the embedded amqtt broker, whose listeners take TLS too.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from deploy_helpers import client_ids, device, make_service

from broker.child import free_port
from broker.credentials import BrokerError, add_device, make_test_ca
from broker.embedded import EmbeddedBroker, amqtt_available
from broker.mosquitto import BrokerConfig, Mosquitto, find_mosquitto, render_config
from broker.mosquitto import websockets_available as mosquitto_websockets
from coordinator.service_mqtt import serve
from fleetlora.cli import CliError
from fleetlora.cli._deploy import BrokerAddress, link_config, parse_broker

ROUNDS = 2


def test_broker_urls_name_the_transport_port_and_path() -> None:
    assert parse_broker("wss://broker.example.org/mqtt") == BrokerAddress(
        "broker.example.org", 443, True, "websockets", "/mqtt"
    )
    assert parse_broker("wss://10.0.0.5:8443/fleet/mqtt").ws_path == "/fleet/mqtt"
    plain = BrokerAddress("127.0.0.1", 9001, False, "websockets", "/mqtt")
    assert parse_broker("ws://127.0.0.1:9001") == plain
    assert parse_broker("mqtts://h:8883") == BrokerAddress("h", 8883, True, "tcp", "/mqtt")
    with pytest.raises(CliError, match="wss://host"):
        parse_broker("https://h/mqtt")
    args = argparse.Namespace(
        broker="wss://h/ws", ca="ca.crt", password_file=None, username=None, cert=None, key_file=None,
        max_auth_failures=0,
    )  # fmt: skip
    config = link_config(args, "dev0")
    assert (config.transport, config.ws_path, config.port, config.tls) == ("websockets", "/ws", 443, True)


def test_the_shipped_config_renders_a_tls_websockets_listener_with_the_same_credentials(
    broker_dir: Path,
) -> None:
    pki = broker_dir / "pki"
    make_test_ca(pki)
    config = BrokerConfig(port=None, tls_port=8883, wss_port=443, credentials=pki, bind="0.0.0.0")
    text = render_config(config, broker_dir, None, 8883, 443)
    wss = text.split("listener 443 0.0.0.0\n", 1)[1]
    assert wss.startswith(f"protocol websockets\ncafile {pki / 'ca.crt'}\n")
    assert "certfile" in wss and "keyfile" in wss and "tls_version tlsv1.2" in wss
    # One password file and one ACL for every listener (per_listener_settings false).
    assert "per_listener_settings false" in text and text.count("password_file ") == 1
    assert "allow_anonymous false" in text
    with pytest.raises(BrokerError, match="needs a credentials directory"):
        BrokerConfig(wss_port=443)


def mixed_fleet(broker_port: int, wss_url: str, ca: Path, tmp_path: Path, **creds: str) -> None:
    """Two devices over mqtts:// and one over wss:// (``wss_url``): every round has all three."""
    clients = client_ids(3)
    wss = parse_broker(wss_url)
    service = make_service("fedit", tmp_path / "state", clients, rounds=ROUNDS, deadline_s=120.0)

    def tls(cid: str, **more: object) -> dict[str, object]:
        password = creds.get(cid)
        user = cid if password else None
        return {"tls": True, "ca_cert": ca, "username": user, "password": password, **more}

    protocol = {"protocol": "3.1.1"} if not creds else {}
    stop = threading.Event()
    thread = threading.Thread(
        target=serve, args=(service, _link("coordinator", broker_port, tls("coordinator", **protocol)), stop)
    )
    thread.start()
    devices = [
        device(c, i, "fedit", broker_port, link_overrides=tls(c, **protocol))
        for i, c in enumerate(clients[:2])
    ]
    devices.append(
        device(
            clients[2], 2, "fedit", wss.port,
            link_overrides=tls(clients[2], transport="websockets", ws_path=wss.ws_path, **protocol),
        )
    )  # fmt: skip
    try:
        for d in devices:
            d.start()
        for d in devices:
            d.join()
        thread.join(60)
        assert not thread.is_alive()
    finally:
        stop.set()
        thread.join(30)
        for d in devices:
            d.close()
    assert [r["clients"] for r in service.history] == [list(clients)] * ROUNDS


def _link(cid: str, port: int, fields: dict[str, object]) -> object:
    from protocol.mqtt_link import LinkConfig

    return LinkConfig(cid, port=port, backoff_max_s=1.0, **fields)  # type: ignore[arg-type]


@pytest.mark.mqtt
def test_a_wss_device_completes_rounds_beside_mqtts_devices_on_mosquitto(
    start_mosquitto: Callable[..., Mosquitto], broker_dir: Path, tmp_path: Path
) -> None:
    binary = find_mosquitto()
    assert binary is not None  # (start_mosquitto skips without one)
    pki = broker_dir / "pki"
    make_test_ca(pki)
    creds = {name: add_device(pki, name).password for name in client_ids(3)}
    creds["coordinator"] = add_device(pki, "coordinator", role="coordinator").password
    config = BrokerConfig(port=None, tls_port=0, wss_port=0, credentials=pki)
    if not mosquitto_websockets(binary):
        with pytest.raises(BrokerError, match="built without websockets support"):
            start_mosquitto(config)
        pytest.skip(f"{binary} was built without websockets (Debian 12's 2.0.11 is): see the embedded test")
    broker = start_mosquitto(config)
    assert broker.wss_url is not None
    mixed_fleet(broker.port, broker.wss_url, pki / "ca.crt", tmp_path, **creds)


@pytest.mark.skipif(not amqtt_available(), reason="the embedded broker needs amqtt (fleetlora[broker])")
def test_a_wss_device_completes_rounds_beside_mqtts_devices_on_the_embedded_broker(
    broker_dir: Path, tmp_path: Path
) -> None:
    pki = broker_dir / "pki"
    make_test_ca(pki)
    with EmbeddedBroker(broker_dir / "amqtt", ws_port=0, tls=pki) as broker:
        assert broker.ws_url is not None and broker.ws_url.startswith("wss://127.0.0.1:")
        mixed_fleet(broker.port, broker.ws_url, pki / "ca.crt", tmp_path)


@pytest.mark.mqtt
def test_broker_run_wss_port_starts_or_says_why_not(
    broker_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fleetlora.cli import main as cli_main

    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed")
    assert cli_main(["broker", "run", "--wss-port", "443"]) == 2
    assert "--wss-port needs --dir" in capsys.readouterr().err
    if mosquitto_websockets(binary):
        pytest.skip("this mosquitto has websockets: the fleet test above runs it")
    pki = broker_dir / "pki"
    make_test_ca(pki)
    ports = ["--port", str(free_port()), "--wss-port", str(free_port())]
    args = ["broker", "run", "--dir", str(pki), *ports, "--workdir", str(broker_dir / "b")]
    assert cli_main(args) == 2
    assert "was built without websockets support" in capsys.readouterr().err
