"""``fleetlora devices``: the device profiles, the device mixes, the budgets they get, and enrolment.

Each action is one function registered with :func:`action`, which declares its arguments, so a new
action (``enroll``) is one decorated function.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fleetlora.cli import CliError, as_list, non_negative_float, positive_int

NAME = "devices"
HELP = "list and show the device profiles and mixes, and the round budget each device gets"
ORDER = 60
EXAMPLES = """fleetlora devices list
fleetlora devices list --mix right_skewed
fleetlora devices show pixel_8
fleetlora devices show path/to/my_phone.toml
fleetlora devices mixes
fleetlora devices budget --deadline 30 --rank 8 --heads 4
fleetlora devices budget --family ravan --profiles galaxy_a14,jetson_agx_orin_64gb --seq-len 128
fleetlora devices enroll jetson-01 --pki ./pki --keys ./keys"""

Argument = tuple[tuple[str, ...], dict[str, Any]]


@dataclass(frozen=True)
class Action:
    """One ``fleetlora devices ACTION``: its help, examples, arguments and the function that runs it."""

    name: str
    help: str
    examples: str
    arguments: tuple[Argument, ...]
    run: Callable[[argparse.Namespace], int]


ACTIONS: dict[str, Action] = {}


def arg(*flags: str, **kwargs: Any) -> Argument:
    """An ``add_argument`` call, recorded for :func:`action`."""
    return flags, kwargs


def action(
    name: str, help: str, *arguments: Argument, examples: str = ""
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated function as the action ``name`` with these arguments."""

    def register(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        ACTIONS[name] = Action(name, help, examples, arguments, func)
        return func

    return register


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for act in ACTIONS.values():
        p = sub.add_parser(
            act.name,
            help=act.help,
            description=act.help,
            epilog="examples:\n" + "\n".join(f"  {line}" for line in act.examples.splitlines()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # Also accepted after the action; SUPPRESS keeps an absent one from hiding `devices --config X`.
        p.add_argument(
            "--config", metavar="TOML", default=argparse.SUPPRESS, help="run config (keys = flags)"
        )
        for flags, kwargs in act.arguments:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(_action=act.run)


def run(args: argparse.Namespace) -> int:
    return int(args._action(args))


def _looks_numeric(cell: Any) -> bool:
    return isinstance(cell, int | float) or (isinstance(cell, str) and cell[:1] in "-0123456789")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: text columns left-aligned, numbers right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_looks_numeric(row[i]) for row in rows) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _load(name: str) -> Any:
    from devices.profiles import ProfileError, load_profile

    try:
        return load_profile(name)
    except ProfileError as e:
        raise CliError(str(e)) from None


@action(
    "list",
    "a table of the shipped profiles (or of one mix, with its weights)",
    arg("--mix", metavar="NAME", help="only the profiles of this mix, with their share of the fleet"),
    examples="fleetlora devices list\nfleetlora devices list --mix default",
)
def list_action(args: argparse.Namespace) -> int:
    from devices.profiles import ProfileError, list_profiles, load_mix

    try:
        entries = load_mix(args.mix) if args.mix else [(n, 0.0) for n in list_profiles()]
    except ProfileError as e:
        raise CliError(str(e)) from None
    total = sum(w for _, w in entries)
    headers = ["name", "kind", "GFLOP/s", "memory MiB", "up Mbps", "down Mbps", "availability", "dropout"]
    rows: list[list[Any]] = []
    for name, weight in entries:
        p = _load(name)
        row: list[Any] = [
            p.name,
            p.kind,
            p.train_gflops,
            round(p.train_memory_mb),
            p.uplink_mbps,
            p.downlink_mbps,
        ]
        row += [p.availability, p.dropout]
        if args.mix:
            row.append(round(weight / total, 3))
        rows.append(row)
    print(format_table([*headers, "share"] if args.mix else headers, rows))
    return 0


@action(
    "show",
    "every figure of one profile with its source",
    arg("name", metavar="NAME", help="a shipped profile name (see 'list') or a path to a profile .toml"),
    examples="fleetlora devices show jetson_orin_nano_8gb\nfleetlora devices show ./my_phone.toml",
)
def show_action(args: argparse.Namespace) -> int:
    from dataclasses import fields

    p = _load(args.name)
    print(f"{p.name} ({p.kind}): {p.description}" if p.description else f"{p.name} ({p.kind})")
    rows = []
    for f in fields(p):
        if f.name in ("name", "kind", "description", "sources"):
            continue
        value = getattr(p, f.name)
        rows.append([f.name, "-" if value is None else str(value), p.sources.get(f.name, "-")])
    print(format_table(["figure", "value", "source"], rows))
    return 0


@action(
    "mixes",
    "the named device mixes and their weights",
    examples="fleetlora devices mixes",
)
def mixes_action(args: argparse.Namespace) -> int:
    from devices.profiles import list_mixes, load_mix

    for name in list_mixes():
        entries = load_mix(name)
        total = sum(w for _, w in entries)
        print(f"{name}: " + ", ".join(f"{p} {w / total:.2f}" for p, w in entries))
    return 0


def _fraction(text: str) -> float:
    value = non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _int_list(text: Any) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in as_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# all-MiniLM-L6-v2: 22.7M parameters, 11.9M of them in its embedding tables (30522 + 512 + 2 rows of
# 384), 6 layers of width 384 with 12 attention heads; LoRA on query/key/value: 18 modules of 384 x 384;
# a mean-pool head for 8 classes (Reuters-R8): 384 x 8 + 8.
_MINILM = {
    "model_params": 22_700_000,
    "embedding_params": (30522 + 512 + 2) * 384,
    "hidden": 384,
    "layers": 6,
    "attention_heads": 12,
    "adapted_scalars_per_rank": 18 * (384 + 384),
    "extra_trainable_scalars": 384 * 8 + 8,
}


@action(
    "budget",
    "the budget (steps, batch, rank, heads, times) each profile gets for one model and round policy",
    arg("--profiles", metavar="A,B", help="profile names or paths, comma-separated (default: all shipped)"),
    arg("--model-params", type=positive_int, default=_MINILM["model_params"], help="frozen base parameters"),
    arg("--embedding-params", type=int, default=_MINILM["embedding_params"], help="of which embeddings"),
    arg("--seq-len", type=positive_int, default=64, help="tokens per example"),
    arg("--hidden", type=positive_int, default=_MINILM["hidden"], help="model width"),
    arg("--layers", type=positive_int, default=_MINILM["layers"], help="transformer blocks"),
    arg("--attention-heads", type=positive_int, default=_MINILM["attention_heads"], help="attention heads"),
    arg(
        "--adapted-scalars-per-rank",
        type=positive_int,
        default=_MINILM["adapted_scalars_per_rank"],
        help="sum of (d_in + d_out) over adapted modules (default: MiniLM query/key/value)",
    ),
    arg(
        "--extra-trainable-scalars",
        type=int,
        default=_MINILM["extra_trainable_scalars"],
        help="trainable scalars sent besides the adapter (default: an 8-class head)",
    ),
    arg("--family", choices=("lora", "ravan"), default="lora", help="which payload the transfers carry"),
    arg("--rank", type=positive_int, default=8, help="the adapter spec's (maximum) LoRA rank"),
    arg("--rank-choices", type=_int_list, default=(2, 4, 8, 16), help="ranks weaker devices may train"),
    arg("--heads", type=positive_int, default=4, help="the spec's number of Ravan heads"),
    arg("--max-steps", type=positive_int, default=20, help="local steps of the strongest devices"),
    arg("--min-steps", type=positive_int, default=1, help="local steps every device does"),
    arg("--max-batch", type=positive_int, default=16, help="largest batch size"),
    arg("--deadline", type=non_negative_float, default=30.0, help="round deadline in seconds"),
    arg("--reference-gflops", type=non_negative_float, default=100.0, help="throughput for full rank/heads"),
    arg("--max-upload-fraction", type=_fraction, default=0.25, help="upload share of the deadline"),
    examples=(
        "fleetlora devices budget\n"
        "fleetlora devices budget --deadline 60 --max-steps 50\n"
        "fleetlora devices budget --family ravan --heads 8 --profiles galaxy_a14,pixel_8"
    ),
)
def budget_action(args: argparse.Namespace) -> int:
    from devices.profiles import list_profiles
    from edge_client.budget import BudgetError, BudgetPolicy, ModelCost, compute_budget

    try:
        cost = ModelCost.estimate(
            args.model_params,
            args.seq_len,
            args.hidden,
            args.layers,
            args.adapted_scalars_per_rank,
            attention_heads=args.attention_heads,
            embedding_params=args.embedding_params,
            extra_trainable_scalars=args.extra_trainable_scalars,
            ravan_rank=args.rank,
            ravan_heads=args.heads,
        )
        policy = BudgetPolicy(
            max_steps=args.max_steps,
            min_steps=args.min_steps,
            max_batch=args.max_batch,
            max_rank=args.rank,
            rank_choices=tuple(args.rank_choices),
            max_heads=args.heads,
            target_round_s=args.deadline,
            reference_gflops=args.reference_gflops,
            family=args.family,
            max_upload_fraction=args.max_upload_fraction,
        )
    except BudgetError as e:
        raise CliError(str(e)) from None
    print(
        f"model: {cost.train_flops_per_example / 1e9:.2f} GFLOP per example, frozen base "
        f"{cost.base_memory_mb:.0f} MiB, activations {cost.activation_mb_per_example:.1f} MiB per example, "
        f"{cost.adapter_bytes_per_rank / 1024:.1f} KiB per rank, "
        f"{cost.adapter_bytes_per_head / 1024:.1f} KiB per head; deadline {policy.target_round_s:g} s"
    )
    names = as_list(args.profiles) if args.profiles else list_profiles()
    headers = [
        "name",
        "steps",
        "batch",
        "rank",
        "heads",
        "compute s",
        "up s",
        "down s",
        "round s",
        "energy J",
    ]
    rows: list[list[Any]] = []
    unfit = []
    for name in names:
        profile = _load(name)
        try:
            b = compute_budget(profile, cost, policy)
        except BudgetError as e:
            unfit.append(str(e))
            continue
        energy = "-" if b.energy_j is None else f"{b.energy_j:.1f}"
        late = "" if b.fits_deadline else " (late)"
        times = [f"{b.compute_s:.2f}", f"{b.upload_s:.2f}", f"{b.download_s:.2f}", f"{b.round_s:.1f}{late}"]
        rows.append([profile.name, b.local_steps, b.batch_size, b.rank, b.heads, *times, energy])
    if rows:
        print(format_table(headers, rows))
    for reason in unfit:
        print(f"cannot train: {reason}")
    return 0


@action(
    "enroll",
    "create a device's broker credentials (password, certificate), its ACL entry and its update key; "
    "the first enrolment also creates the coordinator's credentials and announcement key",
    arg(
        "name", metavar="NAME", help="device name: its MQTT client id, username, certificate CN, topic level"
    ),
    arg("--pki", required=True, metavar="DIR", help="credentials directory (fleetlora broker init-ca DIR)"),
    arg("--keys", metavar="DIR", help="the coordinator's key ring folder: NAME.key (HMAC of its updates)"),
    arg(
        "--coordinator",
        action="store_true",
        help="enrol NAME as a coordinator (publishes global, reads updates); the first device enrolment "
        "creates one named 'coordinator' by itself",
    ),
    examples=(
        "fleetlora devices enroll jetson-01 --pki ./pki --keys ./keys\n"
        "for d in dev1 dev2 dev3; do fleetlora devices enroll $d --pki pki --keys keys; done\n"
        "fleetlora devices enroll coord-2 --pki ./pki --coordinator"
    ),
)
def enroll_action(args: argparse.Namespace) -> int:
    import secrets
    import sys
    from pathlib import Path

    from broker.credentials import (
        COORDINATOR,
        BrokerError,
        CredentialPaths,
        add_device,
        check_name,
    )
    from broker.credentials import ensure_coordinator as make_coordinator
    from protocol.keys import KEY_SUFFIX, write_key

    try:
        check_name(args.name)
        if args.name == COORDINATOR and not args.coordinator:
            raise BrokerError(
                f"{COORDINATOR!r} is the coordinator's name (the first enrolment creates it): give the "
                "device another name, or enrol a coordinator with --coordinator"
            )
        key_file = Path(args.keys) / f"{args.name}{KEY_SUFFIX}" if args.keys else None
        if key_file is not None and key_file.exists():
            raise BrokerError(f"{key_file} already exists: device {args.name!r} is enrolled")
        creds = add_device(args.pki, args.name, role="coordinator" if args.coordinator else "device")
    except BrokerError as e:
        raise CliError(str(e)) from None
    coordinator = announce = None
    try:
        coordinator, announce = make_coordinator(args.pki)
    except BrokerError as e:
        print(f"warning: {e}", file=sys.stderr)
    # Paths only: the password and the keys never reach the terminal or a log.
    print(f"enrolled {creds.username}: password in {creds.password_file}, certificate {creds.cert}")
    if key_file is not None:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        write_key(key_file, secrets.token_bytes(32))
        print(f"update key in {key_file} (to the device with: fleetlora flash --keys {key_file.parent})")
    if coordinator is not None:
        print(f"enrolled the coordinator too: password in {coordinator.password_file}")
    if announce is not None:
        print(f"the coordinator's announcement key in {announce} (devices verify announcements with it)")
    paths = CredentialPaths(Path(args.pki))
    print(
        f"a running broker picks the new password and ACL up on SIGHUP (or a restart); "
        f"next: fleetlora flash --pki {paths.root} --client-id {args.name} ..."
        if not args.coordinator
        else "a running broker picks the new password and ACL up on SIGHUP (or a restart)"
    )
    return 0
