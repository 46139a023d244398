"""What the coordinator knows of its fleet and rounds, folded from its own events for the dashboard.

:class:`FleetView` listens to the service's :class:`~coordinator.metrics.MetricsLog` (the same events
``metrics.jsonl`` records, plus the transient ones of :meth:`MetricsLog.notify`) and keeps a small
summary: one row per device, the open round, the curves of the closed rounds, the last refusals. It
reads nothing else and decides nothing: no second source of truth. Events arrive on the service's
threads; :meth:`snapshot` (the HTTP threads) copies under one lock, and :meth:`wait_change` lets a
server-sent-events stream sleep until something changed.

A device's state, from the newest event that concerns it:

``offline``   its last will (or never seen);      ``idle``      online, not sampled in the open round;
``sampled``   sampled, not training yet;          ``training``  it said so on its status topic;
``uploaded``  its update of the open round is in;  ``refused``   it refused the announcement, or the
coordinator refused its update of the open round;  ``dropped``   the last round closed without its update.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

STATES = ("offline", "idle", "sampled", "training", "uploaded", "refused", "dropped")
TRAIL = 12  # state changes kept per device (short states like "training" stay visible)
REFUSALS = 50  # the last refusals shown
CURVE_KEYS = (
    "fed_eval_accuracy", "fed_eval_loss", "eval_accuracy", "eval_loss", "train_loss",
    "bytes_up", "bytes_down", "participants", "aggregate_s", "round_s",
)  # fmt: skip


@dataclass
class DeviceRow:
    client: str
    status: str = ""  # the first word of its last status message ("" = never seen)
    status_detail: str = ""  # the rest of it (a refusal's reason)
    last_seen: float | None = None
    profile: str | None = None
    plan: dict[str, Any] = field(default_factory=dict)  # steps, rank, heads of its last round
    compute_s: float | None = None
    training_round: int = 0
    uploaded_round: int = 0
    refused_round: int = 0
    dropped_round: int = 0
    state: str = "offline"
    trail: list[tuple[float, str]] = field(default_factory=lambda: [(time.time(), "offline")])

    def to_json(self) -> dict[str, Any]:
        """A copy as plain data (by hand: ``dataclasses.asdict`` deep-copies, 5x slower for a fleet)."""
        out = dict(self.__dict__)
        out["plan"], out["trail"] = dict(self.plan), list(self.trail)
        return out


class FleetView:
    """The dashboard's read-only summary of one coordinator (see the module docstring).

    ``roster``: the enrolled devices (``--clients``); an open fleet adds devices as they appear.
    """

    def __init__(self, run: str, method: str, roster: tuple[str, ...] = ()) -> None:
        self.run, self.method = run, method
        self._lock = threading.Condition()
        self._version = 0
        self.devices: dict[str, DeviceRow] = {c: DeviceRow(c) for c in roster}
        self.round = 0
        self.rounds = 0
        self.done = False
        self.sampled: list[str] | None = None
        self.deadline = 0.0
        self.extensions = 0
        self.received = 0
        self.round_refused: Counter[str] = Counter()
        self.refused_total: Counter[str] = Counter()
        self.refusals: deque[dict[str, Any]] = deque(maxlen=REFUSALS)
        self.curves: list[dict[str, Any]] = []
        self.bytes_down = 0
        self.started = time.time()

    # ---- events -----------------------------------------------------------------------------------

    def on_event(self, record: dict[str, Any]) -> None:
        """A :class:`~coordinator.metrics.MetricsLog` listener."""
        handler = getattr(self, f"_on_{record.get('event')}", None)
        if handler is None:
            return
        with self._lock:
            handler(record)
            self._version += 1
            self._lock.notify_all()

    def replay(self, records: list[dict[str, Any]]) -> None:
        """The closed rounds and refusals of an earlier process of this run (its ``metrics.jsonl``)."""
        for record in records:
            if record.get("event") in ("round", "rejected"):
                self.on_event(record)

    def _row(self, client: str) -> DeviceRow:
        row = self.devices.get(client)
        if row is None:
            row = self.devices[client] = DeviceRow(client)
        return row

    def _on_opened(self, r: dict[str, Any]) -> None:
        self.round, self.rounds, self.done = r["round"], r["rounds"], r["done"]
        self.sampled, self.deadline = r["sampled"], r["deadline"]
        self.extensions, self.round_refused = 0, Counter()
        self.received = len(r["accepted"])
        self.bytes_down = r.get("bytes_down", 0)
        for client in r["accepted"]:  # resumed with stored updates
            self._row(client).uploaded_round = self.round
        for row in self.devices.values():
            self._settle(row, r["ts"])

    def _on_accepted(self, r: dict[str, Any]) -> None:
        row = self._row(r["client"])
        row.uploaded_round, row.last_seen = r["round"], r["ts"]
        row.plan = {"steps": r["steps"], "rank": r["rank"], "heads": r["heads"], "examples": r["examples"]}
        row.compute_s = r["compute_s"]
        self.received += 1
        self._settle(row, r["ts"])

    def _on_rejected(self, r: dict[str, Any]) -> None:
        reason, client = r["reason"], r.get("client")
        self.refused_total[reason] += 1
        self.round_refused[reason] += 1
        self.refusals.appendleft({"ts": r["ts"], "reason": reason, "client": client, "message": r["message"]})
        if client in self.devices:
            row = self.devices[client]
            row.refused_round, row.last_seen = self.round, r["ts"]
            self._settle(row, r["ts"])

    def _on_device_status(self, r: dict[str, Any]) -> None:
        row = self._row(r["client"])
        word, _, detail = str(r["status"]).partition(" ")
        row.status, row.status_detail, row.last_seen = word.rstrip(":"), detail, r["ts"]
        if row.status == "training":
            try:
                plan = json.loads(detail)
            except ValueError:
                plan = {}
            row.training_round = int(plan.get("round") or 0)
            row.profile = plan.get("profile") or row.profile
            # (a plan without a rank trains the announced one: the rank of its last update stays shown)
            row.plan = {**row.plan, **{k: plan[k] for k in ("steps", "rank", "heads") if plan.get(k)}}
        self._settle(row, r["ts"])

    def _on_deadline_extended(self, r: dict[str, Any]) -> None:
        self.deadline, self.extensions = r["deadline"], self.extensions + 1

    def _on_round(self, r: dict[str, Any]) -> None:
        point = {"round": r["round"], **{k: r[k] for k in CURVE_KEYS if r.get(k) is not None}}
        aggregation = r.get("aggregation") or {}
        point["aggregation"] = {k: v for k, v in aggregation.items() if isinstance(v, int | float)}
        point["rejected"] = r.get("rejected") or {}
        self.curves.append(point)
        for client in set(r.get("clients") or ()) | set(self.devices):
            row = self._row(client)
            if (row.uploaded_round != r["round"] and self.sampled is not None and client in self.sampled) or (
                row.training_round == r["round"] and row.uploaded_round != r["round"]
            ):
                row.dropped_round = r["round"]

    def _settle(self, row: DeviceRow, ts: float) -> None:
        state = self._state_of(row)
        if state != row.state:
            row.state = state
            row.trail = [*row.trail, (ts, state)][-TRAIL:]

    def _state_of(self, row: DeviceRow) -> str:
        current = self.round
        if row.status in ("", "offline"):
            return "offline"
        if row.status == "refused":
            return "refused"
        if row.uploaded_round == current:
            return "uploaded"
        if row.refused_round == current:
            return "refused"
        if row.training_round == current and not self.done:  # ("online" again: its upload is on its way)
            return "training"
        if self.sampled is not None and row.client in self.sampled and not self.done:
            return "sampled"
        if row.dropped_round and row.dropped_round == current - 1:
            return "dropped"
        return "idle"

    # ---- reading ----------------------------------------------------------------------------------

    def wait_change(self, seen: int, timeout_s: float) -> int:
        """Block until the view changes after version ``seen`` (or ``timeout_s``); the new version."""
        with self._lock:
            self._lock.wait_for(lambda: self._version != seen, timeout_s)
            return self._version

    def progress(self) -> dict[str, Any]:
        """The figures a Prometheus scrape needs, without copying every device row."""
        with self._lock:
            return {
                "states": Counter(row.state for row in self.devices.values()), "devices": len(self.devices),
                "round": self.round - 1 if self.done else self.round, "total": self.rounds, "done": self.done,
                "sampled": len(self.sampled) if self.sampled is not None else 0, "received": self.received,
                "deadline": self.deadline, "extensions": self.extensions,
            }  # fmt: skip

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, as JSON-ready data (the ``/api/state`` answer)."""
        with self._lock:
            devices = [row.to_json() for _, row in sorted(self.devices.items())]
            states = Counter(row.state for row in self.devices.values())
            return {
                "version": self._version, "now": time.time(), "run": self.run, "method": self.method,
                "started": self.started,
                "round": {  # (a finished run shows its last round, not the one after it)
                    "number": self.round - 1 if self.done else self.round, "total": self.rounds,
                    "done": self.done,
                    "sampled": len(self.sampled) if self.sampled is not None else None,
                    "received": self.received, "refused": dict(self.round_refused),
                    "extensions": self.extensions, "deadline": self.deadline,
                },
                "devices": devices,
                "states": {s: states.get(s, 0) for s in STATES},
                "refused_total": dict(self.refused_total),
                "refusals": list(self.refusals),
                "curves": list(self.curves),
                "bytes_down": self.bytes_down,
            }  # fmt: skip
