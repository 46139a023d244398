"""``fleetlora bench ingest``: update ingest of the coordinator service vs a bare paho subscriber.

One private loopback mosquitto. A publisher child process pre-encodes N signed-checksum update
envelopes of about 1 MB (one per client) and, on cue, publishes them all with QoS 1 over a few links.
It does so twice, in the same run: first to a bare paho subscriber that only counts messages (the raw
ceiling of broker + paho on this machine), then to the real coordinator service, which validates every
envelope, persists the accepted ones (group commit: one segment file and one fsync per batch;
``--no-sync``: none) and acknowledges the batch after that.
Each side is timed from the cue to its last message (received, resp. persisted). The two passes
alternate ``--repeat`` times (a pass on a shared 2-core machine varies by 15%); each coordinator pass
starts from an empty state folder.
Last line: ``ingest: ratio_to_raw=<median of coordinator / raw throughput> lost=<updates missing, all
passes>``.

``--http``: each pass also runs the coordinator with its dashboard on (the FleetView and Prometheus
listeners, the HTTP server on a loopback port, one viewer reading the server-sent events and one
Prometheus scrape a second), in alternating order with the plain one; the last line then adds
``ratio_with_http`` (its median) and ``http_cost`` (the median over passes of how much lower the
ratio with the dashboard is than the one without, in percent; an even ``--repeat`` runs each order as
often, since the second coordinator run of a pass tends to be the faster one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
import torch
from paho.mqtt.enums import CallbackAPIVersion

from broker.mosquitto import BrokerConfig, Mosquitto
from coordinator import aggregators
from coordinator.metrics import MetricsLog
from coordinator.service import RoundService, ServiceConfig
from coordinator.service_mqtt import serve
from coordinator.store import RoundStore
from export.spec import AdapterSpec
from export.state import State
from protocol.mqtt_link import LinkConfig, MqttLink
from protocol.mqtt_pool import MqttPool
from protocol.mqtt_types import Payload
from protocol.topics import up_subscription, up_topic
from protocol.wire import encode_update

RUN = "bench"
TIMEOUT_S = 600.0
PUBLISHER_LINKS = 8


def _template(payload_bytes: int) -> State:
    """A dense trainable state of about ``payload_bytes`` (a classification head of that size)."""
    cols = 1024
    rows = max(1, payload_bytes // (4 * cols))
    return {"classifier.weight": torch.zeros(rows, cols)}


def _clients(n: int) -> tuple[str, ...]:
    return tuple(f"c{i:05d}" for i in range(n))


def _publish(port: int, n: int, payload_bytes: int) -> int:
    """Child process: encode the envelopes, wait for a cue line on stdin per pass, publish them all."""
    spec = AdapterSpec()
    gen = torch.Generator().manual_seed(0)
    shape = _template(payload_bytes)["classifier.weight"].shape
    envelopes = [
        (
            up_topic(RUN, cid),
            encode_update(
                {"classifier.weight": torch.randn(shape, generator=gen) * 0.01}, run=RUN, round=1,
                client=cid, method="fedit", spec=spec, num_examples=10, local_steps=1, compute_s=0.0,
            ),
        )
        for cid in _clients(n)
    ]  # fmt: skip
    pool = MqttPool(name="bench-publisher")
    links = [
        MqttLink(LinkConfig(f"bench-pub{i}", port=port, max_queued_bytes=2**31), pool=pool).start()
        for i in range(PUBLISHER_LINKS)
    ]
    for link in links:
        link.wait_connected(60)
    print("ready", flush=True)
    for _ in sys.stdin:  # one cue per pass
        deliveries = [links[i % PUBLISHER_LINKS].publish(t, p) for i, (t, p) in enumerate(envelopes)]
        failed = sum(1 for d in deliveries if not (d.wait(TIMEOUT_S) and d.ok))
        print(f"published {n - failed}", flush=True)
    for link in links:
        link.close()
    pool.close()
    return 0


class _Publisher:
    def __init__(self, port: int, n: int, payload_bytes: int) -> None:
        source_root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")])),
        }
        command = [sys.executable, "-m", "bench.ingest", "--publisher"]
        self.proc = subprocess.Popen(
            [*command, str(port), str(n), str(payload_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the publisher process did not start")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def published(self) -> int:
        assert self.proc.stdout is not None
        return int(self.proc.stdout.readline().split()[1])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


def _raw(port: int, publisher: _Publisher, n: int) -> tuple[float, int]:
    """Seconds until a bare paho subscriber got all ``n`` messages, and how many it got."""
    count, done, first = [0], threading.Event(), threading.Event()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        count[0] += 1
        if count[0] >= n:
            done.set()

    def on_subscribe(*args: object) -> None:
        first.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=mqtt.MQTTv5)
    client.on_message, client.on_subscribe = on_message, on_subscribe
    client.connect("127.0.0.1", port)
    client.subscribe(up_subscription(RUN), qos=1)
    client.loop_start()
    first.wait(30)
    start = time.perf_counter()
    publisher.go()
    done.wait(TIMEOUT_S)
    elapsed = time.perf_counter() - start
    publisher.published()
    client.disconnect()
    client.loop_stop()
    return elapsed, count[0]


class _CountingStore(RoundStore):
    """The service's store, counting the updates written: the coordinator's clock stops when the last
    one is on disk, not when it was admitted (the writer thread persists behind validation)."""

    def __init__(self, root: Path, sync: bool) -> None:
        super().__init__(root, sync=sync)
        self.persisted = 0

    def save_updates(self, round: int, updates: Sequence[tuple[str, Payload]]) -> None:
        super().save_updates(round, updates)
        self.persisted += len(updates)


class _Watched:
    """The dashboard of ``service`` with one live viewer and a Prometheus scrape a second."""

    def __init__(self, service: RoundService) -> None:
        from coordinator.dashboard_http import Dashboard
        from coordinator.fleet_prometheus import FleetMetrics
        from coordinator.fleet_view import FleetView

        view = FleetView(RUN, "fedit", service.config.clients)
        prometheus = FleetMetrics(view)
        service.metrics.listeners += [view.on_event, prometheus.on_event]
        self.dashboard = Dashboard(view, ("127.0.0.1", 0), metrics=prometheus.exposition).start()
        self.pushes = self.scrapes = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._view, self._scrape)]
        for thread in self.threads:
            thread.start()

    def _view(self) -> None:
        with urllib.request.urlopen(self.dashboard.url + "api/events", timeout=TIMEOUT_S) as stream:
            for line in stream:
                self.pushes += line.startswith(b"data: ")

    def _scrape(self) -> None:
        while not self.stop.wait(1.0):
            with urllib.request.urlopen(self.dashboard.url + "metrics", timeout=30) as response:
                response.read()
                self.scrapes += 1

    def close(self) -> str:
        self.stop.set()
        self.dashboard.close()
        for thread in self.threads:
            thread.join(30)
        return f"{self.pushes} pushes to the viewer, {self.scrapes} scrapes"


def _coordinator(
    port: int,
    publisher: _Publisher,
    n: int,
    payload_bytes: int,
    state_dir: Path,
    sync: bool,
    name: str,
    http: bool = False,
) -> tuple[float, int, str]:
    """Seconds until the service persisted and acknowledged all ``n`` updates, how many it kept, and
    (``http``) what its dashboard served meanwhile."""
    spec = AdapterSpec()
    config = ServiceConfig(
        run=RUN, method="fedit", rounds=1, min_clients=n, deadline_s=TIMEOUT_S, clients=_clients(n)
    )
    agg = aggregators.create("fedit", spec, device="auto")
    store = _CountingStore(state_dir, sync)
    service = RoundService(config, spec, agg, _template(payload_bytes), store, MetricsLog(None))
    watched = _Watched(service) if http else None
    stop = threading.Event()
    # No session outliving the pass: the broker would queue the next passes' updates for it.
    link = LinkConfig(name, port=port, session_expiry_s=0)
    thread = threading.Thread(target=serve, args=(service, link, stop))
    thread.start()
    while service.state is None:
        time.sleep(0.01)
    time.sleep(0.5)  # subscribed
    start = time.perf_counter()
    publisher.go()
    deadline = time.monotonic() + TIMEOUT_S
    while store.persisted < n and not service.history and time.monotonic() < deadline:
        time.sleep(0.002)
    elapsed = time.perf_counter() - start
    publisher.published()
    thread.join(TIMEOUT_S)
    stop.set()
    kept = service.history[0]["participants"] if service.history else len(service.accepted)
    return elapsed, kept, watched.close() if watched is not None else ""


def _passes(
    args: argparse.Namespace, port: int, publisher: _Publisher, state_dir: Path
) -> tuple[list[float], list[float], int]:
    """Alternate raw and coordinator passes; (coordinator / raw throughput per pair, the same with the
    dashboard on (``--http``, else empty), updates lost)."""
    total_mb, mode = args.updates * args.payload / 1e6, "no fsync" if args.no_sync else "group commit"
    ratios: list[float] = []
    with_http: list[float] = []
    lost = 0
    for i in range(1, args.repeat + 1):
        raw_s, raw_got = _raw(port, publisher, args.updates)
        print(f"pass {i}: raw paho subscriber {raw_got}/{args.updates} in {raw_s:.2f} s "
              f"({total_mb / raw_s:.0f} MB/s)", flush=True)  # fmt: skip
        # With --http the two coordinator runs alternate which goes first, so neither always follows raw.
        order = [False, True] if not args.http else ([False, True] if i % 2 else [True, False])
        for http in order[: 2 if args.http else 1]:
            coord_s, kept, served = _coordinator(
                port, publisher, args.updates, args.payload, state_dir / f"pass{i}{'-http' if http else ''}",
                not args.no_sync, f"bench-coordinator-{i}{'-http' if http else ''}", http=http,
            )  # fmt: skip
            label = "coordinator + dashboard" if http else "coordinator"
            served = f"; {served}" if served else ""
            print(f"pass {i}: {label} ({mode}) {kept}/{args.updates} in {coord_s:.2f} s "
                  f"({total_mb / coord_s:.0f} MB/s){served}", flush=True)  # fmt: skip
            (with_http if http else ratios).append(raw_s / coord_s)
            lost += args.updates - kept
    return ratios, with_http, lost


def main(argv: list[str]) -> int:
    if argv[:1] == ["--publisher"]:
        return _publish(int(argv[1]), int(argv[2]), int(argv[3]))
    parser = argparse.ArgumentParser(prog="fleetlora bench ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=1000, help="updates per pass (default 1000)")
    parser.add_argument("--payload", type=int, default=1_000_000, help="bytes per update (default 1 MB)")
    parser.add_argument("--repeat", type=int, default=5, help="raw/coordinator pass pairs (default 5)")
    parser.add_argument("--state-dir", default="", help="coordinator state folder (default: a temp dir)")
    parser.add_argument(
        "--no-sync", action="store_true", help="persist without fsync (survives kill -9 only)"
    )
    parser.add_argument(
        "--http", action="store_true",
        help="also run each pass with the coordinator's dashboard on (a viewer, /metrics scrapes): its cost",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.updates < 1:
        parser.error("--repeat and --updates must be at least 1")
    workdir = Path(tempfile.mkdtemp(prefix="fleetlora-bench-ingest-"))
    os.chmod(workdir, 0o755)  # mosquitto started as root drops to its own user
    state_dir = Path(args.state_dir) if args.state_dir else workdir / "state"
    # Room for a whole pass in the broker's queue: a slow subscriber must not make it drop messages.
    broker_config = BrokerConfig(max_queued_bytes=2 * args.updates * args.payload + 64 * 2**20)
    try:
        with Mosquitto(workdir / "broker", broker_config) as broker:
            publisher = _Publisher(broker.port, args.updates, args.payload)
            try:
                ratios, with_http, lost = _passes(args, broker.port, publisher, state_dir)
            finally:
                publisher.close()
        print(f"ratio per pass: {' '.join(f'{r:.2f}' for r in ratios)}")
        line = f"ingest: ratio_to_raw={statistics.median(ratios):.2f}"
        if with_http:
            print(f"ratio per pass with the dashboard: {' '.join(f'{r:.2f}' for r in with_http)}")
            # Paired within each pass (same raw pass, same broker state), then the median over passes.
            cost = 100 * statistics.median(1 - h / p for h, p in zip(with_http, ratios, strict=True))
            line += f" ratio_with_http={statistics.median(with_http):.2f} http_cost={cost:.1f}%"
        print(f"{line} lost={lost}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
