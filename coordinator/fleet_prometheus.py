"""The coordinator's Prometheus metrics (``/metrics``), from the same events as the dashboard.

Counters and histograms follow the service's events (:class:`~coordinator.metrics.MetricsLog`
listener); gauges are read from the :class:`~coordinator.fleet_view.FleetView` at each scrape. Each
coordinator has its own :class:`prometheus_client.CollectorRegistry` (not the process-wide default), so
two services in one process (tests, benchmarks) never collide.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.fleet_view import STATES, FleetView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: a small batch written without fsync (~1 ms) up to a large global written with fsync.
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _FleetGauges(Collector):
    """Gauges computed from the view when scraped: nothing to keep in step."""

    def __init__(self, view: FleetView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        r = self.view.progress()
        devices = GaugeMetricFamily("fleetlora_devices", "devices by state", labels=["state"])
        for state in STATES:
            devices.add_metric([state], r["states"].get(state, 0))
        yield devices
        online = r["devices"] - r["states"].get("offline", 0)
        yield GaugeMetricFamily("fleetlora_devices_online", "devices not offline", value=online)
        yield GaugeMetricFamily("fleetlora_round", "the open round (1-based)", value=r["round"])
        yield GaugeMetricFamily("fleetlora_rounds_planned", "rounds of the run", value=r["total"])
        yield GaugeMetricFamily(
            "fleetlora_round_sampled",
            "clients sampled in the open round (0: an open fleet)",
            value=r["sampled"],
        )
        yield GaugeMetricFamily(
            "fleetlora_round_received", "updates in for the open round", value=r["received"]
        )
        yield GaugeMetricFamily(
            "fleetlora_round_deadline_seconds", "seconds to the open round's deadline",
            value=max(0.0, r["deadline"] - time.time()) if not r["done"] else 0.0,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "fleetlora_round_extensions", "deadline extensions of the open round", value=r["extensions"]
        )


class FleetMetrics:
    """A registry of one coordinator's metrics; :meth:`on_event` is its MetricsLog listener."""

    def __init__(self, view: FleetView) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.accepted = Counter("fleetlora_updates_accepted", "updates accepted", registry=r)
        self.refused = Counter("fleetlora_updates_refused", "updates refused", ["reason"], registry=r)
        self.redelivered = Counter("fleetlora_updates_redelivered", "updates delivered again", registry=r)
        self.bytes_up = Counter("fleetlora_bytes_received", "bytes of accepted updates", registry=r)
        self.bytes_down = Counter(
            "fleetlora_bytes_announced", "bytes of the global adapters announced", registry=r
        )
        self.rounds = Counter("fleetlora_rounds", "rounds aggregated", registry=r)
        self.aggregate_s = Histogram(
            "fleetlora_aggregation_seconds", "time to aggregate a round", buckets=TIME_BUCKETS, registry=r
        )
        self.persist_s = Histogram(
            "fleetlora_persist_seconds", "time to persist a batch of accepted updates",
            buckets=TIME_BUCKETS, registry=r,
        )  # fmt: skip
        self.commit_s = Histogram(
            "fleetlora_commit_seconds", "time to persist a closed round (its global and state)",
            buckets=TIME_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(_FleetGauges(view))

    def on_event(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "accepted":
            self.accepted.inc()
            self.bytes_up.inc(record["bytes"])
        elif event == "rejected":
            self.refused.labels(reason=record["reason"]).inc()
        elif event == "redelivered":
            self.redelivered.inc()
        elif event == "round":
            self.rounds.inc()
            self.aggregate_s.observe(record["aggregate_s"])
        elif event == "opened" and not record["done"]:
            self.bytes_down.inc(record.get("bytes_down", 0))
        elif event == "persisted":
            self.persist_s.observe(record["seconds"])
        elif event == "committed":
            self.commit_s.observe(record["seconds"])

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
