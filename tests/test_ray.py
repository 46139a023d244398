"""The Ray transport gives exactly the in-process numbers; ``--backend`` is a deprecated ``--transport``."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterator

import pytest
import torch

from sim.config import SimConfig

os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"})


def tiny_config(**changes: object) -> SimConfig:
    base = SimConfig(
        methods=("fedit",),
        model="tiny-bert",
        clients=6,
        clients_per_round=6,
        rounds=2,
        partition="iid",
        local_steps=2,
        batch_size=4,
        layers=(1,),
        max_len=16,
        ray_actors=2,
        out="runs/test-ray",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Ray gives each one-CPU actor one torch thread; the reference must use as many (float sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_backend_is_a_deprecated_alias_of_transport(capsys: pytest.CaptureFixture[str]) -> None:
    from fleetlora.cli import sim as sim_cli

    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--method", "fedit", "--backend", "ray", "--ray-address", "auto", "--ray-actors", "3"]
    )
    config = sim_cli.config_from_args(args)
    assert isinstance(config, SimConfig)
    assert (config.transport, config.ray_address, config.ray_actors) == ("ray", "auto", 3)
    assert "--backend is deprecated, use --transport" in capsys.readouterr().err
    assert "--backend" not in parser.format_help()  # --backend means the trainer, in fleetlora client


@pytest.mark.ray
@pytest.mark.parametrize("method", ["fedit", "fedsa_lora"])  # FedSA-LoRA: each client's B goes and comes back
def test_ray_and_inproc_give_identical_round_metrics(one_thread: None, method: str) -> None:
    pytest.importorskip("ray")
    from sim.engine import run_method
    from sim.synthetic import synthetic_world

    config = tiny_config(methods=(method,))
    world = synthetic_world(config, examples_per_client=8)
    inproc = run_method(world, method).records
    ray_world = dataclasses.replace(world, config=dataclasses.replace(config, transport="ray"))
    over_ray = run_method(ray_world, method).records
    assert sum(r.get("participants", 0) for r in inproc) > 0
    for a, b in zip(inproc, over_ray, strict=True):
        a.pop("wall_time_s"), b.pop("wall_time_s")
        assert a == b  # accuracy, losses, bytes, divergence: bit for bit


@pytest.mark.ray
@pytest.mark.mqtt
@pytest.mark.parametrize("method", ["fedit", "flexlora", "ravan"])
def test_the_three_transports_give_the_same_numbers(one_thread: None, method: str) -> None:
    """inproc, mqtt (the real coordinator service and edge clients over mosquitto, with keys) and ray:
    the same seed, the same numbers, also with heterogeneous ranks (FlexLoRA) and heads (Ravan)."""
    pytest.importorskip("ray")
    from sim.engine import run_method
    from sim.synthetic import synthetic_world

    config = tiny_config(methods=(method,), clients_per_round=4)
    runs = {}
    for transport in ("inproc", "mqtt", "ray"):
        world = synthetic_world(dataclasses.replace(config, transport=transport), examples_per_client=8)
        runs[transport] = [
            {k: v for k, v in r.items() if k != "wall_time_s"} for r in run_method(world, method).records
        ]
    assert sum(r.get("participants", 0) for r in runs["inproc"]) > 0
    shares = {tuple(r["ranks"] or r["heads"] or ()) for r in runs["inproc"] if r["kind"] == "round"}
    if method != "fedit":  # the device mix gives its clients different ranks / heads
        assert any(len(set(s)) > 1 for s in shares), shares
    assert runs["mqtt"] == runs["inproc"]  # accuracy, losses, bytes, divergence: bit for bit
    assert runs["ray"] == runs["inproc"]


@pytest.mark.ray
def test_ray_results_come_back_in_job_order(one_thread: None) -> None:
    pytest.importorskip("ray")
    import numpy as np

    from edge_client.local_round import LocalPlan
    from sim.engine import make_transport
    from sim.synthetic import synthetic_world
    from sim.transports import ClientJob

    config = tiny_config(clients=8, clients_per_round=8)
    world = synthetic_world(config, examples_per_client=8)
    spec = config.spec("lora")
    world.model("lora")
    payload = world.initial_state("lora")
    # Uneven work (6 steps, then 1) makes the early jobs finish after the later ones.
    jobs = [
        ClientJob(c, payload, LocalPlan(6 if k < 2 else 1), 4, (0, 0, k)) for k, c in enumerate(world.clients)
    ]
    inproc = make_transport(world, "lora")
    ray_transport = make_transport(
        dataclasses.replace(world, config=dataclasses.replace(config, transport="ray")), "lora"
    )
    try:
        expected = inproc.run(spec, jobs)
        got = ray_transport.run(spec, jobs)
    finally:
        ray_transport.close()
    assert [r.cid for r in got] == [j.client.cid for j in jobs]
    for e, g in zip(expected, got, strict=True):
        assert e.metrics.losses == g.metrics.losses
        assert e.upload.keys() == g.upload.keys()
        assert all(np.array_equal(e.upload[k].numpy(), g.upload[k].numpy()) for k in e.upload)


@pytest.mark.ray
def test_ray_workers_run_at_the_callers_priority() -> None:
    """Ray's default nice 15 starves the actors beside other jobs (they do all the work)."""
    ray = pytest.importorskip("ray")
    from sim.ray_transport import connect

    connect(num_cpus=1)

    @ray.remote
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == os.nice(0)
