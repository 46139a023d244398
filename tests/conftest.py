"""Shared pytest fixtures.

MQTT: each test gets a private mosquitto on a free loopback port, with its own config directory, stopped
by PID at teardown. Tests that use it are marked ``mqtt`` and skipped when mosquitto is not installed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.mosquitto import BrokerConfig, Mosquitto, mosquitto_available

MOSQUITTO_MISSING = "mosquitto is not installed (apt-get install -y mosquitto mosquitto-clients)"


@pytest.fixture
def broker_dir() -> Iterator[Path]:
    """A private folder the broker can reach.

    Not ``tmp_path``: pytest's folders are 0700, and mosquitto started as root drops to user
    ``mosquitto``, which could not enter them.
    """
    path = Path(tempfile.mkdtemp(prefix="fleetlora-mqtt-test-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def start_mosquitto(broker_dir: Path) -> Iterator[Callable[..., Mosquitto]]:
    """``start_mosquitto(config=None, name="broker")`` starts a mosquitto; all are stopped at teardown."""
    if not mosquitto_available():
        pytest.skip(MOSQUITTO_MISSING)
    started: list[Mosquitto] = []

    def start(config: BrokerConfig | None = None, name: str = "broker") -> Mosquitto:
        broker = Mosquitto(broker_dir / name, config)
        started.append(broker)
        return broker.start()

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def mosquitto(start_mosquitto: Callable[..., Mosquitto]) -> Mosquitto:
    """A plain, anonymous mosquitto on a free loopback port."""
    return start_mosquitto()
