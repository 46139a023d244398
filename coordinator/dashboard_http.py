"""The coordinator's dashboard over HTTP: one live page, a JSON API, Prometheus metrics, the adapter.

``GET /``              the page (``coordinator/dashboard/``: HTML, CSS and our own JavaScript; the charts
                       are inline SVG drawn by that script, so nothing is fetched from the internet)
``GET /api/state``     :meth:`FleetView.snapshot` as JSON (``fleetlora coordinator status --http``)
``GET /api/events``    the same snapshot as server-sent events, pushed when it changes (at most
                       ``1 / PUSH_INTERVAL_S`` times a second per viewer), with a keep-alive comment
``GET /metrics``       Prometheus text format (:mod:`coordinator.fleet_prometheus`)
``GET /adapter.zip``   the current global as a PEFT adapter folder (:func:`export_adapter`), zipped

A stdlib :class:`ThreadingHTTPServer` on its own threads: the service thread never waits for it, and
it reads only the view (under the view's lock) and the state folder's committed files.

Access: bound to a loopback address (exactly ``127.0.0.1``, ``::1`` or ``localhost``) it may run without
a token; any other address needs one, or the server refuses to start. With a token every request must
carry it, as ``Authorization: Bearer TOKEN`` or ``?token=TOKEN`` (the page passes its own on), else 401.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import tempfile
import threading
import zipfile
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from coordinator.fleet_view import FleetView

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")
# A burst of updates becomes one push per viewer per this many seconds: a snapshot of 500 devices is
# ~170 kB of JSON and ~7 ms of the interpreter (measured), so a viewer costs under 1% of a core.
PUSH_INTERVAL_S = 1.0
KEEPALIVE_S = 15.0
CLOSE_WAIT_S = 2.0  # how long closing waits for the event streams to send their last snapshot
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


class DashboardError(ValueError):
    """A dashboard that must not start (a non-loopback address without a token, a bad address)."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise DashboardError(f"--http wants HOST:PORT (e.g. 127.0.0.1:8080), got {text!r}")
    return host, int(port)


class Dashboard:
    """The HTTP server of one coordinator; :meth:`start` it, :meth:`close` it (stops every thread).

    Parameters
    ----------
    view : FleetView
    address : (host, port); port 0 picks a free one (see :attr:`url`)
    token : str, optional
        Required on every request when given; required to exist for a non-loopback host.
    metrics : callable, optional
        Returns the Prometheus exposition (``FleetMetrics.exposition``); ``/metrics`` is 404 without it.
    state_dir : Path, optional
        The coordinator's state folder, for ``/adapter.zip``.
    """

    def __init__(
        self,
        view: FleetView,
        address: tuple[str, int],
        *,
        token: str | None = None,
        metrics: Callable[[], bytes] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        host, _ = address
        if host not in LOOPBACK and not token:
            raise DashboardError(
                f"the dashboard on {host} (not loopback) needs a bearer token: give --http-token "
                "(a file or env:NAME), or bind 127.0.0.1 and reach it through an SSH tunnel"
            )
        self.view, self.token, self.metrics, self.state_dir = view, token or None, metrics, state_dir
        self.closing = threading.Event()
        self._export_lock = threading.Lock()
        self._streams = threading.Condition()
        self._open_streams = 0
        handler = type("Handler", (_Handler,), {"dashboard": self})
        try:
            self.server = ThreadingHTTPServer(address, handler)
        except OSError as e:
            raise DashboardError(f"cannot serve the dashboard on {host}:{address[1]}: {e}") from e
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="dashboard", daemon=True)

    @property
    def url(self) -> str:
        host, port = str(self.server.server_address[0]), self.server.server_address[1]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    def start(self) -> Dashboard:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving; open event streams get the last snapshot first (a finished run's last round)."""
        self.closing.set()
        with self._streams:
            self._streams.wait_for(lambda: self._open_streams == 0, CLOSE_WAIT_S)
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def authorized(self, header: str | None, query_token: str | None) -> bool:
        if self.token is None:
            return True
        offered = query_token or ""
        if header and header.lower().startswith("bearer "):
            offered = header[7:].strip()
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def adapter_zip(self) -> tuple[str, bytes]:
        """(file name, zip bytes) of the current global as a PEFT folder; ExportError says why not."""
        from coordinator.adapter_export import ExportError, export_adapter

        if self.state_dir is None:
            raise ExportError("this dashboard has no state folder to export from")
        with self._export_lock, tempfile.TemporaryDirectory(prefix="fleetlora-adapter-") as tmp:
            exported = export_adapter(self.state_dir, Path(tmp) / "adapter")
            name = f"{self.view.run}-round{exported.round}-adapter"
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in sorted(exported.folder.rglob("*")):
                    if path.is_file():
                        archive.write(path, f"{name}/{path.relative_to(exported.folder)}")
        return f"{name}.zip", buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard
    protocol_version = "HTTP/1.1"
    server_version = "fleetlora-dashboard"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)  # (the path's token never reaches a log)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("%s %s %s", self.command, urlsplit(self.path).path, code)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query_token = (parse_qs(url.query).get("token") or [""])[0]
        if not self.dashboard.authorized(self.headers.get("Authorization"), query_token):
            self._send(HTTPStatus.UNAUTHORIZED, b"a bearer token is required\n", "text/plain", auth=True)
            return
        path = url.path
        if path in ASSETS:
            name, kind = ASSETS[path]
            self._send(
                HTTPStatus.OK, resources.files("coordinator").joinpath("dashboard", name).read_bytes(), kind
            )
        elif path == "/api/state":
            self._send(HTTPStatus.OK, json.dumps(self.dashboard.view.snapshot()).encode(), "application/json")
        elif path == "/api/events":
            self._stream()
        elif path == "/metrics" and self.dashboard.metrics is not None:
            from coordinator.fleet_prometheus import CONTENT_TYPE

            self._send(HTTPStatus.OK, self.dashboard.metrics(), CONTENT_TYPE)
        elif path == "/adapter.zip":
            self._adapter()
        else:
            self._send(HTTPStatus.NOT_FOUND, f"no such page: {path}\n".encode(), "text/plain")

    def _adapter(self) -> None:
        from coordinator.adapter_export import ExportError

        try:
            name, data = self.dashboard.adapter_zip()
        except ExportError as e:
            self._send(HTTPStatus.CONFLICT, f"no adapter to download: {e}\n".encode(), "text/plain")
            return
        self._send(
            HTTPStatus.OK, data, "application/zip",
            extra={"Content-Disposition": f'attachment; filename="{name}"'},
        )  # fmt: skip

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        kind: str,
        *,
        auth: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if auth:
            self.send_header("WWW-Authenticate", 'Bearer realm="fleetlora"')
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _stream(self) -> None:
        """Server-sent events: the snapshot now, then again whenever the view changes."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        dashboard = self.dashboard
        with dashboard._streams:
            dashboard._open_streams += 1
        try:
            self._push_changes()
        except (BrokenPipeError, ConnectionResetError):
            log.debug("a dashboard viewer left")
        finally:
            with dashboard._streams:
                dashboard._open_streams -= 1
                dashboard._streams.notify_all()

    def _push_changes(self) -> None:
        view, closing = self.dashboard.view, self.dashboard.closing
        seen, quiet = -1, 0.0
        while True:
            if closing.is_set():  # one last snapshot if anything changed since the last one
                if view.wait_change(seen, 0) != seen:
                    self._push(view.snapshot())
                return
            version = view.wait_change(seen, 1.0)
            if version == seen:
                quiet += 1.0
                if quiet >= KEEPALIVE_S:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                    quiet = 0.0
                continue
            seen, quiet = version, 0.0
            self._push(view.snapshot())
            closing.wait(PUSH_INTERVAL_S)

    def _push(self, snapshot: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(snapshot).encode() + b"\n\n")
        self.wfile.flush()
