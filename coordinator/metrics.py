"""The coordinator's metrics: one JSON object per line, appended as events happen.

Every line has ``ts`` (Unix time) and ``event``; the events are ``start``, ``round`` (one per aggregated
round: participants, rejections by reason, divergence, timings), ``rejected`` (one per refused
envelope: reason, client, message), ``deadline_extended`` and ``done``. The file is append-only and
line-buffered, so a plot or ``tail -f`` can read it while the service runs and a killed service leaves
at most one partial last line.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any


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
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - lives as long as the log

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = _clean({"ts": time.time(), "event": event, **fields})
        if self._file is not None:
            self._file.write(json.dumps(record, sort_keys=True) + "\n")
        return record

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
