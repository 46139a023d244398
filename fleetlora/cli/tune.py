"""``fleetlora tune``: grid-search each method's settings on validation, same budget for every method."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fleetlora.cli import CliError, as_list
from fleetlora.cli.sim import add_arguments as add_sim_arguments
from fleetlora.cli.sim import config_from_args

NAME = "tune"
ORDER = 11
HELP = "choose each method's learning rate and own options on validation (resumable)"
EXAMPLES = """fleetlora tune --method fedit,fedrpca --out runs/tune      # lr x own options, validation only
fleetlora tune --method ravan,hetlora,flexlora --device-mix right_skewed --lrs 0.02,0.05
fleetlora tune --config experiment.toml --seeds 0,1 --out runs/tune-r8   # resumes an interrupted search
fleetlora sim --config runs/tune/tuned.toml --seeds 0,1,2,3,4   # then: test once, over seeds"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_sim_arguments(p)
    p.set_defaults(out="runs/tune", centralized=False)
    p.add_argument("--lrs", default="0.01,0.02,0.05,0.1", help="learning rates every method tries")


def run(args: argparse.Namespace) -> int:
    from sim.fleet import NoTrainingError
    from sim.threads import apply_threads
    from sim.tune import tune

    config = config_from_args(args)
    try:
        lrs = tuple(float(x) for x in as_list(args.lrs))
    except ValueError as e:
        raise CliError(f"--lrs: {e}") from e
    if not lrs or any(lr <= 0 for lr in lrs):
        raise CliError(f"--lrs must be positive learning rates, got {args.lrs!r}")
    out = Path(args.out)
    print(apply_threads(config.threads), file=sys.stderr)  # type: ignore[attr-defined]
    try:
        chosen = tune(config, lrs, out)  # type: ignore[arg-type]
    except (NoTrainingError, ValueError) as e:
        raise CliError(str(e)) from e
    for method, params in chosen.items():
        print(f"{method}: {params}")
    print(f"written: {out / 'tuned.toml'} (fleetlora sim --config {out / 'tuned.toml'})")
    return 0
