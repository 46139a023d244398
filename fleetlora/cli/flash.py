"""``fleetlora flash``: put a bundle, a device's data and its client config on a device (folder, ssh, adb).

With the native runtime (the default where its binary is built or can be built, for a built-in data
set) the device needs no Python: the folder gets ``bin/fleetlora-client`` for the target's
architecture, the device's budget table (``plan.json``) and its tokenized local data
(``data.safetensors``). A device's own ``--data`` files are read by the Python client.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from fleetlora.cli import CliError, DeprecatedAlias, positive_int
from fleetlora.cli._deploy import broker_url

log = logging.getLogger(__name__)

NAME = "flash"
HELP = "copy a bundle + the device's data + client (native or Python) + config + run-client.sh to a device"
EXAMPLES = """\
fleetlora flash --profile raspberry_pi_5_8gb --run demo --bundle bundles/r8 --pki pki --keys keys \\
    --client-id dev1 --data data/dev1.jsonl --target local:devices/dev1
fleetlora flash --profile jetson_orin_nano_8gb --run demo --bundle bundles/r8 --pki pki --keys keys \\
    --client-id jetson-01 --data my.csv --broker mqtts://10.0.0.5:8883 --target ssh:nvidia@jetson-01:/opt/fl
fleetlora flash --profile raspberry_pi_5_8gb --run demo --bundle bundles/r8 --client-id pi-1 \\
    --dataset reuters8 --shard 0/3 --arch aarch64 --target ssh:pi@10.0.0.7:/opt/fl --dry-run
fleetlora flash --profile pixel_8 --run demo --bundle bundles/r8 --client-id phone-1 --dataset trec6 \\
    --runtime python --target adb:/data/local/tmp/fleetlora --dry-run
fleetlora flash --profile ./board.toml --run demo --bundle bundles/r8 --client-id b1 --target local:/tmp/b1"""
ORDER = 45


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        default="",
        help="device profile (required): a shipped name (fleetlora devices list) or a .toml",
    )
    p.add_argument(
        "--device", dest="profile", action=DeprecatedAlias, use="--profile",
        why="as in fleetlora client; --device is where the math runs in fleetlora coordinator serve",
    )  # fmt: skip
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
        help="broker URL the client connects to: mqtts://HOST:PORT, or wss://HOST[:PORT]/PATH through an "
        "HTTPS-only network (default: the one `broker run --dir` recorded beside the CA, "
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
    n = p.add_argument_group("the client that runs on the device")
    n.add_argument(
        "--runtime", default="auto", choices=("auto", "native", "python"),
        help="native: the C++ client, no Python on the device; python: fleetlora client; "
        "auto (default): native where its binary is built or can be built here",
    )  # fmt: skip
    n.add_argument("--arch", default="", help="the device's CPU, x86_64 or aarch64 (default: this machine's)")
    n.add_argument("--shard", default="0/1", help="native: this device's share of the data set, K/N")
    n.add_argument("--max-examples", type=int, default=0, help="native: keep at most this many examples")
    n.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="native: largest local batch (0: 16, or the bundle's largest)",
    )
    n.add_argument("--local-steps", type=int, default=0, help="native: fixed local steps (0: the budget's)")
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
    from broker.credentials import CredentialPaths
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
    from devices.flash import NATIVE_STATE_FILE, ClientConfig, FlashError, Target, flash
    from devices.profiles import ProfileError, load_profile

    if not args.profile:
        raise CliError(
            "give --profile: the device's profile, a shipped name (fleetlora devices list) or a .toml"
        )
    try:
        target = Target.parse(args.target)
        load_profile(args.profile)
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
    if url.startswith(("mqtts://", "wss://")) and "coordinator_key_file" not in creds:
        log.warning(
            "%s: no --coordinator-key-file: the device will not verify the coordinator's announcements", cid
        )
    python = args.python or (sys.executable if target.kind == "local" else "python3")
    try:
        bundle = _bundle(args)
        if url.startswith(("ws://", "wss://")):  # libmosquitto (the native client) speaks TCP only
            if args.runtime == "native":
                raise CliError(
                    f"--broker {url}: the native client (libmosquitto) speaks MQTT over TCP only; flash "
                    "the Python client (--runtime python) for WebSockets, or give the broker's mqtts:// "
                    "address"
                )
            if args.runtime == "auto":
                print("runtime: python (MQTT over WebSockets: the native client speaks TCP only)")
                args.runtime = "python"
        native = _native_runtime(args, target)
        if native and not args.batch_size:
            args.batch_size = min(16, bundle.info.batch_max)  # type: ignore[attr-defined]
        config = ClientConfig(
            broker=url, run_id=args.run_id, client_id=cid, device=args.profile, backend=args.backend,
            credentials=creds, data=args.data, dataset=args.dataset, python=python,
            state_file=NATIVE_STATE_FILE if native else "",
            batch_size=args.batch_size if native else 0,
            local_steps=args.local_steps if native else 0,
        )  # fmt: skip
        files = _native_files(args, bundle, native, cid) if native else None
        flash(bundle, config, target, dry_run=args.dry_run, native=files)  # type: ignore[arg-type]
    except FlashError as e:
        raise CliError(str(e)) from e
    return 0


def _native_runtime(args: argparse.Namespace, target: object) -> str:
    """The architecture to flash the native client for, or "" for the Python client."""
    from devices import native

    if args.runtime == "python":
        return ""
    if args.data:  # text files: the Python client reads and tokenizes them on the device
        if args.runtime == "native":
            raise CliError(
                "--runtime native reads a tokenized built-in data set (--dataset, --shard); a device's own "
                "--data files are read by the Python client: use --runtime python (or auto)"
            )
        print("runtime: python (the device's own --data files are read by the Python client)")
        return ""
    if getattr(target, "kind", "") == "adb":
        if args.runtime == "native":
            raise CliError(
                "--runtime native for adb: the Android build is not made here (native/README.md: the same "
                "C++ core with the NDK, or ExecuTorch's Android training API); use --runtime python"
            )
        return ""
    arch = args.arch or native.host_arch()
    if not args.arch and getattr(target, "kind", "") == "ssh":
        print(f"note: no --arch given: flashing the {arch} build (--arch aarch64: a Raspberry Pi, a Jetson)")
    try:
        st = native.status(arch)
    except native.NativeError as e:
        raise CliError(str(e)) from e
    if not st.available:
        if args.runtime == "native":
            raise CliError(st.reason())
        print(f"runtime: python ({st.reason()})")
        return ""
    print(f"runtime: native, {arch} ({'reusing' if st.built else 'building'} {st.build_dir})")
    return arch


def _native_files(args: argparse.Namespace, bundle: object, arch: str, client_id: str) -> object:
    """The binary for ``arch`` (built if needed) and the device's plan.json and data.safetensors."""
    from devices import native
    from devices.flash import NativeFiles

    if args.dry_run:
        print(
            f"would copy {native.build_dir(arch)}/{native.BINARY} and its libraries to bin/, write plan.json "
            f"(the budget table of {args.profile}) and data.safetensors ({args.dataset} shard {args.shard})"
        )
        return NativeFiles(runtime=[], files={})
    try:
        folder = native.build(arch, log=print)
        runtime = native.runtime_files(folder)
    except native.NativeError as e:
        raise CliError(str(e)) from e
    plan, data = device_files(args, bundle, client_id)
    return NativeFiles(runtime=runtime, files={"plan.json": plan, "data.safetensors": data})


def device_files(args: argparse.Namespace, bundle: Any, client_id: str) -> tuple[bytes, bytes]:
    """``(plan.json, data.safetensors)`` of a device: its budget table and its tokenized examples."""
    import json

    import safetensors.torch

    from devices.profiles import load_profile
    from edge_client.budget import BudgetError, ProfileError
    from edge_client.plan_table import plan_table
    from edge_client.planner import model_cost
    from export.adapters import attach
    from export.data import DataError, load_text_dataset, tokenize_cached
    from export.models import ModelError, build_model
    from fleetlora.cli.client import local_indices

    info = bundle.info
    if args.batch_size > info.batch_max:
        raise CliError(f"--batch-size {args.batch_size} exceeds the bundle's largest batch {info.batch_max}")
    try:
        profile = load_profile(args.profile)
        model, tokenizer = build_model(info.model, info.num_classes, seed=info.model_seed)
        model = attach(model, bundle.spec)
        cost = model_cost(model, bundle.spec, info.seq_len)
        steps, batch = args.local_steps, args.batch_size
        table = plan_table(profile, cost, bundle.spec, local_steps=steps, max_batch=batch)
        dataset = load_text_dataset(args.dataset)
        train, _ = tokenize_cached(dataset, tokenizer, info.seq_len)
    except (ProfileError, BudgetError, ModelError, DataError) as e:
        raise CliError(str(e)) from e
    if len(dataset.classes) != info.num_classes:
        raise CliError(
            f"--dataset {args.dataset} has {len(dataset.classes)} classes, the bundle's {info.num_classes}"
        )
    idx = local_indices(len(train), args.shard, 0, args.max_examples)
    if not idx:
        raise CliError(f"shard {args.shard} of {args.dataset} holds no examples")
    index = torch_index(idx)
    data = safetensors.torch.save(
        {
            "input_ids": train.input_ids[index].long().contiguous(),
            "attention_mask": train.attention_mask[index].long().contiguous(),
            "labels": train.labels[index].long().contiguous(),
        },
        {"dataset": args.dataset, "shard": args.shard, "client": client_id},
    )
    rows = table["rows"]
    print(
        f"plan.json: {len(rows)} budget rows for {profile.name} (at {rows[0]['min_round_s']:.0f} s left: "
        f"{rows[0]['local_steps']} steps of {rows[0]['batch_size']}); data.safetensors: {len(idx)} examples "
        f"of {args.dataset} shard {args.shard}"
    )
    return (json.dumps(table, indent=1) + "\n").encode(), data


def torch_index(indices: list[int]) -> Any:
    import torch

    return torch.tensor(indices, dtype=torch.long)
