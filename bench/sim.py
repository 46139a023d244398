"""``fleetlora bench sim``: what the simulator itself costs per client per round.

``--no-train`` runs the real engine (sampling, budgets, the virtual clock, ``payload_for``, metrics,
evaluation) with the clients' training and the aggregation replaced by no-ops, so what remains is
the simulator's own overhead. ``--flower`` runs Flower's simulation engine on the same no-work
rounds in its own virtual environment (it pins another Ray) and prints the ratio.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

from coordinator.aggregators import Aggregator, ClientUpdate
from export.state import State
from sim.config import SimConfig

FLOWER_VERSION = "1.42.0"
FLOWER_VENV = Path(__file__).resolve().parent.parent / ".venv-flower"
FLOWER_APP = Path(__file__).resolve().parent / "flower_noop_app.py"
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray's workers run at nice 15 by default: beside other jobs at nice 0 (the loaded runs) Flower's
    # actors got about 2% of a core each, which would measure the scheduler, not Flower.
    "RAY_worker_niceness": "0",
}


class NoOpAggregator(Aggregator):
    """Keeps the global adapter as it is: registered nowhere, used only to time the engine."""

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        return global_state


def bench_config(clients: int, rounds: int) -> SimConfig:
    """Every client sampled every round, one local step, tiny-bert: the lightest real world."""
    return SimConfig(
        methods=("fedit",),
        model="tiny-bert",
        clients=clients,
        clients_per_round=clients,
        rounds=rounds,
        partition="iid",
        local_steps=1,
        batch_size=2,
        layers=(1,),
        max_len=16,
        out="runs/bench-sim",
    )


def time_engine(config: SimConfig, train: bool, profile: bool = False) -> float:
    """Seconds the engine takes for all rounds (world building excluded)."""
    from sim.engine import run_method
    from sim.synthetic import synthetic_world

    world = synthetic_world(config, examples_per_client=2)
    world.pool("lora")  # built before the clock starts, like the shared models of a real run
    agg = None if train else NoOpAggregator(config.spec("lora"))
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    run_method(world, "fedit", train=train, aggregator=agg)
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - start
    if profiler:
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(15)
    return seconds


def flower_python() -> Path:
    """The Flower venv's interpreter, creating the venv on first use (raises RuntimeError with why)."""
    python = FLOWER_VENV / "bin" / "python"
    env = {**os.environ, **FLOWER_ENV}
    if python.is_file() and subprocess.run([python, "-c", "import flwr"], env=env).returncode == 0:
        return python
    print(f"creating {FLOWER_VENV} with flwr[simulation]=={FLOWER_VERSION} (first use) ...", flush=True)
    steps = [
        [sys.executable, "-m", "venv", str(FLOWER_VENV)],
        [str(python), "-m", "pip", "install", "-q", f"flwr[simulation]=={FLOWER_VERSION}"],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return python


def time_flower(clients: int, rounds: int) -> dict[str, float]:
    """Flower's simulation of ``rounds`` no-work rounds of ``clients`` clients (its own JSON line)."""
    python = flower_python()
    done = subprocess.run(
        [str(python), str(FLOWER_APP), "--clients", str(clients), "--rounds", str(rounds)],
        env={**os.environ, **FLOWER_ENV},
        capture_output=True,
        text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"flower run failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    result: dict[str, float] = json.loads(lines[-1])
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fleetlora bench sim", description=__doc__)
    p.add_argument("--clients", type=int, default=1000, help="virtual clients, all sampled every round")
    p.add_argument("--rounds", type=int, default=3, help="rounds")
    p.add_argument("--no-train", action="store_true", help="only the overhead run (skip the 1-step run)")
    p.add_argument("--flower", action="store_true", help="also time Flower's simulation (own venv)")
    p.add_argument("--profile", action="store_true", help="print the engine's top functions (no-train)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a busy machine 2 threads made each tiny op ~100x slower)",
    )
    args = p.parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--clients, --rounds and --threads must be >= 1")
    import torch

    torch.set_num_threads(args.threads)
    config = bench_config(args.clients, args.rounds)
    client_rounds = args.clients * args.rounds
    print(
        f"sim bench: {args.clients} clients x {args.rounds} rounds, all sampled, tiny-bert, synthetic data, "
        f"{args.threads} torch thread(s)"
    )
    if not args.no_train:
        seconds = time_engine(config, train=True)
        print(
            f"engine, 1 local step per client: {seconds:.2f} s = "
            f"{1000 * seconds / client_rounds:.3f} ms per client round"
        )
    seconds = time_engine(config, train=False, profile=args.profile)
    overhead_ms = 1000 * seconds / client_rounds
    print(f"engine, no training, no aggregation: {seconds:.2f} s = {overhead_ms:.3f} ms per client round")
    summary = f"sim: overhead_ms_per_client_round={overhead_ms:.4f}"
    if args.flower:
        try:
            flower = time_flower(args.clients, args.rounds)
        except RuntimeError as e:
            print(f"flower: not measured: {e}")
            summary += " flower=not_measured"
        else:
            flower_ms = 1000 * flower["rounds_s"] / client_rounds
            print(
                f"flower {FLOWER_VERSION} simulation, no work: {flower['rounds_s']:.1f} s of rounds "
                f"({flower['total_s']:.1f} s with start-up)"
            )
            ratio = flower_ms / overhead_ms
            summary += f" flower_ms_per_client_round={flower_ms:.3f} flower_over_fleetlora={ratio:.1f}"
    print(summary)  # the last line: what `fleetlora bench all` reports
    return 0
