"""``fleetlora bench NAME [args]``: the project's benchmarks, one module function each.

A benchmark is ``def main(argv: list[str]) -> int`` in its own package's module, registered here by
name as ``"module:function"`` and imported only when run.
"""

from __future__ import annotations

import argparse
import importlib

NAME = "bench"
HELP = "run a benchmark (speed ratios measured side by side in one run)"
EXAMPLES = """fleetlora bench client --steps 10
fleetlora bench client --families lora --xnnpack on --threads 2"""
ORDER = 90

BENCHMARKS: dict[str, str] = {
    "client": "edge_client.bench_client:main",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")


def run(args: argparse.Namespace) -> int:
    module_name, _, func = BENCHMARKS[args.benchmark].partition(":")
    main = getattr(importlib.import_module(module_name), func)
    return int(main(list(args.bench_args)))
