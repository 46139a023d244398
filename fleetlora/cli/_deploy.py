"""What the deployment commands share (``coordinator serve``, ``client``, ``flash``): the broker flags and
where the broker is, the task (model, classes, labels, spec, sequence length: from a bundle or flags),
label names, secret keys and the data a device or the coordinator evaluates on."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from fleetlora.cli import CliError, as_list, positive_int

if TYPE_CHECKING:
    from torch import nn

    from export.bundle import Bundle
    from export.spec import AdapterSpec
    from protocol.mqtt_link import LinkConfig

# `fleetlora broker run --dir DIR` records where it listens in DIR/broker.json, so a command given
# the CA of DIR (DIR/ca.crt) connects to the broker's real address without being told.
BROKER_JSON = "broker.json"
PLAIN_DEFAULT = "mqtt://127.0.0.1:1883"
TLS_DEFAULT = "mqtts://127.0.0.1:8883"
AUTH_FAILURES = 5  # refusals of our credentials in a row before a command gives up (--max-auth-failures)


def add_broker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--broker",
        help="mqtt://host:port, mqtts://host:port (TLS) or wss://host[:port]/path (TLS WebSockets, e.g. "
        f"through an HTTPS-only firewall on 443); default {PLAIN_DEFAULT}, or with --ca the "
        f"address `fleetlora broker run --dir` recorded beside the CA ({BROKER_JSON}), else {TLS_DEFAULT}",
    )
    p.add_argument("--username", help="broker username (default: the client id)")
    p.add_argument("--password-file", help="file holding the broker password (never a flag)")
    p.add_argument("--ca", help="CA certificate that signed the broker's (TLS)")
    p.add_argument("--cert", help="client certificate (mutual TLS)")
    p.add_argument("--key-file", help="client certificate key (mutual TLS)")
    p.add_argument(
        "--max-auth-failures", type=int, default=AUTH_FAILURES,
        help="exit after the broker refused the credentials this many times in a row (0 = keep trying)",
    )  # fmt: skip


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run id (a topic level: letters, digits, _ . -)")
    p.add_argument("--bundle", default="", help="bundle folder: the model, classes, labels, spec, seq len")
    p.add_argument("--model", help="registered model, without --bundle (tiny-bert, minilm)")
    p.add_argument("--num-classes", type=positive_int, help="classes of the task head, without --bundle")
    p.add_argument("--labels", default="", help="class names, without --bundle: comma-separated or a file")
    p.add_argument("--spec", default="{}", help="adapter spec without --bundle: JSON text or a .json file")
    p.add_argument("--seed", type=int, default=0, help="seed of the head and every frozen random tensor")


def label_names(value: str) -> tuple[str, ...]:
    """``--labels``: a file with one label name a line, or names separated by commas."""
    path = Path(value)
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        source = str(path)
    elif "/" in value or value.endswith(".txt"):
        raise CliError(f"--labels: file not found: {value}")
    else:
        names, source = as_list(value), "--labels"
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise CliError(f"{source}: label names must be distinct, {twice} appear twice")
    if not names:
        raise CliError(f"{source}: no label names")
    return tuple(names)


# ---- the broker ------------------------------------------------------------------------------------


def recorded_broker(ca: str | Path) -> str | None:
    """The URL a broker run with the credentials folder of ``ca`` recorded, if any."""
    path = Path(ca).parent / BROKER_JSON
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())["url"])
    except (ValueError, KeyError, TypeError) as e:
        raise CliError(f"{path} is not a broker record ({e!r}); delete it or give --broker") from e


def write_broker_record(folder: Path, url: str) -> Path:
    """Record ``url`` in ``folder``/broker.json (see :func:`recorded_broker`)."""
    path = folder / BROKER_JSON
    path.write_text(json.dumps({"url": url}) + "\n")
    return path


def broker_url(given: str | None, ca: str | None) -> str:
    """The broker URL: ``given``, else the recorded one beside ``ca``, else the plain or TLS default.

    A plain ``mqtt://`` URL with a CA is refused: the CA would be silently unused.
    """
    url = given or ((recorded_broker(ca) or TLS_DEFAULT) if ca else PLAIN_DEFAULT)
    if ca and url.startswith(("mqtt://", "ws://")):
        raise CliError(
            f"--broker {url} is plain MQTT but a CA ({ca}) is given: use mqtts://HOST:PORT with the "
            "broker's TLS port (`fleetlora broker run --dir` listens on 8883 unless told --port)"
        )
    return url


# scheme -> (TLS, transport, default port); ws(s) is MQTT inside WebSockets, e.g. through an HTTPS-only
# firewall to the broker's WebSockets listener on 443 (`fleetlora broker run --wss-port 443`).
BROKER_SCHEMES: dict[str, tuple[bool, Literal["tcp", "websockets"], int]] = {
    "mqtt": (False, "tcp", 1883), "mqtts": (True, "tcp", 8883),
    "ws": (False, "websockets", 80), "wss": (True, "websockets", 443),
}  # fmt: skip


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    transport: Literal["tcp", "websockets"] = "tcp"
    ws_path: str = "/mqtt"


def parse_broker(url: str) -> BrokerAddress:
    """``mqtt://host:port``, ``mqtts://host:port``, ``ws://host:port/path`` or ``wss://host:port/path``."""
    parsed = urlparse(url)
    if parsed.scheme not in BROKER_SCHEMES or not parsed.hostname:
        raise CliError(
            "--broker must look like mqtt://host:port, mqtts://host:port or wss://host[:port]/path, "
            f"got {url!r}"
        )
    tls, transport, default_port = BROKER_SCHEMES[parsed.scheme]
    try:
        port = parsed.port or default_port
    except ValueError as e:
        raise CliError(f"--broker {url}: {e}") from e
    return BrokerAddress(parsed.hostname, port, tls, transport, parsed.path or "/mqtt")


def link_config(args: argparse.Namespace, client_id: str, **extra: Any) -> LinkConfig:
    """The MQTT link of this process from the broker flags (secrets read from files)."""
    from protocol.mqtt_link import LinkConfig, MqttLinkError

    address = parse_broker(broker_url(args.broker, args.ca))
    password = None
    if args.password_file:
        path = Path(args.password_file)
        if not path.is_file():
            raise CliError(f"password file not found: {path}")
        password = path.read_text().strip()
    username = args.username or (client_id if password is not None else None)
    try:
        return LinkConfig(
            client_id=client_id, host=address.host, port=address.port, username=username,
            password=password, tls=address.tls, transport=address.transport, ws_path=address.ws_path,
            ca_cert=Path(args.ca) if args.ca else None, client_cert=Path(args.cert) if args.cert else None,
            client_key=Path(args.key_file) if args.key_file else None,
            password_file=Path(args.password_file) if args.password_file else None,
            max_auth_failures=max(0, args.max_auth_failures), **extra,
        )  # fmt: skip
    except MqttLinkError as e:
        raise CliError(str(e)) from e


# ---- the task --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """What is trained: the registered model, its head, the adapter and how examples are tokenized."""

    model: str
    num_classes: int
    labels: tuple[str, ...]
    spec: AdapterSpec
    seq_len: int
    model_seed: int
    bundle: Bundle | None = None

    def describe(self) -> str:
        source = f" (bundle {self.bundle.path})" if self.bundle is not None else ""
        return (
            f"{self.model}, {self.num_classes} classes, {self.spec.family} rank {self.spec.rank}, "
            f"sequence length {self.seq_len}{source}"
        )


def load_spec(text: str, **defaults: Any) -> AdapterSpec:
    """An adapter spec from JSON text or a JSON file; ``defaults`` fill keys the JSON leaves out."""
    from export.spec import AdapterSpec, SpecError

    source = Path(text).read_text() if text.endswith(".json") and Path(text).is_file() else text
    try:
        d = json.loads(source)
        return AdapterSpec.from_dict({**defaults, **d})
    except (ValueError, SpecError) as e:
        raise CliError(f"--spec: {e}") from e


def open_bundle(path: str) -> Bundle:
    from export.bundle import BundleError, load_bundle

    try:
        return load_bundle(path)
    except BundleError as e:
        raise CliError(str(e)) from e


def resolve_task(
    args: argparse.Namespace,
    *,
    seq_len: int | None,
    spec_defaults: dict[str, Any],
    default_model: str | None = None,
    default_num_classes: int | None = None,
) -> Task:
    """The task from ``--bundle`` (flags that disagree with it are refused, naming both), else from
    ``--model``, ``--num-classes``/``--labels`` and ``--spec`` (with the defaults given, if any)."""
    labels = label_names(args.labels) if args.labels else ()
    if args.bundle:
        bundle = open_bundle(args.bundle)
        info = bundle.info
        if args.spec != "{}":
            raise CliError(f"--spec conflicts with --bundle: {bundle.path} fixes the adapter spec")
        given = {
            "--model": (args.model, info.model), "--num-classes": (args.num_classes, info.num_classes),
            "--labels": (labels or None, info.labels), "--max-len": (seq_len, info.seq_len),
        }  # fmt: skip
        for flag, (value, theirs) in given.items():
            if value is not None and value != theirs:
                raise CliError(f"{flag} {value} conflicts with {bundle.path}, which has {theirs}")
        return Task(
            info.model, info.num_classes, info.labels, bundle.spec, info.seq_len, info.model_seed, bundle
        )
    model = args.model or default_model
    num_classes = args.num_classes or len(labels) or default_num_classes
    if not model or not num_classes:
        raise CliError("give --bundle (the bundle the devices train), or --model and --num-classes")
    if labels and len(labels) != num_classes:
        raise CliError(f"--labels names {len(labels)} classes but --num-classes is {num_classes}")
    spec = load_spec(args.spec, **spec_defaults)
    return Task(model, num_classes, labels, spec, seq_len or 0, args.seed)


def task_model(task: Task) -> tuple[nn.Module, Any]:
    """The frozen registered model with the task's adapter attached, and its tokenizer."""
    from export.adapters import attach
    from export.models import ModelError, build_model

    try:
        base, tokenizer = build_model(task.model, task.num_classes, seed=task.model_seed)
    except ModelError as e:
        raise CliError(str(e)) from e
    return attach(base, task.spec), tokenizer


def local_data(path: str, task: Task, tokenizer: Any) -> Any:
    """A data file's examples for ``task`` (labels checked, tokenized once, split into train and
    validation): :class:`export.local_data.LocalData`."""
    from export.data import DataError, check_tokenizer
    from export.local_data import load_local_data

    try:
        if task.bundle is not None:
            check_tokenizer(task.bundle.info.tokenizer, tokenizer, str(task.bundle.path))
        return load_local_data(path, tokenizer, task.seq_len, task.labels)
    except DataError as e:
        raise CliError(str(e)) from e


def read_secret_key(spec: str | None) -> bytes | None:
    """An HMAC key from ``--*-key`` (a file, or env:NAME), or None."""
    if not spec:
        return None
    from protocol.keys import KeyFileError, read_key

    try:
        return read_key(spec)
    except KeyFileError as e:
        raise CliError(str(e)) from e
