"""``fleetlora bench scale``: one in-process round with every one of many virtual clients, and its memory.

The simulator holds the base model once; a virtual client costs its data indices and budgets at
rest, and one adapter (its upload) while its round is in flight. This benchmark runs one round in
which all ``--clients`` train one local step, and reports resident memory before and after each
stage, the peak during the round, and bytes per client against the adapter's and the model's size.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import threading
import time
import tracemalloc
from types import TracebackType

import numpy as np
import psutil

from export.state import num_bytes
from sim.config import SimConfig
from sim.fleet import build_fleet, model_cost

MB = 1 << 20


def rss_bytes() -> int:
    """Resident memory of this process."""
    return int(psutil.Process().memory_info().rss)


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc; elsewhere RSS keeps freed pages
        libc.malloc_trim(0)


class PeakRss:
    """Samples this process's resident memory in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, int(process.memory_info().rss))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def fleet_bytes(config: SimConfig, labels: np.ndarray, n_params: int = 10**6) -> int:
    """Bytes the Python heap holds for a fleet of ``config.clients`` (indices, profiles, budgets)."""
    cost = model_cost(config, n_params, hidden=32, layers=2)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fleet = build_fleet(config, labels, cost)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del fleet
    return held


def scale_config(clients: int, steps: int = 1) -> SimConfig:
    """Every client trains ``steps`` steps of batch 2 on tiny-bert in one round."""
    return SimConfig(
        methods=("fedit",),
        model="tiny-bert",
        clients=clients,
        clients_per_round=clients,
        rounds=1,
        partition="iid",
        local_steps=steps,
        batch_size=2,
        layers=(1,),
        max_len=16,
        deadline_s=1e9,  # nobody is late: every client's adapter is in flight at once
        out="runs/bench-scale",
    )


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fleetlora bench scale", description=__doc__)
    p.add_argument("--clients", type=int, default=10_000, help="virtual clients, all in one round")
    p.add_argument("--steps", type=int, default=1, help="local steps per client")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    if min(args.clients, args.steps, args.threads) < 1:
        p.error("--clients, --steps and --threads must be >= 1")
    import torch

    from sim.engine import run_method
    from sim.synthetic import synthetic_world

    torch.set_num_threads(args.threads)
    config = scale_config(args.clients, args.steps)
    start_rss = rss_bytes()
    t0 = time.perf_counter()
    world = synthetic_world(config, examples_per_client=2)
    model = world.model("lora")
    world_rss = rss_bytes()
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    adapter_bytes = num_bytes(world.initial_state("lora"))
    per_client_fleet = fleet_bytes(config, world.train.labels.numpy()) / args.clients
    print(
        f"scale bench: {args.clients} clients x {args.steps} local step(s), one round, tiny-bert, "
        f"{args.threads} torch thread(s)"
    )
    print(
        f"world built in {time.perf_counter() - t0:.1f} s; model {model_bytes / MB:.1f} MB (once), "
        f"adapter {adapter_bytes} B, fleet {per_client_fleet:.0f} B per virtual client at rest"
    )
    gc.collect()
    before = rss_bytes()
    t1 = time.perf_counter()
    with PeakRss() as peak:
        record = run_method(world, "fedit").rounds[0]
    seconds = time.perf_counter() - t1
    release_freed_memory()
    after = rss_bytes()
    in_flight = (peak.peak - before) / args.clients
    print(
        f"round: {seconds:.1f} s, {record['participants']} updates, "
        f"validation accuracy {record['val_accuracy']:.3f}"
    )
    print(
        f"rss MB: start {start_rss / MB:.0f}, world {world_rss / MB:.0f}, before round {before / MB:.0f}, "
        f"peak in round {peak.peak / MB:.0f}, after round {after / MB:.0f}"
    )
    print(
        f"in flight: {in_flight / 1024:.1f} KiB per client = {in_flight / adapter_bytes:.1f} adapters "
        f"= {in_flight / model_bytes:.4f} models; kept after the round: "
        f"{(after - before) / args.clients:.0f} B per client"
    )
    print(
        f"scale: clients={args.clients} round_s={seconds:.1f} peak_rss_mb={peak.peak / MB:.0f} "
        f"bytes_per_client_in_flight={in_flight:.0f}"
    )
    return 0
