"""``fleetlora bench mqtt``: many clients in one process, one event loop vs a paho thread per client.

Both sides connect N clients to the same private loopback mosquitto, each publishes one QoS 1 message
to its ``up`` topic, and one coordinator link receives them all. Printed: wall time to connect all
clients, to get every message acknowledged and received, and the ratio thread-per-client / pool.
paho's ``loop_start`` uses ``select()``: past ~330 clients it fails (NOTES), so the threaded side is
capped at 300 clients and skipped above that.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from broker.mosquitto import Mosquitto
from protocol.mqtt_link import LinkConfig, MqttLink
from protocol.mqtt_pool import MqttPool

THREADED_MAX = 300
TIMEOUT_S = 120.0


class _Counter:
    def __init__(self, target: int) -> None:
        self.target, self.count = target, 0
        self._lock = threading.Lock()
        self.done = threading.Event()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.count += 1
            if self.count >= self.target:
                self.done.set()


def _run_pool(port: int, n: int, payload: bytes, counter: _Counter) -> tuple[float, float]:
    pool = MqttPool()
    start = time.perf_counter()
    links = [
        MqttLink(LinkConfig(f"pool{i}", port=port), pool=pool).start()  # admission control, no jitter
        for i in range(n)
    ]
    try:
        if not all(link.wait_connected(TIMEOUT_S) for link in links):
            raise RuntimeError("pool: not every client connected")
        connected = time.perf_counter()
        deliveries = [link.publish(f"fleetlora/bench/up/pool{i}", payload) for i, link in enumerate(links)]
        if not (all(d.wait(TIMEOUT_S) and d.ok for d in deliveries) and counter.done.wait(TIMEOUT_S)):
            raise RuntimeError("pool: not every message arrived")
        return connected - start, time.perf_counter() - connected
    finally:
        for link in links:
            link.close()
        pool.close()


def _run_threads(port: int, n: int, payload: bytes, counter: _Counter) -> tuple[float, float]:
    clients = []
    start = time.perf_counter()
    for i in range(n):
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"thread{i}", protocol=mqtt.MQTTv5)
        client.connect_async("127.0.0.1", port)
        client.loop_start()
        clients.append(client)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not all(c.is_connected() for c in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("threads: not every client connected")
            time.sleep(0.005)
        connected = time.perf_counter()
        infos = [c.publish(f"fleetlora/bench/up/thread{i}", payload, qos=1) for i, c in enumerate(clients)]
        for info in infos:
            info.wait_for_publish(TIMEOUT_S)
        if not counter.done.wait(TIMEOUT_S):
            raise RuntimeError("threads: not every message arrived")
        return connected - start, time.perf_counter() - connected
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fleetlora bench mqtt", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=300, help="clients per side (default 300)")
    parser.add_argument("--payload", type=int, default=10_000, help="bytes per message (default 10000)")
    args = parser.parse_args(argv)
    payload = os.urandom(args.payload)
    workdir = Path(tempfile.mkdtemp(prefix="fleetlora-bench-mqtt-"))
    os.chmod(workdir, 0o755)  # mosquitto started as root drops to its own user
    with Mosquitto(workdir) as broker:
        results: dict[str, tuple[float, float]] = {}
        for name, runner, n in (
            ("pool (1 thread)", _run_pool, args.clients),
            ("thread per client", _run_threads, min(args.clients, THREADED_MAX)),
        ):
            if name.startswith("thread") and args.clients > THREADED_MAX:
                print(f"{name}: skipped above {THREADED_MAX} clients (paho loop_start uses select())")
                continue
            counter = _Counter(n)
            coordinator = MqttLink(LinkConfig(f"bench-coordinator-{len(results)}", port=broker.port)).start()
            coordinator.subscribe("fleetlora/bench/up/+", counter)
            coordinator.wait_subscribed(TIMEOUT_S)
            try:
                results[name] = runner(broker.port, n, payload, counter)
            finally:
                coordinator.close()
            connect_s, deliver_s = results[name]
            mb_s = n * len(payload) / deliver_s / 1e6
            print(
                f"{name:18s} {n:5d} clients: connect {connect_s:6.2f} s, publish+receive {deliver_s:6.2f} s "
                f"({mb_s:.1f} MB/s)"
            )
    if len(results) == 2:
        (pc, pd), (tc, td) = results["pool (1 thread)"], results["thread per client"]
        print(f"ratio thread-per-client / pool: connect {tc / pc:.2f}x, publish+receive {td / pd:.2f}x")
    return 0
