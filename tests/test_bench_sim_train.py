"""``fleetlora bench sim --train``: its pieces here, the whole run where ``.venv-flower`` exists.

The Flower app's work (bench/flower_fedit_work.py) runs without Flower, so the claim that both sides
run the same experiment (split, batches, starting adapter, server) is checked here: replayed from
fleetlora's schedule, it scores every round as fleetlora did.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.flops import BertShape, example_flops, gemm_peak_gflops
from bench.flower_fedit_work import FeditWork, run_rounds
from bench.sim_train import experiment_config, run_fleetlora, write_experiment
from export.adapters import attach
from export.models import build_model
from export.spec import AdapterSpec
from fleetlora.cli import main

# The command at a tiny size: tiny-bert on TREC-6, 3 clients, 16 tokens, the adapter on its top block.
TINY_ARGS = [
    "--model",
    "tiny-bert",
    "--dataset",
    "trec6",
    "--clients",
    "3",
    "--max-len",
    "16",
    "--layers",
    "1",
]
TINY = dict(model="tiny-bert", dataset="trec6", clients=4, clients_per_round=3, max_len=16, layers=(1,))


@pytest.mark.parametrize("layers", [(1,), ()])
def test_the_flop_count_is_torchs_plus_what_its_counter_leaves_out(layers: tuple[int, ...]) -> None:
    """torch's FlopCounterMode counts the products (not the CPU attention kernel, nor pooling):
    the count equals it plus attention (4 L^2 d forward, twice that backward, per block) and mean
    pooling (L d forward, 2 L d backward), exactly."""
    base, _ = build_model("tiny-bert", 4, seed=0)
    model = attach(base, AdapterSpec(layers=layers, rank=8))
    batch, n = 3, 16
    ids = torch.randint(1000, 2000, (batch, n))
    mask = torch.ones_like(ids)
    start = min(layers) if layers else 0
    inputs = {"hidden": base.prefix(ids, mask, start), "start_layer": start} if start else {"input_ids": ids}
    with FlopCounterMode(display=False) as counted:
        logits = model(**inputs, attention_mask=mask)
        torch.nn.functional.cross_entropy(logits, torch.zeros(batch, dtype=torch.int64)).backward()
    shape = BertShape.of(model, 4)
    blocks = shape.layers - start
    train, _ = example_flops(shape, n, start, len(layers) or shape.layers, 8, 2)
    left_out = blocks * 12 * n * n * shape.hidden + 3 * n * shape.hidden
    assert train == counted.get_total_flops() / batch + left_out


def test_the_gemm_peak_is_measured() -> None:
    assert gemm_peak_gflops(1, size=256, seconds=0.05) > 0


def test_the_flower_apps_work_replays_fleetloras_run(tmp_path: Path) -> None:
    config = experiment_config(False, rounds=2, **TINY)
    world, ours, schedule = run_fleetlora(config)
    assert len(schedule) == 2 and all(schedule)
    write_experiment(world, schedule, tmp_path)
    work = FeditWork(tmp_path)

    def train_round(rnd: int, glob: dict) -> list:  # what the Flower server gets back from its clients
        replies = []
        for job in schedule[rnd]:
            state, examples, _ = work.train(glob, rnd, job["cid"])
            replies.append((state, examples))
        return replies

    theirs = run_rounds(work, train_round)
    # The same examples in the same batches from the same start: the whole model run from the tokens
    # (Flower) against the cached frozen block (fleetlora) differs only in rounding, far below what
    # moves an argmax on these few hundred examples.
    assert theirs["val_accuracy"] == ours["val_accuracy"]
    assert theirs["test_accuracy"] == ours["test_accuracy"]


def test_the_command_runs_fleetloras_side_and_prints_its_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "sim", "--train", "--no-flower", "--rounds", "1", "--load", "1", *TINY_ARGS]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    last = lines[-1]
    assert last.startswith("sim_train: fleetlora_over_flower=not_measured acc_fleetlora=")
    assert "gflops=" in last and "gemm_peak_gflops=" in last
    # --load: the busy loop ran beside the run and is gone after it (stopped by PID)
    (started,) = [line for line in lines if line.startswith("background load: 1 busy-loop processes")]
    pid = int(started.rsplit("pids ", 1)[1].rstrip(")"))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_train_benchmark_has_its_own_help_and_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bench", "sim", "--train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert (
        out.startswith("usage: fleetlora bench sim --train")
        and "example:\n  fleetlora bench sim --train" in out
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not (Path(__file__).resolve().parent.parent / ".venv-flower" / "bin" / "python").is_file(),
    reason="needs .venv-flower (built by `fleetlora bench sim --flower` or `--train` on first use)",
)
def test_side_by_side_with_flower_at_a_tiny_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "sim", "--train", "--rounds", "2", *TINY_ARGS]) == 0
    out = capsys.readouterr().out
    assert "validation accuracy equal in 2 of 2 rounds" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("sim_train: fleetlora_over_flower=")
    fields = dict(kv.split("=") for kv in last.split(": ", 1)[1].split())
    assert fields["acc_fleetlora"] == fields["acc_flower"]
