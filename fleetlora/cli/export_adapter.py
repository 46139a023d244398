"""``fleetlora export-adapter``: the trained global of a coordinator's state folder as a PEFT folder."""

from __future__ import annotations

import argparse

NAME = "export-adapter"
HELP = "write a round's global adapter from a coordinator state folder as a PEFT adapter folder + labels"
ORDER = 41
EXAMPLES = """\
fleetlora export-adapter --state state/ --out my-adapter/              # the latest round's global
fleetlora export-adapter --state state/ --out round3/ --round 3        # the global after round 3
fleetlora export-adapter --state state/ --out my-adapter/ --infer-pte  # + infer.pte, adapter merged
fleetlora export-adapter --state state/ --list                          # which rounds are kept"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", required=True, help="the coordinator's --state-dir")
    p.add_argument("--out", default="", help="adapter folder to write (PEFT files + fleetlora.json)")
    p.add_argument("--round", type=int, help="the global after this many rounds (default: the latest kept)")
    p.add_argument(
        "--infer-pte", action="store_true", help="also write infer.pte: an ExecuTorch program, adapter merged"
    )
    p.add_argument("--list", action="store_true", help="list the rounds whose global is kept, with metrics")


def _list(state: str) -> int:
    from pathlib import Path

    from coordinator.metrics import read_metrics
    from coordinator.store import RoundStore

    path = Path(state)
    if not (path / "state.json").is_file():
        from fleetlora.cli import CliError

        raise CliError(f"{path} is not a coordinator state folder (no state.json)")
    kept = sorted(n - 1 for n in RoundStore(path, sync=False).globals())
    rounds = {}
    if (path / "metrics.jsonl").is_file():
        rounds = {r["round"]: r for r in read_metrics(path / "metrics.jsonl") if r["event"] == "round"}
    for n in kept:
        r = rounds.get(n, {})
        later = rounds.get(n + 1, {})  # the next round's devices evaluated this global
        figures = [
            f"eval-data accuracy {r['eval_accuracy']:.3f}" if "eval_accuracy" in r else "",
            f"devices' accuracy {later['fed_eval_accuracy']:.3f}" if "fed_eval_accuracy" in later else "",
        ]
        print(f"round {n}: " + (", ".join(f for f in figures if f) or "-"))
    return 0


def run(args: argparse.Namespace) -> int:
    from coordinator.adapter_export import ExportError, export_adapter
    from fleetlora.cli import CliError

    if args.list:
        return _list(args.state)
    if not args.out:
        raise CliError("give --out FOLDER (or --list)")
    try:
        export_adapter(args.state, args.out, round=args.round, infer_pte=args.infer_pte, log=print)
    except ExportError as e:
        raise CliError(str(e)) from e
    print(f'use it: fleetlora predict --adapter {args.out} "some text"')
    return 0
