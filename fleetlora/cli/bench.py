"""``fleetlora bench NAME [args]``: benchmarks that print ratios measured side by side in one run.

Each benchmark is a module exposing ``main(argv: list[str]) -> int``, registered in ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import importlib

from fleetlora.cli import CliError

NAME = "bench"
HELP = "run a benchmark (side-by-side timings in one run)"
ORDER = 90
EXAMPLES = """\
fleetlora bench mqtt --clients 300            # one event loop vs a paho thread per client
fleetlora bench mqtt --clients 2000 --payload 100000
fleetlora bench sim --no-train --flower        # the simulator's own cost per client round, and Flower's
fleetlora bench scale --clients 10000          # one in-process round of 10k clients: time and memory"""

# name -> module with main(argv) -> int (imported only when run)
BENCHMARKS = {
    "mqtt": "coordinator.bench_mqtt",
    "sim": "sim.bench_sim",
    "scale": "sim.bench_scale",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, help="the benchmark's own arguments (--help for them)"
    )


def run(args: argparse.Namespace) -> int:
    if args.name not in BENCHMARKS:
        raise CliError(f"unknown benchmark {args.name!r}; choose from {sorted(BENCHMARKS)}")
    module = importlib.import_module(BENCHMARKS[args.name])
    return int(module.main(list(args.args)))
