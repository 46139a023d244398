"""What an edge client reads back from its state file at start: its run's progress and kept tensors,
never another run's, and a clear error for a file that is not its own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from edge_client.client import EdgeClient, EdgeConfig
from edge_client.local_round import LocalPlan
from edge_client.trainer import EagerTrainer
from export.spec import AdapterSpec
from export.state import LORA_A, LORA_B
from protocol.mqtt_link import LinkConfig, MqttLink

TEMPLATE = {"l.q" + LORA_A: torch.zeros(2, 3), "l.q" + LORA_B: torch.zeros(4, 2)}
KEPT = {"l.q" + LORA_B: torch.full((4, 2), 0.5)}


@pytest.fixture
def client_for(tmp_path: Path) -> Iterator:
    links: list[MqttLink] = []

    def make(run: str) -> EdgeClient:
        config = EdgeConfig(
            run=run,
            client_id="dev0",
            spec=AdapterSpec(rank=2),
            num_examples=1,
            state_file=tmp_path / "s.json",
        )
        links.append(MqttLink(LinkConfig("dev0")))  # never started: nothing here talks to a broker
        trainer = EagerTrainer(nn.Linear(2, 2))
        return EdgeClient(config, links[-1], trainer, TEMPLATE, lambda h: LocalPlan(1), lambda h, p: [])

    yield make
    for link in links:
        link.close()


def write_state(folder: Path, run: str, last_round: int) -> None:
    (folder / "s.json").write_text(json.dumps({"run": run, "last_round": last_round, "pending_round": 0}))
    safetensors.torch.save_file(KEPT, folder / "s.json.kept.safetensors", metadata={"run": run})


def test_a_restart_in_the_same_run_resumes_its_progress_and_kept_tensors(client_for, tmp_path: Path) -> None:
    write_state(tmp_path, "r1", last_round=5)
    client = client_for("r1")
    assert (client.progress.run, client.progress.last_round) == ("r1", 5)
    assert torch.equal(client.kept["l.q" + LORA_B], KEPT["l.q" + LORA_B])


def test_another_runs_state_file_starts_afresh(client_for, tmp_path: Path) -> None:
    """Run r2's rounds start again at 1: r1's last round 5 must not mark them done, nor r1's B train on."""
    write_state(tmp_path, "r1", last_round=5)
    client = client_for("r2")
    assert (client.progress.run, client.progress.last_round, client.progress.pending_round) == ("r2", 0, 0)
    assert client.kept == {}


def test_a_progress_file_from_before_runs_were_recorded_is_adopted(client_for, tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text(json.dumps({"last_round": 3, "pending_round": 0}))
    assert (client_for("r1").progress.run, client_for("r1").progress.last_round) == ("r1", 3)


@pytest.mark.parametrize(
    ("text", "match"),
    [("{not json", "not a progress file"), ('{"last_round": 1, "color": 2}', "not a progress file")],
)
def test_a_state_file_that_is_not_a_progress_file_is_a_clear_error(
    client_for, tmp_path: Path, text: str, match: str
) -> None:
    (tmp_path / "s.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        client_for("r1")


def test_a_damaged_or_foreign_kept_file_is_refused_with_its_path(client_for, tmp_path: Path) -> None:
    kept_file = tmp_path / "s.json.kept.safetensors"
    kept_file.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        client_for("r1")
    safetensors.torch.save_file({"l.q" + LORA_B: torch.zeros(3, 3)}, kept_file, metadata={"run": "r1"})
    with pytest.raises(ValueError, match="not a finite tensor of this adapter's template"):
        client_for("r1")
