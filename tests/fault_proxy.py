"""A loopback TCP proxy that can cut a connection in the middle of an upload (a flaky network)."""

from __future__ import annotations

import contextlib
import socket
import threading

from broker.child import LOOPBACK

CHUNK = 4096


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target``; :meth:`cut_after` arms one cut.

    Once armed, the connection that has carried ``n`` more client-to-broker bytes is closed on both
    sides mid-stream: the broker sees a truncated packet, the client a dropped connection.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.cuts = 0
        self._armed: int | None = None
        self._lock = threading.Lock()
        self._server = socket.create_server((LOOPBACK, 0))
        self.port = int(self._server.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, n: int) -> None:
        with self._lock:
            self._armed = n

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection((LOOPBACK, self.target))
            pair = (client, upstream)
            threading.Thread(target=self._pump, args=(client, upstream, pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, pair, False), daemon=True).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, ...], up: bool
    ) -> None:
        with contextlib.suppress(OSError):  # the other direction closed the pair first
            while data := src.recv(CHUNK):
                if up and self._spend(len(data)):
                    dst.sendall(data[: len(data) // 2])  # half a chunk more, then the line goes dead
                    break
                dst.sendall(data)
        for s in pair:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue  # already closed
            s.close()

    def _spend(self, n: int) -> bool:
        """Count ``n`` uploaded bytes against the armed cut; True when the cut is due now."""
        with self._lock:
            if self._armed is None:
                return False
            self._armed -= n
            if self._armed > 0:
                return False
            self._armed = None
            self.cuts += 1
            return True

    def close(self) -> None:
        self._closed = True
        self._server.close()
