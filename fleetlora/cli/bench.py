"""``fleetlora bench NAME [args]``: benchmarks that print ratios measured side by side in one run.

A benchmark is ``def main(argv: list[str]) -> int`` in a module of ``bench/``, registered here by
name as ``"module"`` or ``"module:function"`` and imported only when run. Its last line is
``name: key=value ...``, which ``fleetlora bench all`` collects into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib

from fleetlora.cli import CliError

NAME = "bench"
HELP = "run a benchmark (side-by-side timings in one run)"
ORDER = 90
EXAMPLES = """\
fleetlora bench all --quick                   # every benchmark side by side -> BENCHMARKS.md
fleetlora bench claims --quick                # the seed papers' claims over seeds -> BENCHMARKS.md section
fleetlora bench aggregate --quick             # FedRPCA and FLoRA-NA against their textbook forms
fleetlora bench client --steps 10             # ExecuTorch runtime vs eager step time on MiniLM
fleetlora bench client --runtime native       # the C++ client vs eager torch, and its memory vs Python's
fleetlora bench mqtt --clients 300            # one event loop vs a paho thread per client
fleetlora bench ingest --updates 1000 --payload 1000000   # coordinator service vs bare paho subscriber
fleetlora bench ingest --updates 300 --repeat 3 --http   # ... and with the dashboard on, side by side
fleetlora bench sim --no-train --flower        # the simulator's own cost per client round, and Flower's
fleetlora bench sim --train                     # the README's fedit experiment: fleetlora vs a Flower app
fleetlora bench scale --clients 10000          # one in-process round of 10k clients: time and memory
fleetlora bench load --clients 3000             # 3000 devices publish in the same second: lost, memory
fleetlora bench crash --kills 20                # coordinator SIGKILLed 20 times: final global unchanged
fleetlora bench hostile --envelopes 10000       # bad envelopes of every kind: counted by reason"""

# name -> "module" or "module:function" with main(argv) -> int (imported only when run)
BENCHMARKS = {
    "aggregate": "bench.aggregate:main",
    "client": "bench.client:main",
    "all": "bench.all",
    "claims": "bench.claims",
    "mqtt": "bench.mqtt",
    "ingest": "bench.ingest",
    "sim": "bench.sim",
    "scale": "bench.scale",
    "crash": "bench.drill_crash",
    "hostile": "bench.drill_hostile",
    "load": "bench.drill_load",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, help="the benchmark's own arguments (--help for them)"
    )


# ``bench client --runtime native``: the C++ client, run through devices/native.py.
NATIVE_CLIENT = "bench.native:main"
# ``bench sim --train``: the README's fedit experiment against a Flower app doing the same work.
SIM_TRAIN = "bench.sim_train:main"


def _native(argv: list[str]) -> list[str] | None:
    """``argv`` without ``--runtime native`` when it asks for the native client, else None."""
    for i, arg in enumerate(argv):
        if arg == "--runtime=native" or (arg == "--runtime" and argv[i + 1 : i + 2] == ["native"]):
            return argv[:i] + argv[i + (1 if "=" in arg else 2) :]
    return None


def run(args: argparse.Namespace) -> int:
    if args.name not in BENCHMARKS:
        raise CliError(f"unknown benchmark {args.name!r}; choose from {sorted(BENCHMARKS)}")
    target = BENCHMARKS[args.name]
    native_argv = _native(list(args.args)) if args.name == "client" else None
    if native_argv is not None:
        target, args.args = NATIVE_CLIENT, native_argv
    train_argv = [a for a in args.args if a != "--train"]
    if args.name == "sim" and len(train_argv) < len(args.args):
        target, args.args = SIM_TRAIN, train_argv
    module_name, _, func = target.partition(":")
    main = getattr(importlib.import_module(module_name), func or "main")
    try:
        return int(main(list(args.args)))
    except SystemExit as e:  # argparse's --help of the benchmark's own parser: add its example
        if e.code == 0 and {"-h", "--help"} & set(args.args):
            print(f"\nexample:\n  {example(args.name, native_argv is not None, target == SIM_TRAIN)}")
        raise


def example(name: str, native: bool = False, train: bool = False) -> str:
    """The line of :data:`EXAMPLES` that runs benchmark ``name`` (``native``: its --runtime native form;
    ``train``: ``sim --train``)."""
    lines = [line for line in EXAMPLES.splitlines() if line.startswith(f"fleetlora bench {name} ")]
    return next(
        line for line in lines if native == ("--runtime native" in line) and train == ("--train" in line)
    )
