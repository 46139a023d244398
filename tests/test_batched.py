"""Batched clients (sim/batched.py) give the adapters one-by-one training gives.

Every case trains four clients of a tiny BERT with different local steps (so clients leave the
batch), different batch sizes (so short batches are padded), SGD with momentum and weight decay (so
the per-client optimizer state matters), from a global that is not the fresh adapter (so every
factor has a gradient), and compares each upload with the one the one-by-one transport sends.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
from tolerances import TINY_BERT_TRAIN_TOL

from coordinator import aggregators
from coordinator.aggregators import ClientInfo, ClientUpdate
from edge_client.local_round import LocalPlan
from edge_client.trainer import EagerTrainer, OptimizerConfig
from export.base_delta import split_base_delta
from export.state import State
from sim.batched import BatchedTransport, train_batched, unbatchable
from sim.config import SimConfig
from sim.engine import run_method
from sim.synthetic import synthetic_world
from sim.transports import ClientJob, ClientResult, InProcTransport

pytestmark = pytest.mark.numerical

STEPS = (3, 1, 4, 2)  # clients leave the batch after 1, 2, 3 and 4 steps
BATCHES = (4, 2, 4, 3)  # the short batches are padded to 4 rows
RANKS = (2, None, 4, 1)  # heterogeneous LoRA ranks (None: the spec's 8)
HEADS = ((0, 2), None, (1,), (0, 1, 3))  # Ravan head subsets of 4 heads (None: all)
OPTIMIZER = OptimizerConfig(lr=0.05, momentum=0.9, weight_decay=0.01)

# One-by-one and batched training compute the same function; only the order of the products' sums
# differs (one bmm over clients against one mm per client, padded rows adding exact zeros, a loss
# summed then divided instead of averaged), so each step's gradient differs by at most the tiny-BERT
# forward+backward bound TINY_BERT_TRAIN_TOL (~1e-4, relative to O(1) gradients). To first order a
# parameter moves lr times the momentum buffer each step, a buffer sums at most 1 / (1 - momentum)
# gradients' errors, and these add over the steps: growth factor lr * steps / (1 - momentum) = 2 for
# 4 steps. Uploads are O(1), so the bound is absolute (2e-4; what a run shows is ~1e-7).
TOL = OPTIMIZER.lr * max(STEPS) / (1 - OPTIMIZER.momentum) * TINY_BERT_TRAIN_TOL


def tiny_config(**changes: object) -> SimConfig:
    """Four tiny-bert clients, all sampled, 12 tokens (``changes``: other settings)."""
    base = SimConfig(
        methods=("fedit",), model="tiny-bert", clients=4, clients_per_round=4, max_len=12, partition="iid"
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def worlds():
    return {
        name: synthetic_world(tiny_config(layers=layers), examples_per_client=6)
        for name, layers in (("prefix", (1,)), ("all-blocks", ()))
    }


def one_by_one(model, spec, template, inputs, jobs) -> list[ClientResult]:
    return InProcTransport(model, EagerTrainer(model, OPTIMIZER), template, inputs).run(spec, jobs)


def round_jobs(world, method: str) -> tuple[object, object, State, list[ClientJob]]:
    """The method's spec, model, template and the jobs of one round from a non-fresh global."""
    family = aggregators.get(method).family
    spec = aggregators.get(method).client_spec(world.config.spec(family))
    agg = aggregators.create(method, spec, device="cpu")
    model, template = world.model(family, spec), world.initial_state(family, spec)
    gen = torch.Generator().manual_seed(7)
    glob = agg.init_global(template)
    glob = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if k in template else v for k, v in glob.items()}
    hetero = bool(getattr(agg, "heterogeneous_ranks", False))
    kept = [k for k in template if agg.local_suffixes and k.endswith(agg.local_suffixes)]

    def jobs_from(glob: State) -> list[ClientJob]:
        jobs = []
        for i, client in enumerate(world.clients):
            plan = LocalPlan(
                STEPS[i],
                rank=RANKS[i] if hetero else None,
                heads=HEADS[i] if family == "ravan" else None,
            )
            payload = agg.payload_for(ClientInfo(client.cid, plan.rank, plan.heads), glob)
            keep = {k: template[k] + 0.05 * (i + 1) for k in kept} or None  # FedSA: each client's own B
            jobs.append(ClientJob(client, payload, plan, BATCHES[i], (0, 1, i), keep_local=keep))
        return jobs

    jobs = jobs_from(glob)
    if agg.changes_base:  # a round later, the payload carries the base change the method made
        results = one_by_one(model, spec, template, world.train, jobs)
        updates = [
            ClientUpdate(r.cid, r.upload, 6, rank=j.plan.rank, meta={"heads": j.plan.heads})
            for r, j in zip(results, jobs, strict=True)
        ]
        jobs = jobs_from(agg.aggregate(glob, updates))
        assert len(split_base_delta(jobs[0].payload)[1]) > 1, "no base change in the payload"
    return spec, model, template, jobs


def assert_same_results(got: list[ClientResult], want: list[ClientResult]) -> None:
    assert [r.cid for r in got] == [r.cid for r in want]
    for g, w in zip(got, want, strict=True):
        assert g.upload.keys() == w.upload.keys() and g.local.keys() == w.local.keys()
        for k in w.upload:
            torch.testing.assert_close(
                g.upload[k], w.upload[k], rtol=0, atol=TOL, msg=lambda m, k=k: f"{k}: {m}"
            )
        for k in w.local:
            torch.testing.assert_close(g.local[k], w.local[k], rtol=0, atol=TOL)
        assert (g.metrics.steps, g.metrics.examples) == (w.metrics.steps, w.metrics.examples)
        assert g.metrics.losses == pytest.approx(w.metrics.losses, abs=TINY_BERT_TRAIN_TOL)


@pytest.mark.parametrize(
    ("method", "where"),
    [
        ("fedit", "prefix"),  # LoRA
        ("fedit", "all-blocks"),
        ("ravan", "prefix"),  # Ravan with head subsets
        ("hetlora", "prefix"),  # heterogeneous ranks, zero-padded and masked
        ("flexlora", "all-blocks"),
        ("fedsa_lora", "prefix"),  # each client's kept B
        ("ffa_lora", "prefix"),  # a frozen, shared A
        ("flora", "prefix"),  # base-delta methods: the round's base change, applied once
        ("fedex_lora", "all-blocks"),
    ],
)
def test_batched_clients_train_the_adapters_one_by_one_training_does(worlds, method: str, where: str):
    spec, model, template, jobs = round_jobs(worlds[where], method)
    trainer = EagerTrainer(model, OPTIMIZER)
    assert unbatchable(trainer, spec, jobs) is None
    want = one_by_one(model, spec, template, worlds[where].train, jobs)
    got = train_batched(trainer, spec, template, worlds[where].train, jobs)
    assert_same_results(got, want)


def test_padded_rank_components_get_no_gradient_and_stay_zero(worlds):
    spec, model, template, jobs = round_jobs(worlds["prefix"], "hetlora")
    trainer = EagerTrainer(model, OPTIMIZER)
    got = train_batched(trainer, spec, template, worlds["prefix"].train, jobs)
    for result, rank in zip(got, RANKS, strict=True):
        for key, t in result.upload.items():  # the rank slice a client uploads
            if key.endswith("lora_A.default.weight"):
                assert t.shape[0] == (rank or spec.rank)


def test_what_cannot_be_batched_trains_one_by_one_and_says_why_once(worlds, caplog):
    spec, model, template, jobs = round_jobs(worlds["prefix"], "fedit")
    adamw = EagerTrainer(model, OptimizerConfig(name="adamw", lr=1e-3))
    transport = BatchedTransport(model, adamw, template, worlds["prefix"].train, label="fedit")
    want = InProcTransport(model, adamw, template, worlds["prefix"].train).run(spec, jobs)
    with caplog.at_level(logging.WARNING, logger="sim.batched"):
        first = transport.run(spec, jobs)
        transport.run(spec, jobs)
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "batched clients off for fedit: optimizer adamw (batched clients reproduce SGD only); "
        "training them one by one"
    ]
    for g, w in zip(first, want, strict=True):  # the one-by-one path itself: bit-identical
        assert all(torch.equal(g.upload[k], w.upload[k]) for k in w.upload)


def test_the_engine_gives_the_same_run_batched_or_not():
    config = tiny_config(clients=6, rounds=2, layers=(), local_steps=2, patience=0)
    runs = {}
    for mode in ("on", "off"):
        world = synthetic_world(dataclasses.replace(config, batched=mode))
        runs[mode] = run_method(world, "fedit")
    for on, off in zip(runs["on"].rounds, runs["off"].rounds, strict=True):
        assert on["val_accuracy"] == off["val_accuracy"]
        assert math.isclose(on["train_loss"], off["train_loss"], abs_tol=TINY_BERT_TRAIN_TOL)
