"""The reliability scenarios of RELIABILITY.md against a real mosquitto: coordinator crashes, broker
faults, dropouts and stragglers, hostile input, load, access control. The full-size runs are the
``fleetlora bench crash|load|hostile`` commands; these are their CI-sized versions."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.broker import Mosquitto
from coordinator.drill_crash import run_crash_drill

pytestmark = pytest.mark.mqtt


def test_coordinator_sigkilled_20_times_ends_with_the_uninterrupted_global(
    mosquitto: Mosquitto, broker_dir: Path
) -> None:
    report = run_crash_drill(
        mosquitto.port, broker_dir, kills=20, clients=6, rounds=60, payload_bytes=4096, max_delay_s=0.5
    )
    assert report.kills == 20 and report.lives == 21
    assert report.rounds == 60 and all(len(clients) == 6 for clients in report.aggregated)
    assert report.equal, "the final global differs from the uninterrupted run with the same updates"
    assert any(report.resumed_updates), "no kill landed mid-round with updates on disk"
    assert set(report.rejected) <= {"wrong_round"}  # only stale resends of closed rounds
