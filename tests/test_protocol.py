"""The learning protocol: validation chooses, the test split is read once, the centralized reference,
per-method training settings, the server optimizer, work weighting and the seed statistics."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import sim.engine as engine
from coordinator import aggregators
from coordinator.aggregators import ClientUpdate
from coordinator.server_optimizer import ServerOptimizer
from export.spec import AdapterSpec
from sim.centralized import CEILING, run_centralized
from sim.config import ConfigError, SimConfig
from sim.engine import auto_max_len, build_world, run_method
from sim.report import paired_rows, summary_rows
from sim.stats import mean_std, paired, t95

TINY = SimConfig(
    methods=("fedit",), model="tiny-bert", dataset="trec6", clients=6, clients_per_round=3, rounds=4,
    max_len=16, layers=(1,), max_steps=3, lr=0.05, eval_examples=300,
)  # fmt: skip


@pytest.fixture(scope="module")
def world() -> engine.World:
    return build_world(TINY)


def test_validation_is_carved_from_training_and_never_overlaps_the_clients(world) -> None:
    n_train = len(world.train) + len(world.val)
    assert len(world.val) == pytest.approx(TINY.val_fraction * n_train, abs=len(world.classes))
    pooled = np.concatenate([c.indices for c in world.clients])
    assert sorted(pooled.tolist()) == list(range(len(world.train)))  # clients hold the pool, all of it
    # Every class of the training split is represented in validation (stratified).
    assert set(world.val.labels.tolist()) == set(world.train.labels.tolist())


def test_the_test_split_is_read_once_for_the_round_validation_chose(world, monkeypatch) -> None:
    reads: list[int] = []
    evaluate = engine.evaluate_global

    def counting(model, spec, agg, state, template, inputs, *args):  # type: ignore[no-untyped-def]
        if inputs is world.test:
            reads.append(1)
        return evaluate(model, spec, agg, state, template, inputs, *args)

    monkeypatch.setattr(engine, "evaluate_global", counting)
    run = run_method(world, "fedit")
    assert len(reads) == 1
    best = max(run.rounds, key=lambda r: r["val_accuracy"])
    assert run.test["chosen_round"] == min(
        r["round"] for r in run.rounds if r["val_accuracy"] == best["val_accuracy"]
    )  # the first round reaching the best validation accuracy
    assert run.test["val_accuracy"] == best["val_accuracy"]
    assert all("test_accuracy" not in r and "accuracy" not in r for r in run.rounds)


def test_patience_stops_a_run_whose_validation_stopped_improving(world) -> None:
    w = dataclasses.replace(world, config=dataclasses.replace(world.config, rounds=12, patience=1, lr=1e-6))
    run = run_method(w, "fedit")  # a learning rate this small barely moves validation accuracy
    rounds = len(run.rounds)
    assert rounds < 12 and run.test["rounds_run"] == rounds
    assert rounds - run.test["chosen_round"] == 1  # stopped one round after the best


def test_centralized_reference_sees_the_federated_examples_then_trains_to_its_ceiling(world) -> None:
    per_round = [96, 48, 96]
    seen: list[dict] = []
    matched, ceiling = run_centralized(world, per_round, seen.append)
    budget = [r for r in seen if r["within_budget"]]
    # Chunk r processes what federated round r did, in whole batches of the run's batch size.
    batch = world.config.batch_size
    assert [r["examples"] for r in budget] == [math.ceil(n / batch) * batch for n in per_round]
    assert matched.test["chosen_round"] <= len(per_round) < len(seen)
    assert ceiling.test["method"] == CEILING and ceiling.test["val_accuracy"] >= matched.test["val_accuracy"]
    after = [r["val_accuracy"] for r in seen[ceiling.test["chosen_round"] :]]
    patience = world.config.patience or 3
    assert len(after) == patience or seen[-1]["epochs"] >= world.config.centralized_max_epochs  # or the cap
    with pytest.raises(ValueError, match="needs the examples"):
        run_centralized(world, [])


def test_a_method_can_override_training_settings_and_bad_ones_are_named() -> None:
    config = dataclasses.replace(
        TINY, methods=("fedit", "fedrpca"), method_params={"fedrpca": {"lr": 0.01, "beta": 2.0}}
    )
    assert config.for_method("fedrpca").lr == 0.01 and config.for_method("fedit").lr == TINY.lr
    assert config.aggregator_params("fedrpca") == {"beta": 2.0}
    with pytest.raises(ConfigError, match=r"method_params\['fedit'\]: lr must be > 0"):
        dataclasses.replace(TINY, method_params={"fedit": {"lr": -1.0}})
    with pytest.raises(ConfigError, match="names 'ravan', which is not run"):
        dataclasses.replace(TINY, method_params={"ravan": {"lr": 0.1}})
    with pytest.raises(
        ConfigError, match=r"method_params\['fedrpca'\]: method 'fedrpca' has no option 'betta'"
    ):
        dataclasses.replace(TINY, methods=("fedrpca",), method_params={"fedrpca": {"betta": 2.0}})


def test_server_optimizer_is_fedavgm_and_the_identity_by_default() -> None:
    old = {"w": torch.zeros(3), "n": torch.tensor(5)}
    new = {"w": torch.ones(3), "n": torch.tensor(6)}
    assert ServerOptimizer().step(old, new) is new  # lr 1, momentum 0: the aggregate itself
    opt = ServerOptimizer(lr=0.5, momentum=0.9)
    first = opt.step(old, new)
    torch.testing.assert_close(first["w"], torch.full((3,), 0.5), rtol=0, atol=0)  # 0 + 0.5 * 1: exact
    assert torch.equal(first["n"], new["n"])  # integers are taken from the aggregate
    second = opt.step(first, {"w": first["w"] + 1, "n": new["n"]})
    # v = 0.9 * 1 + 1 = 1.9; w = 0.5 + 0.5 * 1.9 = 1.45 (a few float32 roundings of values near 1)
    torch.testing.assert_close(
        second["w"], torch.full((3,), 1.45), rtol=4 * torch.finfo(torch.float32).eps, atol=0
    )
    # FLoRA and FedEx-LoRA re-initialise their adapter every round: no server step applies to them.
    assert opt.for_method(changes_base=True).is_identity and opt.for_method(changes_base=False) is opt


def test_work_weighting_follows_the_examples_each_client_processed() -> None:
    agg = aggregators.create("fedit", AdapterSpec(), device="cpu", weighting="work")
    ups = [ClientUpdate("a", {}, 100, examples_seen=16), ClientUpdate("b", {}, 10, examples_seen=48)]
    torch.testing.assert_close(agg.weights(ups), torch.tensor([0.25, 0.75], dtype=torch.float64))
    with pytest.raises(ValueError, match="examples_seen > 0"):
        agg.weights([ClientUpdate("a", {}, 100)])


def test_tokens_per_example_follow_the_training_split(world) -> None:
    from export.data import load_text_dataset
    from export.models import build_model

    dataset = load_text_dataset("trec6")
    _, tokenizer = build_model("tiny-bert", len(dataset.classes))
    assert auto_max_len(dataset, tokenizer) == 32  # TREC questions: median ~12 tokens, the floor


def test_seed_statistics_and_the_paired_interval() -> None:
    assert mean_std([0.5]) == (0.5, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert (m, s) == (2.0, 1.0)
    d = paired({0: 0.9, 1: 0.84, 2: 0.91}, {0: 0.8, 1: 0.75, 2: 0.8})
    diffs = [0.9 - 0.8, 0.84 - 0.75, 0.91 - 0.8]
    sd = float(np.std(diffs, ddof=1))
    assert d.mean == pytest.approx(np.mean(diffs)) and d.half_width == pytest.approx(
        t95(2) * sd / math.sqrt(3)
    )
    assert d.verdict() == "higher"
    assert paired({0: 0.1, 1: 0.2, 2: 0.3}, {0: 0.2, 1: 0.1, 2: 0.3}).verdict() == "within noise"
    assert paired({0: 0.1}, {0: 0.2}).verdict() == "one seed: no verdict"
    # two seeds that differ by the same count collapse the interval to a point: no verdict from that
    same = paired({0: 0.9397, 1: 0.9443}, {0: 0.9356, 1: 0.9402})
    assert same.verdict() == "2 seeds: no verdict (3 needed)"


def test_summary_rows_report_test_accuracy_over_seeds_and_the_gap_to_the_reference() -> None:
    def test(method: str, seed: int, acc: float) -> dict:
        return {
            **{"kind": "test", "method": method, "seed": seed, "test_accuracy": acc, "val_accuracy": acc},
            **{"chosen_round": 3, "wall_time_s": 1.0, "bytes_up_total": 2e6, "virtual_time_s": 60.0},
        }

    records = [
        test("fedit", 0, 0.8),
        test("fedit", 1, 0.9),
        test("centralized", 0, 0.95),
        test("centralized", 1, 0.95),
    ]
    rows = {r["method"]: r for r in summary_rows(records)}
    assert rows["fedit"]["test_acc"] == pytest.approx(0.85) and rows["fedit"]["vs_central"] == pytest.approx(
        -0.1
    )
    assert math.isnan(rows["centralized"]["vs_central"])
    records += [test("ravan", 0, 0.82), test("ravan", 1, 0.91)]
    (row,) = paired_rows(records, "fedit")
    assert row["method"] == "ravan - fedit" and row["diff"] == pytest.approx(0.015)
