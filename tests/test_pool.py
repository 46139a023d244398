"""Client workers (sim/pool.py): several clients train at once, each on its own thread and model copy,
with one torch thread each, and a run gives the numbers of training them one after another."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
import torch

from export.models import build_model
from sim.config import SimConfig
from sim.engine import run_method, world_workers
from sim.features import prefix_inputs
from sim.pool import ReplicaPool
from sim.synthetic import synthetic_world


def test_map_keeps_item_order_runs_longest_first_and_never_shares_a_worker() -> None:
    pool = ReplicaPool([torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)])
    busy: set[int] = set()
    started: list[int] = []
    lock = threading.Lock()

    def work(worker: int, item: int) -> tuple[int, int, int]:
        with lock:
            assert worker not in busy, "two items on one worker's model at once"
            busy.add(worker)
            started.append(item)
        time.sleep(0.002 * item)
        threads = torch.get_num_threads()
        with lock:
            busy.discard(worker)
        return item * 10, worker, threads

    caller_threads = torch.get_num_threads()
    items = [1, 5, 2, 4, 3]
    results = pool.map(work, items, cost=float)
    assert [r[0] for r in results] == [10, 50, 20, 40, 30]  # in the items' order
    assert started[:2] == [5, 4]  # the costliest first
    assert {r[1] for r in results} == {0, 1}  # both workers took items
    assert {r[2] for r in results} == {1}  # each worker computes with one torch thread
    assert torch.get_num_threads() == caller_threads  # the caller's own setting is left as it was


def test_a_workers_error_reaches_the_caller() -> None:
    pool = ReplicaPool([torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)])

    def work(worker: int, item: int) -> int:
        if item == 2:
            raise ValueError(f"item {item} failed on worker {worker}")
        return item

    with pytest.raises(ValueError, match="item 2 failed"):
        pool.map(work, [1, 2, 3])


def tiny(**changes: object) -> SimConfig:
    config = SimConfig(
        methods=("fedit",), model="tiny-bert", clients=6, clients_per_round=6, max_len=12, rounds=2,
        partition="iid", centralized=False, layers=(1,),
    )  # fmt: skip
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["fedit", "fedsa_lora", "flora", "ravan"])
def test_three_workers_give_the_numbers_of_one(method: str) -> None:
    """Bit-equal by design: each client runs the same single-threaded operators on a bit-identical
    model copy, whichever worker takes it, and the scores are summed in batch order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the one-worker run computes on the caller's thread: one thread too
    try:
        runs = {}
        for workers in (1, 3):
            world = synthetic_world(tiny(workers=workers), examples_per_client=6, test_examples=40)
            assert world.workers == workers
            runs[workers] = run_method(world, method)
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(runs[1].rounds, runs[3].rounds, strict=True):
        for key in ("val_accuracy", "val_loss", "train_loss", "examples", "bytes_up"):
            assert one[key] == three[key], (method, one["round"], key)
    assert runs[1].test["test_accuracy"] == runs[3].test["test_accuracy"]
    assert runs[1].test["test_loss"] == runs[3].test["test_loss"]


def test_worker_policy_one_per_core_only_where_clients_train_here(monkeypatch: pytest.MonkeyPatch) -> None:
    from sim import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    assert world_workers(SimConfig(), "cpu")[0] == 4
    assert world_workers(SimConfig(clients_per_round=2), "cpu")[0] == 2  # never more than a round's clients
    assert world_workers(SimConfig(workers=3), "cpu") == (3, "--workers")
    assert world_workers(SimConfig(threads=2), "cpu")[0] == 1  # the user sized torch's threads
    assert world_workers(SimConfig(), "cuda")[0] == 1  # one device: clients in turn (or batched)
    assert world_workers(SimConfig(transport="mqtt"), "cpu")[0] == 1  # real clients train themselves
    assert world_workers(SimConfig(trainer="executorch", optimizer="sgd"), "cpu")[0] == 1
    assert world_workers(SimConfig(batched="on"), "cpu")[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert world_workers(SimConfig(), "cpu")[0] == 1


def test_the_frozen_prefix_is_the_same_computed_by_two_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = build_model("tiny-bert", 3, seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (300, 12), generator=gen)  # 3 chunks of up to 128
    mask = (torch.arange(12) < torch.randint(3, 13, (300, 1), generator=gen)).long()
    labels = torch.zeros(300, dtype=torch.long)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker computes in the caller's thread: give it a worker's thread
    try:
        got = []
        for workers in (1, 2):
            monkeypatch.setenv("FLEETLORA_CACHE", str(tmp_path / f"w{workers}"))
            got.append(prefix_inputs(base, ids, mask, labels, 1, "test:prefix", workers).x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1])  # the same products, one chunk per thread: bit for bit
