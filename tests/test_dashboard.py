"""The coordinator's dashboard without a browser or broker: a real RoundService fed real envelopes,
its FleetView, the HTTP endpoints (JSON, server-sent events, Prometheus, the adapter zip), the token
rules and ``fleetlora coordinator status --http``."""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import client_ids, make_service

pytest.importorskip("prometheus_client", reason="the dashboard extra: pip install 'fleetlora[dashboard]'")

from coordinator.dashboard_http import Dashboard, DashboardError, parse_address
from coordinator.fleet_prometheus import FleetMetrics
from coordinator.fleet_view import FleetView
from coordinator.service import RoundService
from edge_client.client import training_status
from edge_client.local_round import LocalPlan
from fleetlora.cli import main as cli_main
from protocol.topics import up_topic
from protocol.wire import encode_update

TOKEN = "s3cret-token-0123456789"


def envelope(service: RoundService, client: str, round: int, **kw: Any) -> bytes:
    state = {k: v.cpu() + 0.01 for k, v in service.global_state.items()}
    args = {"num_examples": 10, "local_steps": 3, "compute_s": 0.25, "rank": service.spec.rank, **kw}
    return encode_update(
        state, run="t", round=round, client=client, method="fedit", spec=service.spec, **args
    )


def watched(tmp_path: Path, rounds: int = 2) -> tuple[RoundService, FleetView, FleetMetrics]:
    service = make_service("fedit", tmp_path, client_ids(3), rounds=rounds)
    view = FleetView("t", "fedit", service.config.clients)
    prometheus = FleetMetrics(view)
    service.metrics.listeners += [view.on_event, prometheus.on_event]
    service.start()
    return service, view, prometheus


def get(url: str, token: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[RoundService, FleetView, Dashboard]]:
    service, view, prometheus = watched(tmp_path)
    dashboard = Dashboard(
        view, ("127.0.0.1", 0), metrics=prometheus.exposition, state_dir=service.store.root
    ).start()
    yield service, view, dashboard
    dashboard.close()


def test_device_states_follow_the_services_events(tmp_path: Path) -> None:
    service, view, _ = watched(tmp_path)
    states = lambda: {d["client"]: d["state"] for d in view.snapshot()["devices"]}  # noqa: E731
    assert states() == dict.fromkeys(client_ids(3), "offline")
    for c in client_ids(3):
        service.device_status(c, b"online")
    assert set(states().values()) == {"sampled"}  # all three are round 1's
    service.device_status("dev0", training_status(1, LocalPlan(3, rank=4), "pixel_8"))
    service.receive([(up_topic("t", "dev0"), envelope(service, "dev0", 1))])
    service.receive([(up_topic("t", "dev1"), envelope(service, "dev1", 2))])  # a wrong round: refused
    service.device_status("dev2", b"offline")
    snap = view.snapshot()
    rows = {d["client"]: d for d in snap["devices"]}
    assert states() == {"dev0": "uploaded", "dev1": "refused", "dev2": "offline"}
    assert [s for _, s in rows["dev0"]["trail"]] == ["offline", "sampled", "training", "uploaded"]
    assert rows["dev0"]["profile"] == "pixel_8"
    assert rows["dev0"]["plan"]["steps"] == 3 and rows["dev0"]["compute_s"] == 0.25
    assert snap["round"]["received"] == 1 and snap["round"]["refused"] == {"wrong_round": 1}
    assert snap["refusals"][0]["reason"] == "wrong_round" and snap["refusals"][0]["client"] == "dev1"
    service.device_status("dev2", b"online")
    for c in ("dev1", "dev2"):
        service.receive([(up_topic("t", c), envelope(service, c, 1))])
    assert service.tick() is not None  # everyone is in: round 1 closes
    snap = view.snapshot()
    assert snap["round"]["number"] == 2 and snap["round"]["refused"] == {}
    assert [c["round"] for c in snap["curves"]] == [1]
    assert "divergence" in snap["curves"][0]["aggregation"]
    assert any(k.startswith("divergence/") for k in snap["curves"][0]["aggregation"])


def test_http_serves_the_page_state_events_metrics_and_the_adapter(
    served: tuple[RoundService, FleetView, Dashboard],
) -> None:
    service, _, dashboard = served
    status, page, _ = get(dashboard.url)
    assert status == 200 and b"dashboard.js" in page
    assert get(dashboard.url + "dashboard.js")[0] == 200
    service.device_status("dev0", b"online")
    service.receive([(up_topic("t", "dev0"), envelope(service, "dev0", 1))])
    status, body, headers = get(dashboard.url + "api/state")
    state = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert state["round"] == {**state["round"], "number": 1, "total": 2, "received": 1, "sampled": 3}
    with urllib.request.urlopen(dashboard.url + "api/events", timeout=30) as stream:
        assert stream.headers["Content-Type"] == "text/event-stream"
        first = stream.readline()
        assert first.startswith(b"data: ") and json.loads(first[6:])["round"]["received"] == 1
    status, text, headers = get(dashboard.url + "metrics")
    metrics = text.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "fleetlora_updates_accepted_total 1.0" in metrics
    assert 'fleetlora_devices{state="uploaded"} 1.0' in metrics
    assert "fleetlora_devices_online 1.0" in metrics and "fleetlora_round 1.0" in metrics
    assert "fleetlora_persist_seconds_bucket" in metrics
    assert "fleetlora_aggregation_seconds_count 0.0" in metrics
    # A run without --bundle records no labels: the download says why instead of failing.
    status, text, _ = get(dashboard.url + "adapter.zip")
    assert status == 409 and b"does not record the model and label names" in text
    assert get(dashboard.url + "nothing")[0] == 404


def test_the_adapter_downloads_as_a_peft_folder(tmp_path: Path) -> None:
    service = make_service(
        "fedit", tmp_path, client_ids(1), rounds=1, model="tiny-bert", num_classes=6,
        labels=("a", "b", "c", "d", "e", "f"), seq_len=16,
    )  # fmt: skip
    view = FleetView("t", "fedit", service.config.clients)
    service.metrics.listeners.append(view.on_event)
    service.start()
    service.receive([(up_topic("t", "dev0"), envelope(service, "dev0", 1))])
    service.tick()
    with Dashboard(view, ("127.0.0.1", 0), state_dir=tmp_path).start() as dashboard:
        status, data, headers = get(dashboard.url + "adapter.zip")
    assert status == 200 and 't-round1-adapter.zip"' in headers["Content-Disposition"]
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert "t-round1-adapter/adapter_config.json" in names
    assert "t-round1-adapter/adapter_model.safetensors" in names


def loopback_alias_works() -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


def test_a_non_loopback_bind_needs_a_token_and_refuses_requests_without_it(tmp_path: Path) -> None:
    view = FleetView("t", "fedit")
    with pytest.raises(DashboardError, match="needs a bearer token"):
        Dashboard(view, ("0.0.0.0", 0))
    if not loopback_alias_works():
        pytest.skip("this kernel does not let a socket bind 127.0.0.2")
    # 127.0.0.2 routes to this machine but is not the loopback address the rule names: a token it is.
    with pytest.raises(DashboardError, match="needs a bearer token"):
        Dashboard(view, ("127.0.0.2", 0))
    with Dashboard(view, ("127.0.0.2", 0), token=TOKEN).start() as dashboard:
        assert dashboard.url.startswith("http://127.0.0.2:")
        for path in ("", "api/state", "api/events", "metrics", "adapter.zip"):
            status, _, headers = get(dashboard.url + path)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
        assert get(dashboard.url + "api/state", token="wrong-token-0123456789")[0] == 401
        assert get(dashboard.url + "api/state", token=TOKEN)[0] == 200
        assert get(dashboard.url + f"api/state?token={TOKEN}")[0] == 200


def test_status_prints_the_dashboard_as_tables(
    served: tuple[RoundService, FleetView, Dashboard], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    service, _, dashboard = served
    service.device_status("dev1", b"online")
    service.receive([(up_topic("t", "dev1"), envelope(service, "dev1", 1))])
    service.receive([(up_topic("t", "dev2"), b"junk")])
    assert cli_main(["coordinator", "status", "--http", dashboard.url]) == 0
    out = capsys.readouterr().out
    assert "run t (fedit): round 1/2" in out and "received 1" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("dev")}
    assert "uploaded" in lines["dev1"] and "offline" in lines["dev0"]
    assert "dev2" in out.split("reason")[-1]  # the refusal table names the device
    token_file = tmp_path / "token"
    token_file.write_text("short\n")
    assert cli_main(["coordinator", "status", "--http", dashboard.url, "--token", str(token_file)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    assert cli_main(["coordinator", "status", "--http", "http://127.0.0.1:9"]) == 2
    assert "no dashboard answers there" in capsys.readouterr().err


def test_addresses_are_parsed_or_refused_by_value() -> None:
    assert parse_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_address("[::1]:0") == ("::1", 0)
    with pytest.raises(DashboardError, match="HOST:PORT"):
        parse_address("8080")


@pytest.mark.mqtt
def test_bench_ingest_runs_side_by_side_with_the_dashboard_on(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.ingest import main as bench_ingest
    from broker.mosquitto import mosquitto_available

    if not mosquitto_available():
        pytest.skip("mosquitto is not installed")
    assert bench_ingest(["--updates", "5", "--payload", "20000", "--repeat", "1", "--http", "--no-sync"]) == 0
    out = capsys.readouterr().out
    assert "pass 1: coordinator + dashboard (no fsync) 5/5" in out and "pushes to the viewer" in out
    last = out.strip().splitlines()[-1]
    assert (
        last.startswith("ingest: ratio_to_raw=") and " ratio_with_http=" in last and last.endswith("lost=0")
    )
