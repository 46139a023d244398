"""The dashboard in a real browser (Debian's chromium driven by playwright) during a real run: a
mosquitto, ``fleetlora coordinator serve --http`` and three ``fleetlora client`` processes (tiny-bert).

The page must show the devices going offline -> sampled -> training -> uploaded, the round counter
advancing with one accuracy point per closed round, a hostile envelope's refusal with its reason, and a
device going offline when its process is killed. The last frame is saved as a screenshot (the README's
``docs/dashboard.png`` is one: set ``FLEETLORA_DASHBOARD_PNG=docs/dashboard.png`` to refresh it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import spec_for

from broker.child import free_port
from broker.mosquitto import Mosquitto
from protocol.mqtt_link import LinkConfig, MqttLink
from protocol.topics import up_topic
from protocol.wire import Reason

# Not marked slow, so CI runs it (the "tests in a real browser"): about 1-3 minutes on 2 cores,
# most of it the processes importing torch and the last round's deadline.
pytestmark = [pytest.mark.mqtt]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -c constraints.txt playwright)"
)
if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

pytest.importorskip("prometheus_client", reason="the dashboard extra: pip install 'fleetlora[dashboard]'")

ROOT = Path(__file__).resolve().parent.parent
RUN, ROUNDS = "t", 3
# Round 1 opens when the coordinator starts, with the devices still starting: its deadline leaves them
# time. The last round waits this long for the killed device, then closes with the other two.
DEADLINE_S = 30
SLOW_STEPS = 1500  # dev2's local steps: ~5 s a round idle, so the page (one push a second) sees it training
CLIENTS = ("dev0", "dev1", "dev2")
STARTUP_S = 180.0  # a Python process importing torch and transformers on a loaded 2-core machine


def task_flags() -> list[str]:
    spec = spec_for("fedit").to_json()
    return ["--run", RUN, "--model", "tiny-bert", "--num-classes", "6", "--spec", spec]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``start(name, *args)`` runs ``python -m fleetlora *args``; every one is stopped by PID after."""
    started: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        command = [sys.executable, "-m", "fleetlora", *args]
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def wait_http(url: str, coordinator: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if coordinator.poll() is not None:
            raise AssertionError(f"the coordinator exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "api/state", timeout=5) as response:
                json.loads(response.read())
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no dashboard at {url} after {STARTUP_S:.0f} s: {log.read_text()[-3000:]}")


STATES_JS = """() => Object.fromEntries([...document.querySelectorAll('#devices tbody tr')].map(
  (r) => [r.dataset.client, {state: r.querySelector('.state').textContent,
                             trail: r.querySelector('.trail').textContent,
                             profile: r.querySelector('.profile').textContent}]))"""
PROGRESS_JS = """() => ({round: Number(document.getElementById('round-number').textContent),
  done: document.getElementById('round-done').textContent !== '',
  points: document.querySelectorAll('#chart-accuracy circle.pt[data-series^="devices"]').length})"""


def test_the_dashboard_follows_a_live_fleet_in_chromium(
    mosquitto: Mosquitto, processes: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    broker = f"mqtt://127.0.0.1:{mosquitto.port}"
    http = f"127.0.0.1:{free_port()}"
    url = f"http://{http}/"
    coordinator = processes(
        "coordinator", "coordinator", "serve", *task_flags(), "--method", "fedit", "--rounds", str(ROUNDS),
        "--clients", ",".join(CLIENTS), "--min-clients", "2", "--deadline", str(DEADLINE_S),
        "--state-dir", str(tmp_path / "state"), "--broker", broker, "--device", "cpu", "--http", http,
    )  # fmt: skip

    def client(i: int, c: str) -> subprocess.Popen[bytes]:
        # dev2 is the slow device (SLOW_STEPS a round): it is still training when it is killed.
        return processes(
            c, "client", *task_flags(), "--id", c, "--dataset", "trec6", "--shard", f"{i}/3",
            "--max-examples", "32", "--max-len", "16", "--batch-size", "8", "--broker", broker,
            "--local-steps", str(SLOW_STEPS if c == "dev2" else 3), "--connect-jitter", "0",
            *(["--profile", "pixel_8"] if i == 0 else []),
        )  # fmt: skip

    clients = {c: client(i, c) for i, c in enumerate(CLIENTS)}
    wait_http(url, coordinator, tmp_path / "coordinator.log")
    samples: list[dict[str, Any]] = []
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        page.wait_for_function("document.getElementById('connection').textContent === 'live'")

        def sample() -> dict[str, Any]:
            samples.append({**page.evaluate(PROGRESS_JS), "dev2": page.evaluate(STATES_JS)["dev2"]["state"]})
            return samples[-1]

        # Every device goes offline -> sampled -> training -> uploaded (the trail keeps the short states
        # the page may have been pushed between two frames).
        page.wait_for_function(
            f"() => Object.values(({STATES_JS})()).every("
            "(d) => /offline → sampled → training → uploaded/.test(d.trail))",
            timeout=STARTUP_S * 1000,
        )
        assert page.evaluate(STATES_JS)["dev0"]["profile"] == "pixel_8"
        until = time.monotonic() + STARTUP_S
        while sample()["round"] < 2:
            assert time.monotonic() < until, f"round 1 never closed: {samples[-1]}"
            page.wait_for_timeout(100)
        # A hostile envelope on dev0's topic: refused, with its reason, in the last refusals.
        with MqttLink(LinkConfig("intruder", port=mosquitto.port)) as link:
            assert link.publish(up_topic(RUN, "dev0"), b"\x00not an envelope", qos=1).wait(10)
        refusal = page.wait_for_selector("#refusals tbody tr", timeout=30_000)
        assert refusal is not None
        reason, client = refusal.query_selector(".reason"), refusal.query_selector(".client")
        assert reason is not None and reason.text_content() == Reason.BAD_MAGIC.value
        assert client is not None and client.text_content() == "dev0"
        # A device whose process dies in the last round goes offline (its last will), and the round
        # closes without it at its deadline.
        until = time.monotonic() + STARTUP_S
        while not (sample()["round"] == ROUNDS and samples[-1]["dev2"] == "training"):
            assert time.monotonic() < until, f"dev2 never trained in round {ROUNDS}: {samples[-1]}"
            assert not samples[-1]["done"], "the run ended before dev2 could be killed while training"
            page.wait_for_timeout(50)
        clients["dev2"].send_signal(signal.SIGKILL)
        page.wait_for_function(f"() => ({STATES_JS})().dev2.state === 'offline'", timeout=30_000)
        # The README's picture: the last round waiting for its deadline, two updates in, dev2 offline.
        page.wait_for_function(
            f"() => Object.values(({STATES_JS})()).filter((d) => d.state === 'uploaded').length === 2",
            timeout=30_000,
        )
        screenshot = tmp_path / "dashboard.png"
        page.screenshot(path=str(screenshot), full_page=True)
        until = time.monotonic() + DEADLINE_S + 60
        while not sample()["done"]:
            assert time.monotonic() < until, f"the page never showed the run finished: {samples[-1]}"
            assert coordinator.poll() is None or coordinator.returncode == 0
            page.wait_for_timeout(200)
        final = page.evaluate(PROGRESS_JS)
        browser.close()
    assert coordinator.wait(60) == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
    # The round counter advanced one by one, and the accuracy chart gained a point per closed round
    # (a frame may fall between a round's close and the next one's opening: then both are equal).
    rounds = sorted({s["round"] for s in samples})
    assert rounds == list(range(rounds[0], ROUNDS + 1)) and rounds[0] <= 2
    assert all(s["round"] - 1 <= s["points"] <= s["round"] for s in samples)
    assert [s["points"] for s in samples] == sorted(s["points"] for s in samples)
    assert final == {"round": ROUNDS, "done": True, "points": ROUNDS}
    if os.environ.get("FLEETLORA_DASHBOARD_PNG"):
        shutil.copy(screenshot, ROOT / os.environ["FLEETLORA_DASHBOARD_PNG"])
