"""``coordinator serve --http`` (the dashboard beside the service) and ``coordinator status --http``."""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fleetlora.cli import CliError


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--http", default="", metavar="HOST:PORT",
        help="serve the live dashboard, /api/state and Prometheus /metrics there (off unless given; "
        "any address but 127.0.0.1/::1/localhost needs --http-token)",
    )  # fmt: skip
    p.add_argument("--http-token", default="", help="dashboard bearer token: a file or env:NAME")


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http", required=True, metavar="URL", help="the dashboard, e.g. http://127.0.0.1:8080")
    p.add_argument("--token", default="", help="its bearer token: a file or env:NAME (if it needs one)")
    p.add_argument("--json", action="store_true", help="print /api/state as JSON instead of tables")


MIN_TOKEN_CHARS = 16  # a guessable token protects nothing: `openssl rand -hex 16` gives 32


def read_token(spec: str) -> str | None:
    """A bearer token from a file or ``env:NAME`` (never a flag's value: it would show in ``ps``)."""
    if not spec:
        return None
    if spec.startswith("env:"):
        name = spec[4:]
        if name not in os.environ:
            raise CliError(f"environment variable {name} (named for the dashboard token) is not set")
        token, source = os.environ[name].strip(), f"${name}"
    else:
        path = Path(spec)
        if not path.is_file():
            raise CliError(f"token file not found: {path}")
        token, source = path.read_text().strip(), str(path)
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise CliError(f"{source}: a token must be at least {MIN_TOKEN_CHARS} characters without spaces")
    return token


def start_dashboard(args: argparse.Namespace, service: Any, store: Any) -> Any:
    """The dashboard of ``service`` when ``--http`` is given (else None), already serving."""
    if not args.http:
        if args.http_token:
            raise CliError("--http-token without --http: give the address to serve the dashboard on")
        return None
    try:
        from coordinator.fleet_prometheus import FleetMetrics
    except ImportError as e:
        raise CliError(f"--http needs prometheus-client ({e}): pip install 'fleetlora[dashboard]'") from e
    from coordinator.dashboard_http import Dashboard, DashboardError, parse_address
    from coordinator.fleet_view import FleetView
    from coordinator.metrics import read_metrics

    view = FleetView(service.config.run, service.config.method, service.config.clients)
    metrics_path = service.metrics.path
    if metrics_path is not None and Path(metrics_path).is_file():
        view.replay(read_metrics(metrics_path))  # the rounds of this run before a restart
    prometheus = FleetMetrics(view)
    service.metrics.listeners += [view.on_event, prometheus.on_event]
    try:
        dashboard = Dashboard(
            view, parse_address(args.http), token=read_token(args.http_token),
            metrics=prometheus.exposition, state_dir=store.root,
        ).start()  # fmt: skip
    except DashboardError as e:
        raise CliError(str(e)) from e
    print(f"dashboard: {dashboard.url} (JSON: {dashboard.url}api/state, Prometheus: {dashboard.url}metrics)")
    return dashboard


def fetch_state(url: str, token: str | None, timeout_s: float = 10.0) -> dict[str, Any]:
    request = urllib.request.Request(url.rstrip("/") + "/api/state")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as e:
        hint = " (give --token)" if e.code == 401 else ""
        raise CliError(f"{url}: HTTP {e.code} {e.reason}{hint}") from e
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f"{url}: no dashboard answers there ({e}); is the coordinator serving --http?") from e


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ago(ts: float | None, now: float) -> str:
    return "never" if ts is None else f"{max(0.0, now - ts):.0f} s ago"


def format_state(s: dict[str, Any]) -> str:
    """The terminal view of ``/api/state``: the round, the fleet, the curves, the last refusals."""
    r, now = s["round"], s["now"]
    refused = ", ".join(f"{k} {v}" for k, v in sorted(r["refused"].items())) or "none"
    left = "finished" if r["done"] else f"{max(0.0, r['deadline'] - now):.0f} s to the deadline"
    out = [
        f"run {s['run']} ({s['method']}): round {r['number']}/{r['total']}, {left}",
        f"sampled {r['sampled'] if r['sampled'] is not None else 'open fleet'}, received {r['received']}, "
        f"refused {refused}, deadline extended {r['extensions']}x",
        "",
    ]
    rows = [
        [
            d["client"], d["profile"] or "-", d["state"], _ago(d["last_seen"], now),
            d["plan"].get("steps", "-") if d["plan"] else "-",
            (f"heads {d['plan']['heads']}" if d["plan"].get("heads") else d["plan"].get("rank") or "-"),
            "-" if d["compute_s"] is None else f"{d['compute_s']:.2f} s",
        ]
        for d in s["devices"]
    ]  # fmt: skip
    out.append(_table(["device", "profile", "state", "last seen", "steps", "rank/heads", "compute"], rows))
    if s["curves"]:

        def num(c: dict[str, Any], key: str) -> str:
            value = c.get(key, c.get("aggregation", {}).get(key))
            return "-" if value is None else f"{value:.3f}"

        rows = [
            [c["round"], num(c, "fed_eval_accuracy"), num(c, "fed_eval_loss"), num(c, "eval_accuracy"),
             num(c, "train_loss"), f"{c.get('bytes_up', 0) / 1e6:.2f}", num(c, "divergence")]
            for c in s["curves"][-10:]
        ]  # fmt: skip
        heads = ["round", "dev acc", "dev loss", "server acc", "train loss", "MB up", "divergence"]
        out += ["", _table(heads, rows)]
    if s["refusals"]:
        rows = [
            [time.strftime("%H:%M:%S", time.localtime(f["ts"])), f["client"] or "?", f["reason"],
             f["message"][:60]]
            for f in s["refusals"][:10]
        ]  # fmt: skip
        out += ["", _table(["time", "device", "reason", "detail"], rows)]
    return "\n".join(out)


def status(args: argparse.Namespace) -> int:
    state = fetch_state(args.http, read_token(args.token))
    print(json.dumps(state, indent=2) if args.json else format_state(state))
    return 0
