"""``fleetlora flash``: put a bundle, a device's data and its client config on a device (folder, ssh, adb)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fleetlora.cli import CliError, positive_int
from fleetlora.cli._deploy import broker_url

log = logging.getLogger(__name__)

NAME = "flash"
HELP = "copy a bundle + the device's data + client config + run-client.sh to a device (folder, ssh, adb)"
EXAMPLES = """\
fleetlora flash --device raspberry_pi_5_8gb --run demo --bundle bundles/r8 --pki pki --keys keys \\
    --client-id dev1 --data data/dev1.jsonl --target local:devices/dev1
fleetlora flash --device jetson_orin_nano_8gb --run demo --bundle bundles/r8 --pki pki --keys keys \\
    --client-id jetson-01 --data my.csv --broker mqtts://10.0.0.5:8883 --target ssh:nvidia@jetson-01:/opt/fl
fleetlora flash --device pixel_8 --run demo --bundle bundles/r8 --client-id phone-1 --dataset trec6 \\
    --target adb:/data/local/tmp/fleetlora --dry-run
fleetlora flash --device ./board.toml --run demo --bundle bundles/r8 --client-id b1 --target local:/tmp/b1"""
ORDER = 45


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", required=True, help="device profile: a shipped name (fleetlora devices list) or a .toml"
    )
    p.add_argument("--target", required=True, help="local:DIR | ssh:user@host:/path | adb:/path")
    p.add_argument(
        "--run", "--run-id", dest="run_id", required=True, help="federated run id (the coordinator's --run)"
    )
    p.add_argument("--bundle", default="", help="bundle folder to reuse, or to build when missing")
    p.add_argument(
        "--data", default="", help="the device's own examples to copy: .jsonl, .csv or a folder per label"
    )
    p.add_argument("--dataset", default="", help="instead of --data: a built-in demo data set (trec6, ...)")
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be copied and run; change nothing"
    )
    p.add_argument(
        "--broker",
        help="broker URL the client connects to (default: the one `broker run --dir` recorded beside the CA, "
        "else mqtts://127.0.0.1:8883 with a CA and mqtt://127.0.0.1:1883 without)",
    )
    p.add_argument(
        "--client-id", default="",
        help="the enrolled device name (default: the name of the --password-file, NAME.password)",
    )  # fmt: skip
    p.add_argument("--backend", default="executorch", choices=("executorch", "eager"), help="trainer backend")
    p.add_argument(
        "--python", default="",
        help="interpreter run-client.sh starts (default: this one for local targets, python3 on others)",
    )  # fmt: skip
    p.add_argument(
        "--pki", default="",
        help="credentials folder (fleetlora broker init-ca): its CA, the device's password and the "
        "coordinator's announcement key are copied, unless given one by one",
    )  # fmt: skip
    p.add_argument(
        "--keys", default="", help="key ring folder (fleetlora devices enroll --keys): KEYS/ID.key"
    )
    for key in ("password-file", "ca-file", "cert-file", "key-file"):
        p.add_argument(f"--{key}", default="", help=f"{key.replace('-', ' ')} to copy to the device")
    p.add_argument("--hmac-key-file", default="", help="key file signing this device's updates, to copy")
    p.add_argument(
        "--coordinator-key-file", default="", help="key file verifying the coordinator's announcements"
    )
    g = p.add_argument_group("building a missing bundle (see fleetlora export)")
    g.add_argument("--model", default="minilm", help="registered model")
    g.add_argument("--family", default="lora", choices=("lora", "ravan"), help="adapter family")
    g.add_argument("--rank", type=positive_int, default=8, help="LoRA rank / Ravan budget rank")
    g.add_argument("--heads", type=positive_int, default=4, help="Ravan heads")
    g.add_argument("--num-classes", type=positive_int, default=0, help="classes (needed to build)")
    g.add_argument("--seq-len", type=positive_int, default=64, help="static sequence length")
    g.add_argument("--xnnpack", action="store_true", help="delegate to XNNPACK")


def _bundle(args: argparse.Namespace) -> object:
    from export.bundle import MANIFEST_JSON, BundleError, load_bundle

    folder = Path(args.bundle or f"bundles/{args.model}-{args.family}")
    if (folder / MANIFEST_JSON).is_file():
        try:
            return load_bundle(folder)
        except BundleError as e:
            raise CliError(str(e)) from e
    if not args.num_classes:
        raise CliError(f"no bundle at {folder}; give --num-classes to build one (or fleetlora export)")
    if args.dry_run:
        raise CliError(f"no bundle at {folder}; --dry-run does not build one (run fleetlora export first)")
    from export.build import build_bundle
    from export.spec import AdapterSpec

    spec = AdapterSpec(family=args.family, rank=args.rank, heads=args.heads)
    print(f"building {folder}")
    bundle, _ = build_bundle(
        args.model,
        spec,
        num_classes=args.num_classes,
        seq_len=args.seq_len,
        out=folder,
        xnnpack=args.xnnpack,
        log=print,
    )
    return bundle


def credentials(args: argparse.Namespace) -> dict[str, str]:
    """The credential files to copy: those given one by one, the rest from ``--pki`` and ``--keys``."""
    from coordinator.broker_credentials import CredentialPaths
    from devices.flash import CREDENTIAL_KEYS

    given = {key: getattr(args, key) for key in CREDENTIAL_KEYS if getattr(args, key)}
    found: dict[str, Path] = {}
    if (args.pki or args.keys) and not args.client_id:
        raise CliError("--pki and --keys need --client-id (the enrolled device name)")
    if args.pki:
        paths = CredentialPaths(Path(args.pki))
        found = {"ca_file": paths.ca_cert, "password_file": paths.password_of(args.client_id)}
        if paths.announce_key.is_file():
            found["coordinator_key_file"] = paths.announce_key
    if args.keys:
        found["hmac_key_file"] = Path(args.keys) / f"{args.client_id}.key"
    enroll = (
        f"fleetlora devices enroll {args.client_id} --pki {args.pki or 'PKI'} --keys {args.keys or 'KEYS'}"
    )
    for key, path in found.items():
        if key in given:
            continue
        if not path.is_file():
            raise CliError(f"{path} not found: is {args.client_id} enrolled? `{enroll}`")
        given[key] = str(path)
    return given


def client_id(args: argparse.Namespace, creds: dict[str, str]) -> str:
    """``--client-id``, else the enrolled name its password file is named after; they must agree."""
    password = creds.get("password_file", "")
    named = Path(password).name.removesuffix(".password") if password.endswith(".password") else ""
    if args.client_id and named and named != args.client_id:
        raise CliError(
            f"--client-id {args.client_id} but the password file {password} is {named}'s: the broker "
            f"would refuse {args.client_id} with it"
        )
    cid = args.client_id or named
    if not cid:
        raise CliError("give --client-id (the device's enrolled name) or --password-file (NAME.password)")
    return cid


def run(args: argparse.Namespace) -> int:
    from devices.flash import ClientConfig, FlashError, Target, flash
    from devices.profiles import ProfileError, load_profile

    try:
        target = Target.parse(args.target)
        load_profile(args.device)
    except (FlashError, ProfileError) as e:
        raise CliError(str(e)) from e
    if bool(args.data) == bool(args.dataset):
        raise CliError(
            "give --data (the device's own examples) or --dataset (a built-in demo set), one of them"
        )
    creds = credentials(args)
    cid = client_id(args, creds)
    ca = creds.get("ca_file")
    url = broker_url(args.broker, ca)
    if url.startswith("mqtts://") and "coordinator_key_file" not in creds:
        log.warning(
            "%s: no --coordinator-key-file: the device will not verify the coordinator's announcements", cid
        )
    bundle = _bundle(args)
    python = args.python or (sys.executable if target.kind == "local" else "python3")
    try:
        config = ClientConfig(
            broker=url, run_id=args.run_id, client_id=cid, device=args.device, backend=args.backend,
            credentials=creds, data=args.data, dataset=args.dataset, python=python,
        )  # fmt: skip
        flash(bundle, config, target, dry_run=args.dry_run)  # type: ignore[arg-type]
    except FlashError as e:
        raise CliError(str(e)) from e
    return 0
