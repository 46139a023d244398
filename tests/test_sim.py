"""The simulator end to end on a tiny BERT and real TREC-6 questions."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edge_client.budget import DeviceProfile
from fleetlora.cli import main
from sim.config import ConfigError, SimConfig
from sim.engine import build_world, run_method
from sim.fleet import NoTrainingError
from sim.report import read_metrics
from sim.run import run_experiment

TINY = dict(
    model="tiny-bert",
    dataset="trec6",
    clients=6,
    clients_per_round=3,
    rounds=2,
    max_len=16,
    layers=(1,),
    max_steps=3,
    lr=0.01,
    eval_examples=300,
)


@pytest.fixture(scope="module")
def world():
    return build_world(SimConfig(methods=("fedit",), **TINY))  # type: ignore[arg-type]


def strip_wall(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]


def test_same_seed_repeats_exactly(tmp_path) -> None:
    runs = []
    for name in ("a", "b"):
        config = SimConfig(methods=("fedit", "ravan"), out=str(tmp_path / name), **TINY)  # type: ignore[arg-type]
        runs.append(strip_wall(run_experiment(config, quiet=True)))
    assert runs[0] == runs[1]
    other = SimConfig(methods=("fedit",), out=str(tmp_path / "c"), seed=1, **TINY)  # type: ignore[arg-type]
    assert strip_wall(run_experiment(other, quiet=True)) != runs[0]


def test_run_folder_has_config_metrics_plots_and_summary(tmp_path) -> None:
    config = SimConfig(methods=("fedit", "ravan"), out=str(tmp_path / "run"), **TINY)  # type: ignore[arg-type]
    records = run_experiment(config, quiet=True)
    out = tmp_path / "run"
    assert json.loads((out / "config.json").read_text())["methods"] == ["fedit", "ravan"]
    assert read_metrics(out / "metrics.jsonl") == records
    rounds = [r for r in records if r["kind"] == "round" and r["method"] != "centralized"]
    tests = {r["method"]: r for r in records if r["kind"] == "test"}
    assert len(rounds) == 2 * TINY["rounds"]
    assert set(tests) == {"fedit", "ravan", "centralized", "centralized_ceiling"}  # the reference rows
    for name in ("accuracy_vs_rounds.png", "accuracy_vs_bytes.png", "accuracy_vs_time.png", "divergence.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "| fedit |" in summary and "| ravan |" in summary and "| centralized |" in summary
    for t in tests.values():
        assert 0.0 <= t["test_accuracy"] <= 1.0 and t["chosen_round"] >= 1
    for r in rounds:
        assert 0.0 <= r["val_accuracy"] <= 1.0
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert r["participants"] + r["dropped"] + r["late"] == TINY["clients_per_round"]
    ravan_up = [r["bytes_up"] / r["participants"] for r in rounds if r["method"] == "ravan"]
    lora_up = [r["bytes_up"] / r["participants"] for r in rounds if r["method"] == "fedit"]
    assert max(ravan_up) <= max(lora_up) * 1.1  # Ravan at the same trainable budget uploads no more


def test_a_round_without_updates_keeps_the_global_and_a_run_without_any_is_an_error(world) -> None:
    seen: list[dict] = []
    gone = [
        dataclasses.replace(c, profile=dataclasses.replace(c.profile, dropout=1.0)) for c in world.clients
    ]
    w = dataclasses.replace(world, clients=gone)
    with pytest.raises(NoTrainingError, match=r"no client update was aggregated in 2 rounds \(6 sampled"):
        run_method(w, "fedit", seen.append)
    assert all(r["participants"] == 0 and r["dropped"] == 3 for r in seen)
    assert all(r["virtual_time_s"] == pytest.approx(w.deadline_s * r["round"]) for r in seen)
    assert seen[0]["val_accuracy"] == seen[1]["val_accuracy"]  # never aggregated from nothing
    assert seen[0]["bytes_up"] == 0


def test_a_deadline_nobody_meets_is_an_error_not_an_untrained_model(world, tmp_path) -> None:
    w = dataclasses.replace(world, deadline_s=1e-6)
    # (in the first round that samples no drop-out, else at the end of the run)
    with pytest.raises(NoTrainingError, match=r"(can train within|missed) the 0\.0 s (round )?deadline"):
        run_method(w, "fedit")
    # Said before anything trains when the deadline is set so: the fastest device's round time.
    with pytest.raises(NoTrainingError, match=r"no client can finish a round within the 0\.0 s deadline"):
        build_world(SimConfig(methods=("fedit",), deadline_s=1e-6, **TINY))  # type: ignore[arg-type]
    args = ["sim", "--model", "tiny-bert", "--dataset", "trec6", "--clients", "2", "--clients-per-round", "2"]
    assert main([*args, "--deadline", "0.000001", "--out", str(tmp_path)]) == 2


def test_fixed_local_steps_get_a_deadline_sized_for_them() -> None:
    """The deadline trap: a deadline sized for max_steps dropped most clients of --local-steps 20."""
    w = build_world(SimConfig(methods=("fedit",), **{**TINY, "local_steps": 20}))  # type: ignore[arg-type]
    on_time = [c for c in w.clients if c.budgets["lora"].round_s <= w.deadline_s]
    assert len(on_time) >= len(w.clients) // 2  # the deadline lets the median device do 20 steps
    assert all(c.budgets["lora"].local_steps == 20 for c in w.clients)


def test_weak_devices_train_fewer_ravan_heads(world) -> None:
    weak = DeviceProfile("weak", "phone", 2.0, 4000, 5.0, 20.0, 1.0, 0.0)
    clients = [dataclasses.replace(c, profile=weak) for c in world.clients]
    records = run_method(dataclasses.replace(world, clients=clients), "ravan").rounds
    assert all(h <= world.config.heads for r in records for h in r["heads"])


def test_bad_config_and_flags_fail_clearly(capsys) -> None:
    with pytest.raises(ConfigError, match="clients_per_round"):
        SimConfig(clients=3, clients_per_round=5)
    assert main(["sim", "--method", "nosuch"]) == 2
    assert "unknown method" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sim", "--rounds", "-1"])


def test_methods_run_back_to_back_start_from_the_same_adapter(world) -> None:
    first = strip_wall(run_method(world, "fedit").records)
    assert strip_wall(run_method(world, "fedit").records) == first
