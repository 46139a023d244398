"""The simulator's thread policy: an explicit choice wins, else the cores not already busy, never 0."""

from __future__ import annotations

import os

import pytest

from sim import threads


def test_explicit_then_environment_then_idle_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads(2) == (2, "--threads")
    assert threads.choose_threads(0) == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert threads.choose_threads(0)[0] == 2  # an idle 2-core machine: both cores
    monkeypatch.setattr(os, "getloadavg", lambda: (1.4, 0.0, 0.0))
    assert threads.choose_threads(0)[0] == 1  # one core busy elsewhere: one thread
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 0.0, 0.0))
    n, why = threads.choose_threads(0)
    assert n == 1 and "load 7.0" in why  # never fewer than one, and the reason is printed


def test_device_auto_takes_cuda_only_when_torch_sees_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert threads.choose_device("auto")[0] == "cpu"
    assert threads.choose_device("cpu") == ("cpu", "--device cpu")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        threads.choose_device("cuda")  # a CPU run would be a wrong measurement: refused


def test_sim_with_cuda_asked_and_none_present_fails_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from fleetlora.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert main(["sim", "--model", "tiny-bert", "--device", "cuda", "--out", "/nonexistent"]) != 0
    assert "--device cuda" in capsys.readouterr().err


def test_ray_actors_split_the_clusters_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    from sim.config import SimConfig
    from sim.ray_transport import gpu_share

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0})
    assert gpu_share(SimConfig(), 4) == 0.25  # four actors share the one GPU
    assert gpu_share(SimConfig(device="cpu"), 4) == 0.0  # --device cpu: no GPU asked for
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 8.0})
    assert gpu_share(SimConfig(), 4) == 1.0  # at most one whole GPU per actor
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert gpu_share(SimConfig(), 2) == 0.0  # no GPU in the cluster
