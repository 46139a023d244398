"""On a machine with CUDA, the coordinator's math gives on the GPU what it gives on the CPU.

The aggregators pick CUDA when present (``device="auto"``); everything else in the suite pins the CPU,
so these are the tests that check the GPU path. They are skipped where there is no GPU (CI).
"""

from __future__ import annotations

import pytest
import torch
from test_aggregators import DENSE, assert_products_close, make_round, spec_for

from coordinator.aggregators import available, create, get
from coordinator.rpca import pcp
from export.base_delta import applied_base_delta
from export.state import BASE_DELTA_A, BASE_DELTA_B

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", available())
def test_every_method_gives_the_cpu_result_on_cuda(method: str):
    family = get(method).family
    glob, updates = make_round(family, 6, seed=11, method=method)
    on_cpu = create(method, spec_for(family), device="cpu")
    on_gpu = create(method, spec_for(family), device="cuda")
    want = on_cpu.aggregate(glob, updates)
    got = on_gpu.aggregate(on_gpu.init_global(glob), updates)  # the uploads stay on the host, as received
    # Every float tensor is on the GPU; FLoRA's base version is an integer counter, kept on the host.
    assert all(t.device.type == "cuda" for t in got.values() if t.is_floating_point())
    cpu_got = {k: v.cpu() for k, v in got.items()}
    assert_products_close(family, cpu_got, want, shared=glob)
    torch.testing.assert_close(cpu_got[DENSE], want[DENSE])
    if "divergence" in on_cpu.metrics:
        assert on_gpu.metrics["divergence"] == pytest.approx(on_cpu.metrics["divergence"], rel=1e-4, abs=1e-7)


def test_batched_pcp_on_cuda_matches_the_cpu_iteration_for_iteration():
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(5, 600, 50, generator=gen, dtype=torch.float64)
    m[:, :, :25] += torch.randn(5, 600, 1, generator=gen, dtype=torch.float64) * 3  # a shared direction
    want = pcp(m)
    got = pcp(m.cuda())
    assert got.low_rank.device.type == "cuda"
    assert torch.equal(got.iterations.cpu(), want.iterations)
    assert bool(got.converged.all())
    scale = m.norm(dim=(1, 2))
    for part in ("low_rank", "sparse"):
        diff = (getattr(got, part).cpu() - getattr(want, part)).norm(dim=(1, 2)) / scale
        assert float(diff.max()) < 1e-9, part


def test_a_base_delta_from_a_cuda_coordinator_applies_to_a_cpu_model():
    """FLoRA / FedEx-LoRA globals carry the base change on the coordinator's device; the simulator
    evaluates (and a client trains) on a CPU model."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(6, 5))
    x = torch.randn(3, 6)
    b, a = torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    want = layer(x) + x @ (b @ a).T.float()
    with applied_base_delta(layer, {"0" + BASE_DELTA_B: b.cuda(), "0" + BASE_DELTA_A: a.cuda()}):
        torch.testing.assert_close(layer(x), want)


def test_the_simulator_trains_on_cuda_what_it_trains_on_the_cpu():
    """``--device cuda``: the clients' uploads of one round, one by one and batched, against the CPU's.

    Same function, another device: only the products' summation order differs (cuBLAS float32, TF32
    off by torch's default), so test_batched's bound applies (its derivation: TOL there).
    """
    from test_batched import OPTIMIZER, assert_same_results, one_by_one, round_jobs, tiny_config

    from edge_client.trainer import EagerTrainer
    from sim.batched import train_batched
    from sim.synthetic import synthetic_world

    assert not torch.backends.cuda.matmul.allow_tf32, "TF32 products would need a looser bound"
    results = {}
    for device in ("cpu", "cuda"):
        world = synthetic_world(tiny_config(layers=(), device=device), examples_per_client=6)
        assert world.train.x.device.type == device
        for method in ("fedit", "ravan", "hetlora"):
            spec, model, template, jobs = round_jobs(world, method)
            assert next(model.parameters()).device.type == device
            results[device, method, "one"] = one_by_one(model, spec, template, world.train, jobs)
            trainer = EagerTrainer(model, OPTIMIZER)
            results[device, method, "batched"] = train_batched(trainer, spec, template, world.train, jobs)
    for (device, method, _mode), got in results.items():
        if device == "cuda":
            on_host = [
                type(r)(
                    r.cid,
                    {k: v.cpu() for k, v in r.upload.items()},
                    r.metrics,
                    {k: v.cpu() for k, v in r.local.items()},
                )
                for r in got
            ]
            assert_same_results(on_host, results["cpu", method, "one"])


def test_a_simulated_run_on_cuda_scores_as_on_the_cpu():
    from test_batched import tiny_config
    from tolerances import TINY_BERT_TRAIN_TOL

    from sim.engine import run_method
    from sim.synthetic import synthetic_world

    runs = {}
    for device in ("cpu", "cuda"):
        config = tiny_config(clients=6, rounds=1, layers=(1,), local_steps=2, device=device)
        runs[device] = run_method(synthetic_world(config), "fedit").rounds[0]
    # One round of 2 steps from the fresh adapter (test_batched's growth factor, 2 steps, no momentum).
    assert runs["cuda"]["train_loss"] == pytest.approx(runs["cpu"]["train_loss"], abs=2 * TINY_BERT_TRAIN_TOL)
    assert runs["cuda"]["val_loss"] == pytest.approx(runs["cpu"]["val_loss"], abs=2 * TINY_BERT_TRAIN_TOL)
