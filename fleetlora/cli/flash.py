"""``fleetlora flash``: put a bundle and a client config on a device (folder, ssh host, adb phone).

With the native runtime (the default where its binary is built or can be built) the device needs no
Python: the folder gets ``bin/fleetlora-client`` for the target's architecture, the device's budget
table (``plan.json``) and its tokenized local data (``data.safetensors``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fleetlora.cli import CliError, positive_int

NAME = "flash"
HELP = "copy a bundle + client (native binary or Python) + config + run-client.sh to a device"
EXAMPLES = """\
fleetlora flash --device jetson_orin_nano_8gb --bundle bundles/minilm-lora --target local:/tmp/dev1
fleetlora flash --device raspberry_pi_5_8gb --bundle bundles/minilm-lora --arch aarch64 \\
    --target ssh:pi@10.0.0.7:/opt/fleetlora --dry-run       # cross-compiled native client, no Python
fleetlora flash --device pixel_8 --runtime python --bundle bundles/minilm-lora \\
    --target adb:/data/local/tmp/fleetlora --dry-run
fleetlora flash --device raspberry_pi_5_8gb --bundle bundles/new --model minilm --num-classes 8 \\
    --dataset reuters8 --shard 0/3 --target local:/tmp/d2"""
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
    n = p.add_argument_group("the client that runs on the device")
    n.add_argument(
        "--runtime", default="auto", choices=("auto", "native", "python"),
        help="native: the C++ client, no Python on the device; python: fleetlora client; "
        "auto (default): native where its binary is built or can be built here",
    )  # fmt: skip
    n.add_argument("--arch", default="", help="the device's CPU, x86_64 or aarch64 (default: this machine's)")
    n.add_argument("--dataset", default="trec6", help="native: local data set tokenized onto the device")
    n.add_argument("--shard", default="0/1", help="native: this device's share of the data set, K/N")
    n.add_argument("--max-examples", type=int, default=0, help="native: keep at most this many examples")
    n.add_argument("--batch-size", type=positive_int, default=16, help="native: largest local batch")
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


def run(args: argparse.Namespace) -> int:
    from devices.flash import CREDENTIAL_KEYS, NATIVE_STATE_FILE, ClientConfig, FlashError, Target, flash

    try:
        target = Target.parse(args.target)
        bundle = _bundle(args)
        native = _native_runtime(args, target)
        creds = {key: getattr(args, key) for key in CREDENTIAL_KEYS if getattr(args, key)}
        config = ClientConfig(
            broker=args.broker,
            run_id=args.run_id,
            client_id=args.client_id or Path(args.device).stem,
            device=args.device,
            backend=args.backend,
            credentials=creds,
            state_file=NATIVE_STATE_FILE if native else "",
            batch_size=args.batch_size if native else 0,
            local_steps=args.local_steps if native else 0,
        )
        files = _native_files(args, bundle, native, config.client_id) if native else None
        flash(bundle, config, target, dry_run=args.dry_run, native=files)  # type: ignore[arg-type]
    except FlashError as e:
        raise CliError(str(e)) from e
    return 0


def _native_runtime(args: argparse.Namespace, target: object) -> str:
    """The architecture to flash the native client for, or "" for the Python client."""
    from devices import native

    if args.runtime == "python":
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
            f"(the budget table of {args.device}) and data.safetensors ({args.dataset} shard {args.shard})"
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
    from edge_client.plan_table import model_cost, plan_table
    from export.adapters import attach
    from export.data import DataError, load_text_dataset, tokenize_cached
    from export.models import ModelError, build_model
    from fleetlora.cli.client import local_indices

    info = bundle.info
    if args.batch_size > info.batch_max:
        raise CliError(f"--batch-size {args.batch_size} exceeds the bundle's largest batch {info.batch_max}")
    try:
        profile = load_profile(args.device)
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
