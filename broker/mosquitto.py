"""The MQTT broker the fleet talks through: mosquitto with a rendered config, as a child process.

``Mosquitto`` runs the system's mosquitto binary on loopback with a config rendered from the packaged
template (plain and/or TLS listener, passwords, ACL, raised queue limits, a packet size cap).
``broker.embedded.EmbeddedBroker`` is the zero-setup fallback with the same interface
(:class:`broker.child.ChildBroker`); :func:`local_broker` picks one of the two.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from broker.child import LOOPBACK, ChildBroker, free_port
from broker.credentials import (
    BrokerError,
    CredentialPaths,
    check_reachable_by_broker,
    give_to_broker_user,
)
from broker.embedded import EmbeddedBroker

__all__ = [
    "BrokerConfig",
    "BrokerError",
    "Mosquitto",
    "find_mosquitto",
    "local_broker",
    "mosquitto_available",
    "render_config",
    "websockets_available",
]

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# mosquitto's own hard maximum for a packet (the MQTT variable-length limit).
MQTT_MAX_PACKET = 268_435_455


@dataclass(frozen=True)
class BrokerConfig:
    """What to render into mosquitto.conf.

    ``port``/``tls_port``: 0 picks a free port, None disables that listener. ``credentials``: a directory
    made by :func:`~broker.credentials.make_test_ca`; with it anonymous clients are refused,
    passwords and the ACL apply, and the TLS listener uses its server certificate.
    ``require_certificate``: mutual TLS, the certificate CN becomes the username (ACL ``%u``).
    ``wss_port``: a TLS WebSockets listener too (0 picks a free port; 443 for devices behind firewalls
    that pass only HTTPS): the same server certificate, passwords and ACL, MQTT inside WebSocket frames
    (clients connect to ``wss://host:port/mqtt``). Needs a mosquitto built with websockets support.
    """

    port: int | None = 0
    tls_port: int | None = None
    wss_port: int | None = None
    bind: str = LOOPBACK
    credentials: Path | None = None
    require_certificate: bool = False
    max_packet_size: int = 16 * MIB
    max_queued_messages: int = 100_000
    max_queued_bytes: int = 512 * MIB
    max_inflight_messages: int = 20
    persistence: bool = False

    def __post_init__(self) -> None:
        if self.port is None and self.tls_port is None:
            raise BrokerError("the broker needs at least one listener: give port or tls_port")
        if self.tls_port is not None and self.credentials is None:
            raise BrokerError("a TLS listener needs a credentials directory (fleetlora broker init-ca DIR)")
        if self.wss_port is not None and self.credentials is None:
            raise BrokerError(
                "a WebSockets (wss) listener needs a credentials directory (fleetlora broker init-ca DIR)"
            )
        if self.require_certificate and self.tls_port is None:
            raise BrokerError("require_certificate needs a TLS listener (tls_port)")
        if not 0 < self.max_packet_size <= MQTT_MAX_PACKET:
            raise BrokerError(f"max_packet_size must be in 1..{MQTT_MAX_PACKET}, got {self.max_packet_size}")
        for name in ("max_queued_messages", "max_queued_bytes", "max_inflight_messages"):
            if getattr(self, name) < 1:
                raise BrokerError(f"{name} must be >= 1, got {getattr(self, name)}")


def render_config(
    config: BrokerConfig, workdir: Path, port: int | None, tls_port: int | None, wss_port: int | None = None
) -> str:
    """The mosquitto.conf text for ``config`` with its listeners on the resolved ports."""
    listeners = []
    if port is not None:
        listeners.append(f"listener {port} {config.bind}\nprotocol mqtt\n")
    creds = CredentialPaths(config.credentials) if config.credentials else None
    for protocol, listen in (("mqtt", tls_port), ("websockets", wss_port)):
        if listen is None or creds is None:
            continue
        block = (
            f"listener {listen} {config.bind}\nprotocol {protocol}\ncafile {creds.ca_cert}\n"
            f"certfile {creds.server_cert}\nkeyfile {creds.server_key}\ntls_version tlsv1.2\n"
        )
        if config.require_certificate:
            block += "require_certificate true\nuse_identity_as_username true\n"
        listeners.append(block)
    auth = f"password_file {creds.password_file}\nacl_file {creds.acl_file}" if creds else ""
    template = resources.files("broker").joinpath("mosquitto.conf.template").read_text()
    return Template(template).substitute(
        allow_anonymous="false" if creds else "true",
        auth_files=auth,
        persistence="true" if config.persistence else "false",
        workdir=workdir,
        log_file=workdir / "mosquitto.log",
        max_queued_messages=config.max_queued_messages,
        max_queued_bytes=config.max_queued_bytes,
        max_inflight_messages=config.max_inflight_messages,
        max_packet_size=config.max_packet_size,
        listeners="\n".join(listeners),
    )


class Mosquitto(ChildBroker):
    """The system mosquitto, configured from :class:`BrokerConfig`, as a child process.

    Free ports are picked once, in the constructor, so :meth:`restart` comes back on the same ports.
    ``port`` is the plain listener's port, or the TLS one when there is no plain listener.
    """

    log_name = "mosquitto.log"

    def __init__(
        self, workdir: Path | str, config: BrokerConfig | None = None, *, binary: str | None = None
    ) -> None:
        self.config = config or BrokerConfig()
        found = binary or find_mosquitto()
        if found is None:
            raise BrokerError(
                "mosquitto is not installed (apt-get install -y mosquitto mosquitto-clients); "
                "or use the embedded broker: fleetlora broker run --embedded"
            )
        self.binary = found
        host = LOOPBACK if self.config.bind in ("0.0.0.0", "") else self.config.bind
        self.plain_port = self._resolve(self.config.port, host)
        self.tls_port = self._resolve(self.config.tls_port, host)
        self.wss_port = self._resolve(self.config.wss_port, host)
        primary = self.plain_port if self.plain_port is not None else self.tls_port
        assert primary is not None  # BrokerConfig guarantees one listener
        super().__init__(workdir, host, primary)

    @staticmethod
    def _resolve(port: int | None, host: str) -> int | None:
        return free_port(host) if port == 0 else port

    @property
    def config_file(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the plain listener, else ``mqtts://`` of the TLS one."""
        scheme = "mqtt" if self.plain_port is not None else "mqtts"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def wss_url(self) -> str | None:
        """``wss://host:port/mqtt`` of the WebSockets listener, if there is one."""
        return None if self.wss_port is None else f"wss://{self.host}:{self.wss_port}/mqtt"

    def _prepare(self) -> None:
        if self.wss_port is not None and not websockets_available(self.binary):
            raise BrokerError(
                f"{self.binary} was built without websockets support (Debian 12's mosquitto 2.0.11 "
                "package is): the wss listener cannot start. Install a mosquitto built WITH_WEBSOCKETS "
                "(e.g. mosquitto.org's packages), or put a TLS-terminating WebSocket proxy in front of "
                "the mqtts listener"
            )
        check_reachable_by_broker(self.workdir)
        if self.config.credentials is not None:
            check_reachable_by_broker(Path(self.config.credentials))
        give_to_broker_user(self.workdir)
        self.config_file.write_text(
            render_config(self.config, self.workdir.resolve(), self.plain_port, self.tls_port, self.wss_port)
        )

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_file)]

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its password and ACL files (after add_device)."""
        if not self.running or self.pid is None:
            raise BrokerError("mosquitto is not running")
        os.kill(self.pid, signal.SIGHUP)


def find_mosquitto() -> str | None:
    """The mosquitto binary: on PATH, or in /usr/sbin where Debian puts it (not on every user's PATH)."""
    found = shutil.which("mosquitto")
    if found is None and Path("/usr/sbin/mosquitto").exists():
        found = "/usr/sbin/mosquitto"
    return found


@functools.cache
def websockets_available(binary: str) -> bool:
    """Whether ``binary`` can open a WebSockets listener: tried once on a free loopback port."""
    folder = Path(tempfile.mkdtemp(prefix="fleetlora-ws-probe-"))
    try:
        port = free_port()
        (folder / "probe.conf").write_text(
            f"listener {port} {LOOPBACK}\nprotocol websockets\nallow_anonymous true\n"
        )
        os.chmod(folder, 0o755)
        proc = subprocess.Popen(
            [binary, "-c", str(folder / "probe.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with socket.create_connection((LOOPBACK, port), timeout=0.2) as probe:
                        # (a free ephemeral port can connect to itself: TCP's simultaneous open)
                        accepted = probe.getsockname() != probe.getpeername()
                    # A mosquitto without websockets support opens the socket, then exits at once.
                    if accepted and proc.poll() is None:
                        time.sleep(0.5)
                        return proc.poll() is None
                except OSError:
                    time.sleep(0.05)
            return False
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(5)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def mosquitto_available() -> bool:
    """True when a mosquitto binary is installed."""
    return find_mosquitto() is not None


def local_broker(workdir: Path | str, *, embedded: bool | None = None, port: int = 0) -> ChildBroker:
    """A plain loopback broker: mosquitto when installed (or ``embedded=False``), else the embedded one."""
    if embedded is None:
        embedded = not mosquitto_available()
    if embedded:
        return EmbeddedBroker(workdir, port=port)
    return Mosquitto(workdir, BrokerConfig(port=port))
