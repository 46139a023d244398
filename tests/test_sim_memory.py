"""A virtual client costs its indices and budgets at rest and one adapter in flight, never a model."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from bench.scale import PeakRss, fleet_bytes, rss_bytes, scale_config
from export.spec import AdapterSpec
from export.state import num_bytes
from sim import engine
from sim.synthetic import synthetic_world
from sim.transports import ClientJob, ClientResult, Transport

EXAMPLES_PER_CLIENT = 8


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def minilm_adapter_bytes(config: engine.SimConfig) -> int:
    """A LoRA adapter of ``config``'s rank on MiniLM (hidden 384): what a client adds in flight."""
    per_module = config.rank * (384 + 384) * 4
    return per_module * len(config.target_modules) * len(config.layers)


def test_fleet_memory_per_added_client_is_indices_and_budgets() -> None:
    config = scale_config(2000)
    labels = np.zeros(config.clients * EXAMPLES_PER_CLIENT, dtype=np.int64)
    small = fleet_bytes(dataclasses.replace(config, clients=100, clients_per_round=100), labels)
    large = fleet_bytes(config, labels)
    per_added = (large - small) / 1900
    indices = EXAMPLES_PER_CLIENT * 8
    assert indices < per_added < indices + 3000  # an index array, a profile reference, two budgets
    assert per_added < minilm_adapter_bytes(engine.SimConfig()) / 20


def test_round_of_1000_clients_holds_about_an_adapter_per_client(one_thread: None) -> None:
    config = scale_config(1000)  # `fleetlora bench scale` runs 10,000
    world = synthetic_world(config, examples_per_client=2)
    model = world.model("lora")
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    adapter = num_bytes(world.initial_state("lora"))
    gc.collect()
    before = rss_bytes()
    with PeakRss() as peak:
        record = engine.run_method(world, "fedit").rounds[0]
    per_client = (peak.peak - before) / config.clients
    assert record["participants"] > config.clients // 2
    # Each client's upload (and its copy stacked for aggregation) plus bookkeeping: a few adapters.
    assert per_client < 12 * adapter
    assert per_client < model_bytes / 50


class RecordingTransport:
    """The in-process transport, keeping a weak reference to every uploaded tensor."""

    def __init__(self, inner: Transport):
        self.inner = inner
        self.uploads: list[list[weakref.ref[torch.Tensor]]] = []

    def run(self, spec: AdapterSpec, jobs: list[ClientJob]) -> list[ClientResult]:
        results = self.inner.run(spec, jobs)
        self.uploads.append([weakref.ref(t) for r in results for t in r.upload.values()])
        return results

    def close(self) -> None:
        self.inner.close()


def test_engine_keeps_no_client_adapter_after_its_round(
    monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    config = dataclasses.replace(scale_config(30), clients_per_round=20, rounds=3)
    world = synthetic_world(config, examples_per_client=4)
    recorders: list[RecordingTransport] = []
    make = engine.make_transport

    def recording(world: engine.World, family: str, *args: Any, **kwargs: Any) -> Transport:
        recorders.append(RecordingTransport(make(world, family, *args, **kwargs)))
        return recorders[-1]

    monkeypatch.setattr(engine, "make_transport", recording)
    alive_after_next_round: list[int] = []

    def on_round(record: dict[str, Any]) -> None:
        gc.collect()
        uploads = recorders[0].uploads
        if len(uploads) >= 2:  # the previous round's uploads, once this round has aggregated
            alive_after_next_round.append(sum(ref() is not None for ref in uploads[-2]))

    history = engine.run_method(world, "fedit", on_round).rounds
    gc.collect()
    assert sum(r["participants"] for r in history) > 0
    assert all(len(u) > 0 for u in recorders[0].uploads)
    assert alive_after_next_round == [0, 0]
    assert all(ref() is None for refs in recorders[0].uploads for ref in refs)
