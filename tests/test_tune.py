"""``fleetlora tune``: the same budget for every method, validation only, resumable, and a TOML that
``fleetlora sim --config`` runs."""

from __future__ import annotations

import json
import tomllib

import pytest

import sim.engine as engine
from fleetlora.cli import main
from sim.tune import OWN_POINTS, best_params, read_trials, trials_for

ARGS = [
    "--model", "tiny-bert", "--dataset", "trec6", "--clients", "4", "--clients-per-round", "2",
    "--rounds", "2", "--max-len", "16", "--layers", "1", "--max-steps", "2", "--eval-examples", "64",
]  # fmt: skip


def test_every_method_gets_the_same_number_of_trials() -> None:
    trials = trials_for(("fedit", "fedrpca", "flora_na", "ravan"), (0.01, 0.05))
    counts = {m: sum(t.method == m for t in trials) for m in ("fedit", "fedrpca", "flora_na", "ravan")}
    assert set(counts.values()) == {2 * OWN_POINTS}
    assert {t.params["beta"] for t in trials if t.method == "fedrpca"} == {2.0, 4.0, "adaptive"}


def test_tune_searches_on_validation_resumes_and_writes_a_config_sim_runs(tmp_path, monkeypatch) -> None:
    reads, worlds = [], []
    evaluate, build = engine.evaluate_global, engine.build_world
    monkeypatch.setattr(
        engine, "evaluate_global", lambda *a: reads.append(a[5]) or evaluate(*a)
    )  # a[5]: inputs
    monkeypatch.setattr(engine, "build_world", lambda c: worlds.append(build(c)) or worlds[-1])
    out = tmp_path / "tune"
    argv = ["tune", *ARGS, "--method", "fedit,fedrpca", "--lrs", "0.01,0.1", "--out", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * OWN_POINTS
    assert len(worlds) == 1 and reads and all(x is not worlds[0].test for x in reads)  # validation only
    assert main(argv) == 0  # resumed: every trial was done, nothing runs again
    assert len((out / "trials.jsonl").read_text().splitlines()) == len(rows)
    tuned = tomllib.loads((out / "tuned.toml").read_text())
    assert tuned["method"] == "fedit,fedrpca" and tuned["model"] == "tiny-bert" and "centralized" not in tuned
    assert tuned["method_params"] == best_params(list(read_trials(out / "trials.jsonl").values()))
    run = tmp_path / "run"
    assert main(["sim", "--config", str(out / "tuned.toml"), "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["method_params"] == tuned["method_params"] and config["max_len"] == 16


def test_a_damaged_trials_file_is_named_not_skipped(tmp_path, capsys) -> None:
    out = tmp_path / "tune"
    out.mkdir()
    (out / "trials.jsonl").write_text('{"method": "fedit"}\n')
    assert main(["tune", *ARGS, "--method", "fedit", "--out", str(out)]) == 2
    assert f"{out / 'trials.jsonl'}:1: not a trial record" in capsys.readouterr().err


def test_bad_learning_rates_are_refused(capsys) -> None:
    assert main(["tune", "--lrs", "0.1,-1"]) == 2
    assert "--lrs must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", "--rounds", "0"])


def test_a_run_configs_flags_round_trip_without_the_cli() -> None:
    """``bench claims`` reads a tuned TOML with SimConfig alone (only the CLI package parses flags)."""
    from sim.config import ConfigError, SimConfig

    config = SimConfig(methods=("fedit", "ravan"), layers=(4, 5), deadline_s=3.0, max_len=16, seeds=(0, 2))
    config = SimConfig(**{**config.to_dict(), "method_params": {"ravan": {"lr": 0.1}}})
    assert SimConfig.from_flag_values(config.flag_values(skip=())) == config
    with pytest.raises(ConfigError, match="unknown setting 'nosuch'"):
        SimConfig.from_flag_values({"nosuch": 1})
