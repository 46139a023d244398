"""Client workers: copies of the adapted model, each trained and scored by its own thread.

Why threads of one torch thread each, rather than one model with torch's intra-op threads: the
clients of a round are independent, so W of them can train at once with no barrier between them.
Intra-op threads meet at a barrier in every operator; on a busy machine one of them is descheduled
and the others spin (measured here: the default experiment took 109-156 s with two intra-op threads
at load 4-7 and 20-22 s with one). W single-threaded workers never wait for each other, get W shares
of the CPU from the scheduler, and on an idle machine were faster as well: one round pair of the
default fedit experiment, 2 workers x 1 thread 5.5 s against 1 model x 2 threads 7.2 s; at load 4,
17.5 s against 29.4 s with one thread. Torch releases the GIL inside its operators.

Each worker sets its own thread to one torch thread (``torch.set_num_threads`` is per thread under
OpenMP; the caller's own setting is left as it was). Every replica is built from the same config and
seed, so its frozen weights are bit-identical to the first one's, and a client's numbers do not
depend on which worker trained it.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import nn

from edge_client.trainer import Trainer

T = TypeVar("T")
R = TypeVar("R")


class ReplicaPool:
    """``len(models)`` workers, worker ``i`` owning ``models[i]`` (and ``trainers[i]`` when given)."""

    def __init__(self, models: Sequence[nn.Module], trainers: Sequence[Trainer] = ()):
        if not models:
            raise ValueError("a replica pool needs at least one model")
        if trainers and len(trainers) != len(models):
            raise ValueError(f"{len(trainers)} trainers for {len(models)} models")
        self.models, self.trainers = list(models), list(trainers)

    def __len__(self) -> int:
        return len(self.models)

    def map(
        self, fn: Callable[[int, T], R], items: Sequence[T], cost: Callable[[T], float] | None = None
    ) -> list[R]:
        """``fn(worker, item)`` for every item, results in ``items``' order.

        Each worker takes the next item when it is free; with ``cost``, the costliest items go first
        (longest-processing-time order: a round's long clients do not end up alone at its tail).
        One worker, or one item: run here, in the caller's thread and with its torch threads.
        """
        if len(self) == 1 or len(items) <= 1:
            return [fn(0, item) for item in items]
        order = sorted(range(len(items)), key=lambda k: -cost(items[k])) if cost else list(range(len(items)))
        free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for worker in range(len(self)):
            free.put(worker)

        def run(k: int) -> R:
            worker = free.get()  # as many threads as workers: one is always free here
            try:
                return fn(worker, items[k])
            finally:
                free.put(worker)

        threads = min(len(self), len(items))
        with ThreadPoolExecutor(threads, thread_name_prefix="client", initializer=_one_thread) as ex:
            futures = {k: ex.submit(run, k) for k in order}
            return [futures[k].result() for k in range(len(items))]


def _one_thread() -> None:
    torch.set_num_threads(1)
