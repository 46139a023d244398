"""``fleetlora sim --trainer executorch``: the virtual clients train with a bundle's ExecuTorch program
and give the eager trainer's numbers (same SGD, same batches)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from tolerances import TINY_BERT_TRAIN_TOL

from fleetlora.cli import main
from sim.config import ConfigError, SimConfig
from sim.engine import build_world
from sim.run import run_experiment

# rank/heads/batch/max_len match tests/deploy_helpers.py: one cached bundle serves both tests.
TINY = SimConfig(
    methods=("fedit",), model="tiny-bert", dataset="trec6", clients=3, clients_per_round=2, rounds=2,
    max_len=16, layers=(), rank=4, heads=2, batch_size=8, max_steps=3, optimizer="sgd", lr=0.05,
    eval_examples=300, trainer="executorch", centralized=False,
)  # fmt: skip
# Eager and ExecuTorch clients each train within tiny-bert's training rounding bound of the other, and
# a round starts from the previous round's (so differing) global: the bounds add over the rounds.
ROUNDS_TOL = TINY.rounds * TINY_BERT_TRAIN_TOL


def rounds(records: list[dict]) -> list[dict]:
    return [r for r in records if r["kind"] == "round"]


def test_executorch_needs_sgd(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="--optimizer sgd"):
        dataclasses.replace(TINY, optimizer="adamw")
    assert main(["sim", "--trainer", "executorch", "--optimizer", "adamw"]) == 2
    assert "--optimizer sgd" in capsys.readouterr().err


def test_export_refuses_a_base_delta_for_a_ravan_adapter(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """FLoRA and FedEx-LoRA change a LoRA model's base; a Ravan program has no use for the inputs."""
    argv = ["export", "--family", "ravan", "--base-delta", "--num-classes", "4", "--out", str(tmp_path / "b")]
    assert main(argv) == 2
    assert "--base-delta needs --family lora" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_executorch_world_feeds_token_ids() -> None:
    """The program takes token ids: no cached hidden states, whatever layers carry the adapter."""
    world = build_world(dataclasses.replace(TINY, layers=(1,)))
    assert world.train.start_layer == 0 and world.train.x.dtype.is_floating_point is False
    assert build_world(dataclasses.replace(TINY, layers=(1,), trainer="eager")).train.start_layer == 1


@pytest.mark.executorch
@pytest.mark.numerical
def test_executorch_trainer_gives_the_eager_numbers(tmp_path) -> None:
    pytest.importorskip("executorch.extension.training", reason="executorch is not installed")
    runs = {
        trainer: run_experiment(
            dataclasses.replace(TINY, trainer=trainer, out=str(tmp_path / trainer)), quiet=True
        )
        for trainer in ("eager", "executorch")
    }
    eager, et = rounds(runs["eager"]), rounds(runs["executorch"])
    val_size = json.loads((tmp_path / "eager" / "world.json").read_text())["examples"]["val"]
    assert len(et) == len(eager) == TINY.rounds
    assert all(r["participants"] > 0 for r in et)
    for a, b in zip(eager, et, strict=True):
        assert (a["participants"], a["bytes_up"]) == (b["participants"], b["bytes_up"])
        # One prediction may flip where its logit margin lies inside the trainers' rounding difference.
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=1 / val_size)
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=ROUNDS_TOL)
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=ROUNDS_TOL)
    assert et[-1]["val_loss"] != et[0]["val_loss"]  # it trained


@pytest.mark.executorch
@pytest.mark.numerical
@pytest.mark.parametrize("method", ["flora", "fedex_lora"])
def test_executorch_clients_follow_a_method_that_changes_the_base(method: str, tmp_path) -> None:
    """Their globals carry a change of the frozen base: the simulator exports the program with
    base-delta inputs, and the ExecuTorch clients give the eager clients' numbers."""
    pytest.importorskip("executorch.extension.training", reason="executorch is not installed")
    config = dataclasses.replace(TINY, methods=(method,))
    runs = {
        trainer: run_experiment(
            dataclasses.replace(config, trainer=trainer, out=str(tmp_path / trainer)), quiet=True
        )
        for trainer in ("eager", "executorch")
    }
    eager, et = rounds(runs["eager"]), rounds(runs["executorch"])
    assert len(et) == len(eager) == TINY.rounds and all(r["participants"] > 0 for r in et)
    for a, b in zip(eager, et, strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=ROUNDS_TOL)
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=ROUNDS_TOL)
