"""Crash drill: the coordinator is SIGKILLed at random moments of a multi-round run and restarted.

A scripted fleet (:mod:`bench.drill_fleet`) answers every round. The coordinator runs in a child
process forked from a server that has already imported torch (multiprocessing ``forkserver``), so a
restart costs a fork, not an interpreter start-up; each life is killed with SIGKILL after a random
delay, then started again on the same state directory, until ``kills`` kills; the last life runs the
run to its end. The final global adapter must equal, bit for bit, that of an uninterrupted in-process
run in which every client answered every round once (:func:`~bench.drill_fleet.reference_run`):
any lost, double-counted or corrupted update would change it.

``fleetlora bench crash`` runs it on a private mosquitto and prints ``crash: kills=... equal=...``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

import torch

from bench.drill_fleet import DrillFleet, client_names, dense_template, make_service, reference_run
from broker.mosquitto import Mosquitto
from coordinator.metrics import read_metrics
from coordinator.service_mqtt import serve
from coordinator.store import RoundStore
from protocol.mqtt_link import LinkConfig

PRELOAD = ["torch", "bench.drill_fleet", "coordinator.service_mqtt"]


@dataclass
class CrashReport:
    """What the drill did and found."""

    kills: int = 0
    rounds: int = 0
    equal: bool = False
    lives: int = 0
    kill_rounds: list[int] = field(default_factory=list)  # the open round at each kill
    resumed_updates: list[int] = field(default_factory=list)  # updates found on disk at each restart
    redelivered: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    aggregated: list[list[str]] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        mid_round = sum(1 for n in self.resumed_updates if n)
        return (
            f"crash: kills={self.kills} rounds={self.rounds} equal={self.equal} lives={self.lives} "
            f"restarts_with_persisted_updates={mid_round} redelivered={self.redelivered} "
            f"rejected={sum(self.rejected.values())} seconds={self.seconds:.1f}"
        )


def _coordinator_life(
    port: int, state_dir: str, clients: tuple[str, ...], payload_bytes: int, rounds: int, ready: MpEvent
) -> None:
    """One life of the coordinator (child process): resume from ``state_dir`` and serve."""
    service = make_service(Path(state_dir), clients, dense_template(payload_bytes), rounds=rounds)
    subscribed, stop = threading.Event(), threading.Event()

    def signal_ready() -> None:
        subscribed.wait()
        ready.set()

    threading.Thread(target=signal_ready, daemon=True).start()
    serve(service, LinkConfig("coordinator", port=port, backoff_max_s=0.5), stop, ready=subscribed)
    service.metrics.close()


def run_crash_drill(
    port: int,
    workdir: Path,
    *,
    kills: int = 20,
    clients: int = 6,
    rounds: int = 12,
    payload_bytes: int = 4096,
    max_delay_s: float = 0.6,
    answer_gap_s: float = 0.02,
    seed: int = 0,
    timeout_s: float = 300.0,
) -> CrashReport:
    """Kill the coordinator ``kills`` times at random moments of a ``rounds``-round run; compare.

    Each life is killed ``uniform(0, max_delay_s)`` seconds after it has subscribed (so it is always
    serving: receiving, persisting, aggregating or announcing), or sooner when ``seed`` draws 0.
    The devices answer ``answer_gap_s`` apart, so most rounds spend most of their time open with
    some updates persisted: the moment a kill is most likely to lose one.
    """
    names = client_names(clients)
    template = dense_template(payload_bytes)
    state_dir = workdir / "state"
    report = CrashReport()
    draw = random.Random(seed)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    fleet = DrillFleet(port, names, template, answer_gap_s=answer_gap_s).start()
    start = time.monotonic()
    try:
        while True:
            ready = context.Event()
            life = context.Process(
                target=_coordinator_life,
                args=(port, str(state_dir), names, payload_bytes, rounds, ready),
                daemon=True,
            )
            life.start()
            report.lives += 1
            if report.kills == kills:
                life.join(max(1.0, timeout_s - (time.monotonic() - start)))
                if life.is_alive():
                    life.kill()
                    raise TimeoutError(f"the last life did not finish the run within {timeout_s} s")
                break
            if not ready.wait(60):
                raise TimeoutError("a coordinator life did not subscribe within 60 s")
            life.join(draw.uniform(0.0, max_delay_s))
            if not life.is_alive():
                break  # it finished the run before its kill: no more kills needed
            assert life.pid is not None
            os.kill(life.pid, 9)
            life.join()
            report.kills += 1
            loaded = RoundStore(state_dir, sync=False).load()
            report.kill_rounds.append(loaded[0].round if loaded else 0)
        deadline = time.monotonic() + 60
        while not fleet.finished() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        fleet.close()
    report.seconds = time.monotonic() - start
    records = read_metrics(state_dir / "metrics.jsonl")
    report.resumed_updates = [r["resumed_updates"] for r in records if r["event"] == "start"][1:]
    last_of_round = {r["round"]: r for r in records if r["event"] == "round"}
    report.rounds = len(last_of_round)
    report.aggregated = [last_of_round[r]["clients"] for r in sorted(last_of_round)]
    report.redelivered = sum(1 for r in records if r["event"] == "redelivered")
    for r in records:
        if r["event"] == "rejected":
            report.rejected[r["reason"]] = report.rejected.get(r["reason"], 0) + 1
    loaded = RoundStore(state_dir, sync=False).load()
    assert loaded is not None
    final = loaded[1]
    expected, expected_clients = reference_run(workdir / "reference", names, template, rounds)
    report.equal = (
        loaded[0].done
        and report.aggregated == expected_clients
        and all(torch.equal(final[k], expected[k]) for k in expected)
    )
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fleetlora bench crash", description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of the coordinator (default 20)")
    parser.add_argument("--clients", type=int, default=20, help="devices (default 20)")
    parser.add_argument("--rounds", type=int, default=120, help="rounds of the run (default 120)")
    parser.add_argument("--payload", type=int, default=65536, help="bytes per update (default 64 KiB)")
    parser.add_argument("--max-delay", type=float, default=1.0, help="longest life before its kill (s)")
    parser.add_argument("--answer-gap", type=float, default=0.02, help="pause between answers (s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="fleetlora-crash-"))
    os.chmod(workdir, 0o755)  # mosquitto started as root drops to its own user
    try:
        with Mosquitto(workdir / "broker") as broker:
            report = run_crash_drill(
                broker.port, workdir, kills=args.kills, clients=args.clients, rounds=args.rounds,
                payload_bytes=args.payload, max_delay_s=args.max_delay, answer_gap_s=args.answer_gap,
                seed=args.seed,
            )  # fmt: skip
        print(f"open round at each kill: {report.kill_rounds}")
        print(f"updates found on disk at each restart: {report.resumed_updates}")
        print(report.line())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report.equal and report.kills == args.kills else 1
