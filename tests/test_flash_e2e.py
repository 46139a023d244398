"""A flashed folder, end to end: build a tiny-BERT bundle, flash it to a local folder, and run that
folder's ``run-client.sh`` (ExecuTorch backend) against a real coordinator over a private mosquitto."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deploy_helpers import (
    BATCH,
    MAX_LEN,
    MODEL,
    NUM_CLASSES,
    global_of,
    make_service,
    serve_in_thread,
    spec_for,
)

from broker.mosquitto import Mosquitto
from coordinator.metrics import read_metrics
from devices.flash import RUN_SCRIPT, ClientConfig, Target, flash
from export.bundle import Bundle
from protocol.keys import write_key

pytest.importorskip("executorch.extension.training", reason="executorch is not installed")

pytestmark = [pytest.mark.executorch, pytest.mark.mqtt]

ROOT = Path(__file__).resolve().parent.parent
CLIENT = "dev0"
ROUNDS = 2
EXAMPLES = 24


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    """Built once per key and cached (the simulator's ExecuTorch test shares it)."""
    from export.build import cached_bundle

    return cached_bundle(
        MODEL, spec_for("fedit"), num_classes=NUM_CLASSES, seq_len=MAX_LEN, batch_range=(2, BATCH)
    )


def test_flashed_folder_trains_with_executorch_and_is_aggregated(
    bundle: Bundle, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The device signs its updates with the HMAC key flashed with it; the coordinator, which holds
    that device's key, refuses anything unsigned or signed otherwise."""
    folder, key = tmp_path / "device", secrets.token_bytes(32)
    write_key(tmp_path / f"{CLIENT}.key", key)
    config = ClientConfig(
        f"mqtt://127.0.0.1:{mosquitto.port}", "t", CLIENT, "pixel_8", "executorch",
        {"hmac_key_file": str(tmp_path / f"{CLIENT}.key")},
    )  # fmt: skip
    flash(bundle, config, Target.parse(f"local:{folder}"), log=lambda _: None)
    service = make_service(
        "fedit", tmp_path / "state", (CLIENT,), rounds=ROUNDS, deadline_s=120.0, device_keys={CLIENT: key}
    )
    thread, stop = serve_in_thread(service, mosquitto.port)
    local = ["--dataset", "trec6", "--max-examples", str(EXAMPLES), "--local-steps", "2"]
    local += ["--batch-size", str(BATCH), "--lr", "0.05", "--connect-jitter", "0"]
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(
            [str(folder / RUN_SCRIPT), *local], env=env, capture_output=True, text=True, timeout=300
        )
        thread.join(60)
    finally:
        stop.set()
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{CLIENT} (executorch): last round {ROUNDS + 1}, outcome final" in done.stdout  # the final call
    assert not thread.is_alive() and service.finished
    rounds = [r for r in read_metrics(tmp_path / "state" / "metrics.jsonl") if r["event"] == "round"]
    assert [(r["round"], r["participants"], r["clients"]) for r in rounds] == [
        (1, 1, [CLIENT]),
        (2, 1, [CLIENT]),
    ]
    assert all(r["rejected"] == {} and r["examples"] == EXAMPLES for r in rounds)
    fresh = make_service("fedit", tmp_path / "fresh", (CLIENT,))
    fresh.start()
    initial = {k: v.cpu() for k, v in fresh.global_state.items()}
    final = global_of(tmp_path / "state")
    assert set(final) == set(bundle.info.trainable)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert any(not torch.equal(final[k], initial[k]) for k in final), "the global adapter did not change"
