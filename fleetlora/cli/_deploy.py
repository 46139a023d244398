"""Flags shared by the deployment commands (``coordinator serve`` and ``client``): broker, model, spec."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from fleetlora.cli import CliError, as_list, positive_int

if TYPE_CHECKING:
    from torch import nn

    from edge_client.mqtt_link import LinkConfig
    from export.spec import AdapterSpec


def add_broker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://host:port or mqtts:// (TLS)")
    p.add_argument("--username", help="broker username (default: the client id)")
    p.add_argument("--password-file", help="file holding the broker password (never a flag)")
    p.add_argument("--ca", help="CA certificate that signed the broker's (TLS)")
    p.add_argument("--cert", help="client certificate (mutual TLS)")
    p.add_argument("--key-file", help="client certificate key (mutual TLS)")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run id (a topic level: letters, digits, _ . -)")
    p.add_argument("--model", default="tiny-bert", help="registered model (default: %(default)s)")
    p.add_argument("--num-classes", type=positive_int, default=6, help="classes of the task head")
    p.add_argument(
        "--spec", default="{}", help="adapter spec: JSON text or a .json file (keys of AdapterSpec)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the head and every frozen random tensor")


def label_names(value: str) -> tuple[str, ...]:
    """``--labels``: a file with one label name a line, or names separated by commas."""
    path = Path(value)
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        source = str(path)
    else:
        names, source = as_list(value), "--labels"
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise CliError(f"{source}: label names must be distinct, {twice} appear twice")
    if not names:
        raise CliError(f"{source}: no label names")
    return tuple(names)


def parse_broker(url: str) -> tuple[str, int, bool]:
    """``(host, port, tls)`` of ``mqtt://host:port`` / ``mqtts://host:port``."""
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise CliError(f"--broker must look like mqtt://host:port or mqtts://host:port, got {url!r}")
    tls = parsed.scheme == "mqtts"
    return parsed.hostname, parsed.port or (8883 if tls else 1883), tls


def link_config(args: argparse.Namespace, client_id: str, **extra: Any) -> LinkConfig:
    """The MQTT link of this process from the broker flags (secrets read from files)."""
    from edge_client.mqtt_link import LinkConfig, MqttLinkError

    host, port, tls = parse_broker(args.broker)
    password = None
    if args.password_file:
        path = Path(args.password_file)
        if not path.is_file():
            raise CliError(f"password file not found: {path}")
        password = path.read_text().strip()
    username = args.username or (client_id if password is not None else None)
    try:
        return LinkConfig(
            client_id=client_id, host=host, port=port, username=username, password=password, tls=tls,
            ca_cert=Path(args.ca) if args.ca else None, client_cert=Path(args.cert) if args.cert else None,
            client_key=Path(args.key_file) if args.key_file else None, **extra,
        )  # fmt: skip
    except MqttLinkError as e:
        raise CliError(str(e)) from e


def load_spec(text: str, **defaults: Any) -> AdapterSpec:
    """An adapter spec from JSON text or a JSON file; ``defaults`` fill keys the JSON leaves out."""
    from export.spec import AdapterSpec, SpecError

    source = Path(text).read_text() if text.endswith(".json") and Path(text).is_file() else text
    try:
        d = json.loads(source)
        return AdapterSpec.from_dict({**defaults, **d})
    except (ValueError, SpecError) as e:
        raise CliError(f"--spec: {e}") from e


def adapted_model(args: argparse.Namespace, spec: AdapterSpec) -> tuple[nn.Module, object]:
    """The frozen registered model with the spec's adapter attached, and its tokenizer."""
    from export.adapters import attach
    from export.models import ModelError, build_model

    try:
        base, tokenizer = build_model(args.model, args.num_classes, seed=args.seed)
    except ModelError as e:
        raise CliError(str(e)) from e
    return attach(base, spec), tokenizer


def read_secret_key(spec: str | None) -> bytes | None:
    """An HMAC key from ``--*-key`` (a file, or env:NAME), or None."""
    if not spec:
        return None
    from edge_client.keys import KeyFileError, read_key

    try:
        return read_key(spec)
    except KeyFileError as e:
        raise CliError(str(e)) from e
