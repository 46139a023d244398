"""The coordinator's metrics: one JSON object per line, appended as events happen.

Every line has ``ts`` (Unix time) and ``event``; the events are ``start``, ``round`` (one per aggregated
round: participants, rejections by reason, redeliveries, divergence, ``aggregation`` (every figure the
method records: divergence per layer, FedRPCA's, FLoRA-NA's), timings; the devices' evaluation
of the global the round trained from, ``fed_eval_loss``/``fed_eval_accuracy`` over
``fed_eval_examples`` validation examples of ``fed_eval_clients`` devices, and their ``train_loss``;
with ``--eval-data``, ``eval_loss``/``eval_accuracy``/``eval_examples`` of the new global),
``rejected`` (one per refused envelope: reason, client, message), ``redelivered``,
``device_status`` (a device's status message), ``deadline_extended`` and ``done``. The file is append-only and
line-buffered, so a plot or ``tail -f`` can read it while the service runs and a killed service leaves
at most one partial last line.

Listeners (the dashboard, :mod:`coordinator.fleet_view`) get every record as it is written, and also the
events too frequent or too transient for the file (:meth:`MetricsLog.notify`: ``opened``, ``accepted``,
``persisted``, ``committed``): one stream of events, so the dashboard keeps no second source of truth.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from coordinator.store import RoundState
from protocol.wire import UpdateHeader

log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    """Append-only JSON-lines log with counters of rejections by reason.

    Parameters
    ----------
    path : Path or None
        The ``.jsonl`` file (created with its folder); None keeps the counters only.
    """

    def __init__(self, path: Path | str | None) -> None:
        self.path = Path(path) if path is not None else None
        self.rejections: Counter[str] = Counter()  # reason -> count, over the whole run
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # called with every record
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - lives as long as the log

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = _clean({"ts": time.time(), "event": event, **fields})
        if self._file is not None:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._tell(record)
        return record

    def notify(self, event: str, **fields: Any) -> None:
        """Hand an event to the listeners only (not written to the file); a no-op without listeners."""
        if self.listeners:
            self._tell({"ts": time.time(), "event": event, **fields})

    def _tell(self, record: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(record)
            except Exception:  # an observer's bug must not stop the rounds: logged, with its traceback
                log.exception("a metrics listener failed on a %r event", record.get("event"))

    def rejected(self, reason: str, client: str | None, message: str) -> None:
        self.rejections[reason] += 1
        self.write("rejected", reason=reason, client=client, message=message[:300])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """Every complete line of a metrics log (a torn last line from a killed service is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def device_measurements(headers: Sequence[UpdateHeader]) -> dict[str, Any]:
    """A round's federated evaluation from its updates' headers: example-weighted means.

    ``fed_eval_*``: the global the round trained from, on the devices' validation examples (only the
    devices that measured it count); ``train_loss``: the mean local training loss, weighted by each
    device's training examples. Keys are left out when no device measured them.
    """
    out: dict[str, Any] = {}
    evaluated = [h for h in headers if h.eval_examples]
    if evaluated:
        n = sum(h.eval_examples or 0 for h in evaluated)
        out["fed_eval_loss"] = sum((h.eval_loss or 0.0) * (h.eval_examples or 0) for h in evaluated) / n
        out["fed_eval_accuracy"] = (
            sum((h.eval_accuracy or 0.0) * (h.eval_examples or 0) for h in evaluated) / n
        )
        out["fed_eval_examples"], out["fed_eval_clients"] = n, len(evaluated)
    trained = [h for h in headers if h.train_loss is not None]
    if trained:
        weight = sum(h.num_examples for h in trained)
        out["train_loss"] = sum((h.train_loss or 0.0) * h.num_examples for h in trained) / weight
    return out


NAMED_IN_LOG = 8  # a round of thousands of clients stays one readable line


def _some(names: list[str]) -> str:
    """The first few names, and how many more (the dashboard and /api/state list them all)."""
    shown = ", ".join(names[:NAMED_IN_LOG])
    return shown if len(names) <= NAMED_IN_LOG else f"{shown} and {len(names) - NAMED_IN_LOG} more"


def open_line(state: RoundState, rounds: int, min_clients: int) -> str:
    """One line for a round that opens: whom it waits for, until when."""
    if state.done:
        return f"all {rounds} rounds are aggregated"
    waiting = (
        f"{len(state.sampled)} sampled clients ({_some(state.sampled)})"
        if state.sampled is not None
        else f"every client drawn at fraction {state.sample_fraction:g}"
    )
    until = time.strftime("%H:%M:%S", time.localtime(state.deadline))
    then = f"then closes with at least {min_clients}"
    return f"round {state.round}/{rounds} open: waiting for {waiting}, until {until} ({then})"


def round_line(record: Mapping[str, Any], rounds: int) -> str:
    """One line for a round record: what a coordinator's operator reads while the run goes on."""
    sampled = record.get("sampled")
    parts = [f"round {record['round']}/{rounds}: {record['participants']}/{sampled or '?'} updates"]
    rejected = record.get("rejected") or {}
    if rejected:
        parts.append(
            f"refused {sum(rejected.values())} ("
            + ", ".join(f"{k} {v}" for k, v in sorted(rejected.items()))
            + ")"
        )
    if record.get("redelivered"):
        parts.append(f"{record['redelivered']} redelivered")
    if "fed_eval_accuracy" in record:
        parts.append(
            f"devices: accuracy {record['fed_eval_accuracy']:.3f} loss {record['fed_eval_loss']:.3f} "
            f"of the global they trained from ({record['fed_eval_examples']} validation examples)"
        )
    if "train_loss" in record:
        parts.append(f"train loss {record['train_loss']:.3f}")
    if "eval_accuracy" in record:
        parts.append(
            f"eval data: accuracy {record['eval_accuracy']:.3f} loss {record['eval_loss']:.3f} "
            f"({record['eval_examples']} examples)"
        )
    parts.append(f"{record.get('bytes_up', 0) / 1e6:.2f} MB up, {record.get('round_s', 0.0):.1f} s")
    return ", ".join(parts)
