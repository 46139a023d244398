"""``fleetlora broker``: run a loopback MQTT broker and manage the fleet's broker credentials."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path
from types import FrameType

from fleetlora.cli import CliError, as_list, positive_int

log = logging.getLogger(__name__)

NAME = "broker"
HELP = "run a local MQTT broker (mosquitto, or embedded amqtt) and create the fleet's CA"
ORDER = 40
EXAMPLES = """\
fleetlora broker run --port 1883                 # plain loopback mosquitto, anonymous (local development)
fleetlora broker init-ca ./pki                   # CA + server certificate for 127.0.0.1/localhost
fleetlora broker init-ca ./pki --hosts 10.0.0.5,broker.lan   # ... for the addresses devices reach it at
fleetlora devices enroll jetson-01 --pki ./pki --keys ./keys # a device (and, the first time, the coordinator)
fleetlora broker run --dir ./pki                 # the shipped setup: TLS on 8883 + passwords + ACL
fleetlora broker run --dir ./pki --tls --require-certificate  # mutual TLS: the certificate CN is the username
fleetlora broker run --dir ./pki --wss-port 443  # + TLS WebSockets for devices that reach only HTTPS
fleetlora broker run --embedded --port 1883      # no mosquitto: amqtt, MQTT 3.1.1 only (see run --help)"""


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1-65535), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from broker.embedded import LIMITS

    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    run = actions.add_parser(
        "run",
        help="run a broker on 127.0.0.1 in the foreground until Ctrl-C/SIGTERM",
        description="Run a broker on 127.0.0.1 in the foreground until Ctrl-C or SIGTERM.",
    )
    run.add_argument("--port", type=_port, help="listener port (default 1883, or 8883 with --tls)")
    run.add_argument(
        "--bind", default="127.0.0.1",
        help="address to listen on (default: loopback only); 0.0.0.0 or a LAN address for real devices",
    )  # fmt: skip
    run.add_argument(
        "--dir",
        help="credentials directory from init-ca: clients need a password (or certificate) "
        "and the ACL applies",
    )
    run.add_argument(
        "--tls", action="store_true", default=None,
        help="TLS listener with the server certificate in --dir (the default with --dir)",
    )  # fmt: skip
    run.add_argument(
        "--plain", dest="tls", action="store_false",
        help="with --dir: passwords and ACL on a plain listener, no TLS (a trusted network only)",
    )  # fmt: skip
    run.add_argument(
        "--wss-port", type=_port,
        help="with --dir: a TLS WebSockets listener too (443 for devices that reach only HTTPS; "
        "same certificate, passwords and ACL; devices use wss://HOST:PORT/mqtt)",
    )  # fmt: skip
    run.add_argument(
        "--require-certificate",
        action="store_true",
        help="mutual TLS: clients must present a certificate from the CA; its CN is the username",
    )
    run.add_argument(
        "--workdir", help="where mosquitto.conf and the log go (default: DIR/broker, else a temp dir)"
    )
    run.add_argument(
        "--max-packet-size",
        type=positive_int,
        default=16 * 1024 * 1024,
        help="largest MQTT packet in bytes (default 16 MiB); clients refuse bigger publishes",
    )
    run.add_argument(
        "--embedded",
        action="store_true",
        help=f"use the embedded amqtt broker instead of mosquitto: {LIMITS}",
    )
    init = actions.add_parser(
        "init-ca",
        help="create a CA and a server certificate (enrol clients with: fleetlora devices enroll)",
    )
    init.add_argument("dir", help="new credentials directory")
    init.add_argument(
        "--hosts", default="127.0.0.1,localhost",
        help="addresses and names the server certificate is valid for, comma-separated "
        "(the ones devices reach the broker at; default: %(default)s)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from broker.credentials import BrokerError

    try:
        if args.action == "init-ca":
            return _init_ca(args)
        return _run_broker(args)
    except BrokerError as e:
        raise CliError(str(e)) from e


def _init_ca(args: argparse.Namespace) -> int:
    from broker.credentials import make_test_ca

    hosts = tuple(as_list(args.hosts))
    if not hosts:
        raise CliError("--hosts names no address")
    paths = make_test_ca(args.dir, hosts=hosts)
    print(
        f"CA and a server certificate for {', '.join(hosts)} written to {paths.root} "
        f"(CA key: {paths.ca_key}, keep it private)"
    )
    print(f"next: fleetlora devices enroll NAME --pki {paths.root} --keys KEYS")
    return 0


def _run_broker(args: argparse.Namespace) -> int:
    from broker.child import ChildBroker
    from broker.embedded import EmbeddedBroker
    from broker.mosquitto import BrokerConfig, Mosquitto

    if args.tls and not args.dir:
        raise CliError("--tls needs --dir, a credentials directory made by `fleetlora broker init-ca DIR`")
    if args.tls is None:
        args.tls = bool(args.dir)  # credentials mean a fleet: TLS unless --plain says otherwise
    if not args.dir:
        log.warning("anonymous broker without TLS: for local development only (give --dir for a fleet)")
        if args.bind != "127.0.0.1":
            raise CliError("an anonymous broker listens on loopback only: give --dir for --bind")
    if args.wss_port is not None and (not args.dir or args.embedded):
        raise CliError("--wss-port needs --dir (TLS with its certificate, passwords, ACL) and mosquitto")
    if args.require_certificate and not args.tls:
        raise CliError("--require-certificate needs --tls")
    port = args.port or (8883 if args.tls else 1883)
    broker: ChildBroker
    if args.embedded:
        if args.dir or args.tls:
            raise CliError(
                "the embedded broker has no TLS, passwords or ACL: drop --dir/--tls or install mosquitto"
            )
        broker = EmbeddedBroker(args.workdir or tempfile.mkdtemp(prefix="fleetlora-broker-"), port=port)
    else:
        config = BrokerConfig(
            port=None if args.tls else port,
            tls_port=port if args.tls else None,
            wss_port=args.wss_port,
            credentials=Path(args.dir) if args.dir else None,
            require_certificate=args.require_certificate,
            max_packet_size=args.max_packet_size,
            bind=args.bind,
        )
        broker = Mosquitto(_workdir(args), config)
    broker.start()
    if args.dir:
        from fleetlora.cli._deploy import write_broker_record

        scheme = "mqtts" if args.tls else "mqtt"
        write_broker_record(Path(args.dir), f"{scheme}://{broker.host}:{broker.port}")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    wss = getattr(broker, "wss_url", None)
    print(
        f"broker on {broker.host}:{broker.port}{f' and {wss}' if wss else ''} (pid {broker.pid}); "
        f"config and log in {broker.workdir}; "
        "Ctrl-C to stop",
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            if not broker.running:
                raise CliError(f"the broker exited unexpectedly:\n{broker.log_tail()}")
    finally:
        broker.stop()
    return 0


def _workdir(args: argparse.Namespace) -> Path:
    if args.workdir:
        return Path(args.workdir)
    if args.dir:
        return Path(args.dir) / "broker"
    path = Path(tempfile.mkdtemp(prefix="fleetlora-broker-"))
    os.chmod(path, 0o755)  # mosquitto started as root drops to its own user, which must enter this folder
    return path
