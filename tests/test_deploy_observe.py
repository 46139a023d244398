"""What a deployment says while it runs, over a real mosquitto: the devices' evaluation of each global
and the coordinator's own, one line per round, and a device refusing an announcement in words."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pytest
import torch
from deploy_helpers import (
    adapted,
    client_ids,
    device,
    global_of,
    make_service,
    serve_in_thread,
    spec_for,
    train_split,
)

from broker.mosquitto import Mosquitto
from coordinator.evaluation import GlobalEvaluator
from coordinator.metrics import read_metrics
from export.evaluation import evaluate_metrics
from export.state import load_trainable_state, trainable_state

pytestmark = pytest.mark.mqtt
VALIDATION = 16  # examples each device evaluates every global on


def test_devices_and_the_coordinator_evaluate_every_global_and_each_round_is_one_line(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coordinator.service")
    clients = client_ids(2)
    held_out = train_split().subset(range(1000, 1064))
    model = adapted(spec_for("fedit"))
    service = make_service("fedit", tmp_path / "state", clients, rounds=2)
    service.evaluate = GlobalEvaluator(model, service.spec, service.agg, trainable_state(model), held_out)
    start = {k: v.cpu() for k, v in service.agg.init_global(service._initial).items()}
    thread, stop = serve_in_thread(service, mosquitto.port)
    devices = [
        device(c, i, "fedit", mosquitto.port, eval_examples=VALIDATION).start() for i, c in enumerate(clients)
    ]
    try:
        thread.join(180)
        assert service.finished
    finally:
        stop.set()
        for d in devices:
            d.close()
    rounds = [r for r in read_metrics(tmp_path / "state" / "metrics.jsonl") if r["event"] == "round"]
    assert [(r["fed_eval_examples"], r["fed_eval_clients"], r["eval_examples"]) for r in rounds] == [
        (32, 2, 64)
    ] * 2
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["fed_eval_accuracy"] <= 1 for r in rounds)
    # Round 1's devices evaluated the initial global on their validation examples: the example-weighted
    # mean of their figures is the figure of the union.
    validation = train_split()
    union = validation.subset(range(len(validation) - 2 * VALIDATION, len(validation)))
    check = adapted(spec_for("fedit"))
    load_trainable_state(check, start)
    expected = evaluate_metrics(check, union.batches(8))
    assert rounds[0]["fed_eval_accuracy"] == pytest.approx(expected.accuracy, abs=1e-12)
    # float32 losses summed in another order: a few float32 epsilons of relative difference
    assert rounds[0]["fed_eval_loss"] == pytest.approx(expected.loss, rel=32 * torch.finfo(torch.float32).eps)
    load_trainable_state(check, global_of(tmp_path / "state"))
    final = evaluate_metrics(check, held_out.batches(64))
    assert (rounds[1]["eval_accuracy"], rounds[1]["eval_loss"]) == (final.accuracy, final.loss)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round 2/2: ")]
    assert (
        len(lines) == 1
        and "2/2 updates, devices: accuracy " in lines[0]
        and "eval data: accuracy" in lines[0]
    )
    assert "waiting for 2 sampled clients (dev0, dev1)" in caplog.text


def test_a_device_of_another_class_count_refuses_in_words_and_the_coordinator_logs_it(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    service = make_service("fedit", tmp_path / "state", ("dev0",), rounds=1, model="tiny-bert", num_classes=8)
    thread, stop = serve_in_thread(service, mosquitto.port)
    other = device(
        "dev0", 0, "fedit", mosquitto.port, edge_overrides={"model": "tiny-bert", "num_classes": 6}
    )
    other.start()
    words = "the coordinator trains tiny-bert with 8 classes; this device has tiny-bert with 6 classes"
    try:
        deadline = time.monotonic() + 60
        while f"dev0 refused the announcement: {words}" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"dev0 refused the announcement: {words}" in caplog.text
        assert other.client.last_rejection is not None and other.client.last_rejection.startswith(
            "model_mismatch"
        )
        assert not service.accepted and thread.is_alive()  # nothing trained; the round waits for it
    finally:
        stop.set()
        thread.join(30)
        other.close()
    statuses = [
        r for r in read_metrics(tmp_path / "state" / "metrics.jsonl") if r["event"] == "device_status"
    ]
    assert any(r["client"] == "dev0" and r["status"].startswith(f"refused: {words}") for r in statuses)


def test_a_round_of_many_clients_opens_with_one_short_line() -> None:
    from coordinator.metrics import NAMED_IN_LOG, open_line
    from coordinator.store import RoundState

    sampled = [f"c{i:05d}" for i in range(500)]
    line = open_line(RoundState("r", "fedit", "{}", 1, 0.0, sampled, None), rounds=3, min_clients=400)
    assert line.startswith("round 1/3 open: waiting for 500 sampled clients (c00000, c00001")
    assert f"and {500 - NAMED_IN_LOG} more)" in line and "c00499" not in line and len(line) < 200
