"""Zero-setup fallback broker: amqtt (pure Python) in a child process, for machines without mosquitto.

Limits, stated wherever it is offered: MQTT 3.1.1 only (no MQTT 5 reason codes, session expiry or
broker packet-size announcement), no TLS, passwords or ACL here (anonymous, loopback only), no shared
subscriptions, about 40 MB/s. Good for the simulator and local development, not for a real fleet.
Install with ``pip install 'fleetlora[broker]'`` (amqtt==0.12.1).

Run directly: ``python -m broker.embedded --port 1883``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import signal
import sys
from pathlib import Path

from broker.child import LOOPBACK, ChildBroker, free_port
from broker.credentials import BrokerError, CredentialPaths

LIMITS = (
    "MQTT 3.1.1 only, anonymous, no TLS/ACL, no shared subscriptions, ~40 MB/s; "
    "for local development and the simulator"
)


def amqtt_available() -> bool:
    """True when the amqtt package is importable."""
    return importlib.util.find_spec("amqtt") is not None


class EmbeddedBroker(ChildBroker):
    """amqtt on ``127.0.0.1:port`` as a child process (never bound to 0.0.0.0)."""

    log_name = "amqtt.log"
    protocol = "3.1.1"

    def __init__(
        self, workdir: Path | str, *, port: int = 0, ws_port: int | None = None, tls: Path | None = None
    ) -> None:
        """``ws_port``: a WebSockets listener too (0 picks a free port). ``tls``: a credentials folder of
        ``fleetlora broker init-ca``: both listeners take TLS with its server certificate (mqtts://,
        wss://), still anonymous and without ACL."""
        if not amqtt_available():
            raise BrokerError("the embedded broker needs amqtt: pip install amqtt==0.12.1")
        super().__init__(workdir, LOOPBACK, port or free_port(LOOPBACK))
        self.ws_port = free_port(LOOPBACK) if ws_port == 0 else ws_port
        self.tls = tls

    @property
    def ws_url(self) -> str | None:
        """``ws(s)://127.0.0.1:port/mqtt`` of the WebSockets listener, if there is one."""
        scheme = "wss" if self.tls else "ws"
        return None if self.ws_port is None else f"{scheme}://{self.host}:{self.ws_port}/mqtt"

    def _command(self) -> list[str]:
        command = [
            sys.executable, "-m", "broker.embedded", "--port", str(self.port),
            "--log", str(self.workdir / self.log_name),
        ]  # fmt: skip
        if self.ws_port is not None:
            command += ["--ws-port", str(self.ws_port)]
        if self.tls is not None:
            paths = CredentialPaths(self.tls)
            command += ["--certfile", str(paths.server_cert), "--keyfile", str(paths.server_key)]
        return command

    def _environment(self) -> dict[str, str]:
        # The child must import this package even when it is used from a source tree, not installed.
        source_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
        return env


async def _serve(port: int, ws_port: int | None, certfile: str | None, keyfile: str | None) -> None:
    from amqtt.broker import Broker

    tls = {"ssl": True, "certfile": certfile, "keyfile": keyfile} if certfile else {}
    listeners = {"default": {"type": "tcp", "bind": f"{LOOPBACK}:{port}", **tls}}
    if ws_port is not None:
        listeners["websockets"] = {"type": "ws", "bind": f"{LOOPBACK}:{ws_port}", **tls}
    config = {
        "listeners": listeners,
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker.embedded", description=f"amqtt broker on {LOOPBACK}: {LIMITS}"
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", help="log file (default: stderr)")
    parser.add_argument("--ws-port", type=int, help="a WebSockets listener too")
    parser.add_argument("--certfile", help="server certificate: TLS on every listener")
    parser.add_argument("--keyfile", help="its key")
    args = parser.parse_args(argv)
    logging.basicConfig(
        filename=args.log, level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(_serve(args.port, args.ws_port, args.certfile, args.keyfile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
