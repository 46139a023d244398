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
fleetlora bench ingest --updates 1000 --payload 1000000   # coordinator service vs bare paho subscriber"""

# name -> module with main(argv) -> int (imported only when run)
BENCHMARKS = {
    "mqtt": "coordinator.bench_mqtt",
    "ingest": "coordinator.bench_ingest",
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
