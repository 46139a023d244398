"""``fleetlora data``: write a built-in data set as device data files (a label-skewed split), for demos."""

from __future__ import annotations

import argparse

from fleetlora.cli import CliError, as_list, positive_int

NAME = "data"
HELP = "write a built-in data set as per-device data files (Dirichlet label skew) + a held-out test file"
ORDER = 44
EXAMPLES = """\
fleetlora data split --dataset reuters8 --devices dev1,dev2,dev3 --alpha 0.5 --out data/
fleetlora data split --dataset trec6 --devices 10 --alpha 0.1 --out data/trec   # dev0 ... dev9
fleetlora data split --dataset reuters8 --devices a,b --iid --max-examples 500 --out /tmp/d"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser(
        "split",
        help="DIR/NAME.jsonl for each device, DIR/test.jsonl (the held-out split), DIR/labels.txt",
        description="Split a built-in data set's training examples over devices as JSON-lines files "
        '({"text": ..., "label": ...} a line, the format of `fleetlora client --data`), the way the '
        "simulator splits them (same alpha and seed: the same examples per client).",
    )
    p.add_argument("--dataset", default="reuters8", help="built-in data set (reuters8, 20news, trec6)")
    p.add_argument("--devices", required=True, help="device names, comma-separated, or how many (dev0 ...)")
    p.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet concentration: small = few labels each"
    )
    p.add_argument("--iid", action="store_true", help="an IID split instead of the Dirichlet one")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (the simulator's --seed)")
    p.add_argument("--max-examples", type=int, default=0, help="keep at most this many per device (0 = all)")
    p.add_argument("--out", required=True, help="folder to write")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from export.data import DataError, load_text_dataset
    from export.local_data import write_jsonl
    from sim.partition import dirichlet_partition, iid_partition

    names = as_list(args.devices)
    if len(names) == 1 and names[0].isdigit():
        names = [f"dev{i}" for i in range(positive_int(names[0]))]
    if len(set(names)) != len(names):
        raise CliError(f"--devices names a device twice: {names}")
    try:
        data = load_text_dataset(args.dataset)
    except DataError as e:
        raise CliError(str(e)) from e
    try:
        parts = (
            iid_partition(len(data.train_labels), len(names), args.seed)
            if args.iid
            else dirichlet_partition(data.train_labels, len(names), args.alpha, args.seed)
        )
    except ValueError as e:
        raise CliError(str(e)) from e
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "labels.txt").write_text("".join(f"{c}\n" for c in data.classes))
    for name, part in zip(names, parts, strict=True):
        idx = part[: args.max_examples] if args.max_examples > 0 else part
        labels = [data.classes[data.train_labels[i]] for i in idx]
        write_jsonl(out / f"{name}.jsonl", [data.train_texts[i] for i in idx], labels)
        counts = ", ".join(f"{c} {labels.count(c)}" for c in data.classes if labels.count(c))
        print(f"{out / f'{name}.jsonl'}: {len(idx)} examples ({counts})")
    test_labels = [data.classes[i] for i in data.test_labels]
    write_jsonl(out / "test.jsonl", data.test_texts, test_labels)
    print(f"{out / 'test.jsonl'}: {len(test_labels)} held-out examples; label names in {out / 'labels.txt'}")
    return 0
