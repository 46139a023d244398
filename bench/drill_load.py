"""Load drill: thousands of devices publish one update each in the same second to one coordinator.

A publisher child process connects ``clients`` MQTT links (one epoll thread,
:class:`~protocol.mqtt_pool.MqttPool`), pre-encodes one update per device, and on cue publishes all
of them at once (QoS 1). The coordinator service runs in this process; a sampling thread records its
resident memory. Reported: how many updates the coordinator persisted (``lost`` = the rest), how long
the burst took to issue and to ingest, and the memory before and at its peak.

The broker queue matters (NOTES): mosquitto's default ``max_queued_messages`` of 1000 per client drops
what does not fit in the coordinator's queue while it persists. ``--broker-queue 1000`` shows that; the
shipped config raises the count and caps the bytes instead (:class:`~broker.mosquitto.BrokerConfig`).

``fleetlora bench load`` prints ``load: clients=... lost=... peak_rss_growth_mb=...``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.drill_fleet import RUN, client_names, dense_template, examples_of, make_service, trained
from broker.mosquitto import BrokerConfig, Mosquitto
from coordinator.service_mqtt import serve
from export.spec import AdapterSpec
from protocol.mqtt_link import LinkConfig, MqttLink
from protocol.mqtt_pool import MqttPool
from protocol.topics import up_topic
from protocol.wire import encode_update

MIB = 1024 * 1024


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class LoadReport:
    clients: int
    payload_bytes: int
    broker_queue: int
    accepted: int = 0
    connect_s: float = 0.0
    issue_s: float = 0.0  # from the cue until every publish was handed to the sockets' queues
    acked_s: float = 0.0  # until the broker acknowledged every publish
    ingest_s: float = 0.0  # until the coordinator had persisted every update (or stopped progressing)
    rss_before_mb: float = 0.0
    rss_peak_mb: float = 0.0

    @property
    def lost(self) -> int:
        return self.clients - self.accepted

    def line(self) -> str:
        return (
            f"load: clients={self.clients} payload_kb={self.payload_bytes / 1024:.0f} "
            f"broker_queue={self.broker_queue} lost={self.lost} issue_s={self.issue_s:.2f} "
            f"acked_s={self.acked_s:.2f} ingest_s={self.ingest_s:.2f} "
            f"rss_before_mb={self.rss_before_mb:.0f} "
            f"peak_rss_growth_mb={self.rss_peak_mb - self.rss_before_mb:.0f} "
            f"payload_total_mb={self.clients * self.payload_bytes / MIB:.0f}"
        )


def _publish(port: int, n: int, payload_bytes: int) -> int:
    """Child process: ``n`` links, one update each, published together on the cue line."""
    spec, names = AdapterSpec(), client_names(n)
    template = dense_template(payload_bytes)
    envelopes = [
        encode_update(
            trained(c, 1, template), run=RUN, round=1, client=c, method="fedit", spec=spec,
            num_examples=examples_of(c), local_steps=1, compute_s=0.0, rank=spec.rank,
        )
        for c in names
    ]  # fmt: skip
    pool = MqttPool(name="load-publisher")
    start = time.monotonic()
    links = [MqttLink(LinkConfig(c, port=port, backoff_max_s=2.0), pool=pool).start() for c in names]
    for link in links:
        if not link.wait_connected(300):
            raise SystemExit(f"{link.config.client_id} did not connect")
    print(f"ready {time.monotonic() - start:.3f}", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    deliveries = [
        link.publish(up_topic(RUN, c), e) for link, c, e in zip(links, names, envelopes, strict=True)
    ]
    issued = time.monotonic() - start
    ok = sum(1 for d in deliveries if d.wait(600) and d.ok)
    print(f"published {ok} {issued:.3f} {time.monotonic() - start:.3f}", flush=True)
    sys.stdin.readline()  # stay connected until told to leave
    for link in links:
        link.close(timeout_s=1.0)
    pool.close()
    return 0


def run_load_drill(
    port: int, workdir: Path, *, clients: int, payload_bytes: int, broker_queue: int, sync: bool = True,
    stall_s: float = 20.0,
) -> LoadReport:  # fmt: skip
    """Burst ``clients`` updates at one coordinator on the broker at ``port``; see the module docstring."""
    report = LoadReport(clients, payload_bytes, broker_queue)
    names, template = client_names(clients), dense_template(payload_bytes)
    service = make_service(workdir / "state", names, template, rounds=1, sync=sync)
    stop, ready = threading.Event(), threading.Event()
    link = LinkConfig("coordinator", port=port)
    thread = threading.Thread(target=serve, args=(service, link, stop), kwargs={"ready": ready}, daemon=True)
    thread.start()
    source_root = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "bench.drill_load", "--publisher", str(port)]
    publisher = subprocess.Popen(
        [*command, str(clients), str(payload_bytes)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert publisher.stdin is not None and publisher.stdout is not None
    peak = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.02)

    try:
        line = publisher.stdout.readline().split()
        if line[:1] != ["ready"]:
            raise RuntimeError("the publisher did not connect its clients")
        report.connect_s = float(line[1])
        if not ready.wait(60):
            raise RuntimeError("the coordinator did not subscribe")
        report.rss_before_mb = rss_bytes() / MIB
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.monotonic()
        publisher.stdin.write("go\n")
        publisher.stdin.flush()
        last, progress_at = -1, time.monotonic()
        while not service.finished and time.monotonic() - progress_at < stall_s:
            count = len(service.accepted)
            if count != last:
                last, progress_at = count, time.monotonic()
            time.sleep(0.01)
        report.ingest_s = (time.monotonic() if service.finished else progress_at) - start
        report.accepted = service.history[0]["participants"] if service.history else len(service.accepted)
        published = publisher.stdout.readline().split()
        report.issue_s, report.acked_s = float(published[2]), float(published[3])
        sampling.set()
        sampler.join()
        report.rss_peak_mb = peak[0] / MIB
    finally:
        stop.set()
        thread.join(30)
        if publisher.poll() is None:
            publisher.stdin.close()
            publisher.wait(60)
        service.metrics.close()
    return report


def main(argv: list[str]) -> int:
    if argv[:1] == ["--publisher"]:
        return _publish(int(argv[1]), int(argv[2]), int(argv[3]))
    parser = argparse.ArgumentParser(prog="fleetlora bench load", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3000, help="devices, one update each (default 3000)")
    parser.add_argument("--payload", type=int, default=20_000, help="bytes per update (default 20000)")
    parser.add_argument(
        "--broker-queue", type=int, default=BrokerConfig.max_queued_messages,
        help="mosquitto max_queued_messages (default: the shipped %(default)s; mosquitto's own is 1000)",
    )  # fmt: skip
    parser.add_argument("--no-sync", action="store_true", help="persist without fsync")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="fleetlora-load-"))
    os.chmod(workdir, 0o755)  # mosquitto started as root drops to its own user
    try:
        with Mosquitto(workdir / "broker", BrokerConfig(max_queued_messages=args.broker_queue)) as broker:
            report = run_load_drill(
                broker.port, workdir, clients=args.clients, payload_bytes=args.payload,
                broker_queue=args.broker_queue, sync=not args.no_sync,
            )  # fmt: skip
        print(f"connected {args.clients} clients in {report.connect_s:.1f} s")
        print(report.line())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report.lost == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
