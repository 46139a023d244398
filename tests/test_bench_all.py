"""``fleetlora bench all``'s learning-quality grid: the configurations it runs and the table it writes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench.all import (
    FULL,
    KEPT_MARKER,
    QUICK,
    TARGETS,
    finished_records,
    grid_configs,
    kept_section,
    quality_rows,
    read_speed,
    report,
)
from fleetlora.cli.bench import BENCHMARKS


def test_the_full_grid_is_every_method_on_both_datasets_three_splits_three_seeds(tmp_path: Path) -> None:
    configs = grid_configs(FULL, tmp_path)
    assert len(configs) == 2 * 3 * 3
    cells = {(c.dataset, c.partition, c.alpha, c.seed) for c in configs}
    assert ("20news", "dirichlet", 0.1, 2) in cells and ("reuters8", "iid", 0.3, 0) in cells
    assert len({c.out for c in configs}) == len(configs)  # no run overwrites another's folder
    assert all(len(c.methods) >= 14 for c in configs)
    assert {c.dataset for c in grid_configs(QUICK, tmp_path)} <= set(TARGETS)


def test_quality_rows_give_mean_spread_and_bytes_to_the_datasets_target(tmp_path: Path) -> None:
    def run(seed: int, accuracies: list[float]) -> tuple:
        (config,) = [c for c in grid_configs(QUICK, tmp_path) if c.partition == "iid"]
        config = dataclasses.replace(config, seed=seed, methods=("fedit",))
        records = [
            {"kind": "round", "method": "fedit", "val_accuracy": a, "bytes_up_total": (i + 1) * 1e6}
            for i, a in enumerate(accuracies)
        ]
        test = {"kind": "test", "method": "fedit", "test_accuracy": accuracies[-1]}
        return config, [*records, test]

    target = TARGETS["trec6"]
    rows = quality_rows([run(0, [0.2, target, 0.6]), run(1, [0.1, 0.2, 0.4])])
    (row,) = rows
    # Two seeds' test accuracies 0.6 and 0.4: sample std sqrt(0.02) (n - 1 in the denominator).
    assert row["test_acc_mean"] == pytest.approx(0.5) and row["test_acc_std"] == pytest.approx(0.02**0.5)
    assert row["MB_up_to_target"] == pytest.approx(2.0)  # only seed 0 reached it, after 2 MB
    assert row["target_acc"] == target and row["seeds"] == 2
    (never,) = quality_rows([run(1, [0.1, 0.2, 0.4])])
    assert never["MB_up_to_target"] == "not reached"


def test_a_report_written_midway_says_how_far_the_run_got(tmp_path: Path) -> None:
    (config, _) = grid_configs(QUICK, tmp_path)
    records = [{"kind": "test", "method": m, "test_accuracy": 0.6} for m in config.methods]
    speed = ["| `fleetlora bench ingest` | `ingest: ratio_to_raw=0.71 lost=0` | 30 s |"]
    text = report("fleetlora bench all", QUICK, speed, [(config, records)], 2, None, None)
    assert "**Partial**: 1 of 2 simulator runs" in text and "ratio_to_raw=0.71" in text
    assert all(f"| {m} |" in text for m in config.methods)
    assert "Compute heterogeneity" not in text  # not run yet


def test_the_hand_written_tail_of_a_report_survives_regeneration(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    assert kept_section(path) == ""
    path.write_text(f"# old generated part\n\n{KEPT_MARKER}\n## Notes\nmeasured by hand\n")
    assert kept_section(path) == f"\n{KEPT_MARKER}\n## Notes\nmeasured by hand\n"
    path.write_text("# a report without the marker\n")
    assert kept_section(path) == ""


def test_resume_reuses_only_a_complete_run_of_the_same_config(tmp_path: Path) -> None:
    (config, _) = grid_configs(QUICK, tmp_path)
    folder = Path(config.out)
    folder.mkdir(parents=True)
    config.save(folder / "config.json")
    records = [{"kind": "round", "method": m, "round": r} for m in config.methods for r in range(1, 4)]
    records += [{"kind": "test", "method": m, "test_accuracy": 0.5} for m in config.methods]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:-1]))
    assert finished_records(config) is None  # the last method's test line is missing
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert finished_records(config) == records
    assert finished_records(dataclasses.replace(config, rounds=5)) is None  # another config


def test_resume_reuses_sub_benchmark_lines_but_never_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "speed.jsonl"
    assert read_speed(path) == {}
    rows = [
        {"name": "ingest", "line": "ingest: ratio_to_raw=0.71 lost=0", "seconds": 19.0},
        {"name": "client", "line": "client: failed (exit 1): boom", "seconds": 3.0},
        {"name": "scale", "line": "scale: timed out after 7200s", "seconds": 7200.0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_speed(path) == {"ingest": ("ingest: ratio_to_raw=0.71 lost=0", 19.0)}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_help_ends_with_its_example(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fleetlora.cli import main

    with pytest.raises(SystemExit) as info:
        main(["bench", name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fleetlora bench") and f"example:\n  fleetlora bench {name} " in out


def test_the_native_client_benchmark_has_its_own_help_and_example(capsys: pytest.CaptureFixture[str]) -> None:
    from fleetlora.cli import main

    with pytest.raises(SystemExit) as info:
        main(["bench", "client", "--runtime", "native", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fleetlora bench client --runtime native")
    assert "example:\n  fleetlora bench client --runtime native" in out
