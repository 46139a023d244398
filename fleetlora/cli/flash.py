"""``fleetlora flash``: put a bundle and a client config on a device (folder, ssh host, adb phone)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fleetlora.cli import CliError, positive_int

NAME = "flash"
HELP = "copy a bundle + client config + run-client.sh to a device (local folder, ssh, adb)"
EXAMPLES = """\
fleetlora flash --device jetson-orin-nano --bundle bundles/minilm-lora --target local:/tmp/dev1
fleetlora flash --device rpi5 --bundle bundles/minilm-lora --target ssh:pi@10.0.0.7:/opt/fleetlora --dry-run
fleetlora flash --device pixel-8 --bundle bundles/minilm-lora --target adb:/data/local/tmp/fleetlora --dry-run
fleetlora flash --device pi5 --bundle bundles/new --model minilm --num-classes 8 --target local:/tmp/d2"""
ORDER = 45


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", required=True, help="device profile name or path (recorded in client.toml)")
    p.add_argument("--target", required=True, help="local:DIR | ssh:user@host:/path | adb:/path")
    p.add_argument("--bundle", default="", help="bundle folder to reuse, or to build when missing")
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be copied and run; change nothing"
    )
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="broker URL the client connects to")
    p.add_argument("--run-id", default="run0", help="federated run id")
    p.add_argument("--client-id", default="", help="client id (default: the device profile's name)")
    p.add_argument("--backend", default="executorch", choices=("executorch", "eager"), help="trainer backend")
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


def run(args: argparse.Namespace) -> int:
    from devices.flash import CREDENTIAL_KEYS, ClientConfig, FlashError, Target, flash

    try:
        target = Target.parse(args.target)
        bundle = _bundle(args)
        creds = {key: getattr(args, key) for key in CREDENTIAL_KEYS if getattr(args, key)}
        config = ClientConfig(
            broker=args.broker,
            run_id=args.run_id,
            client_id=args.client_id or Path(args.device).stem,
            device=args.device,
            backend=args.backend,
            credentials=creds,
        )
        flash(bundle, config, target, dry_run=args.dry_run)  # type: ignore[arg-type]
    except FlashError as e:
        raise CliError(str(e)) from e
    return 0
