"""One event-loop thread that drives any number of paho MQTT clients.

paho's ``loop_start()`` costs a thread per client and uses ``select()``, which silently fails past
~330 clients in one process (NOTES). Here one thread owns every paho client: it waits on a
``selectors`` (epoll) selector fed by paho's socket callbacks, calls ``loop_read``/``loop_write`` on
the sockets that are ready, ``loop_misc`` on a tick for keep-alives, and runs timers (jittered
connects, reconnect back-off). Other threads never call paho: they hand work to the loop with
:meth:`MqttPool.call_soon`, which wakes it through a socket pair.

A single :class:`~protocol.mqtt_link.MqttLink` gets a private pool of one; the simulator shares
one pool among hundreds of links. Stdlib and paho only (this runs on devices).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)


class PoolMember(Protocol):
    """What the pool needs from a link: its paho client and a periodic tick."""

    @property
    def client(self) -> mqtt.Client: ...

    def tick(self, now: float) -> None: ...


class MqttPool:
    """A selector loop thread driving many paho clients through the external-loop API.

    Parameters
    ----------
    name:
        Thread name.
    tick_s:
        How often every member's :meth:`PoolMember.tick` runs (paho ``loop_misc``: keep-alive pings).
    max_pending_connects:
        How many members may wait for a CONNACK at once. mosquitto's listen backlog is ~100: a burst of
        connects beyond it stalls in SYN retries for seconds (NOTES), so connects are admitted in waves.
    """

    def __init__(
        self, *, name: str = "fleetlora-mqtt", tick_s: float = 0.5, max_pending_connects: int = 64
    ) -> None:
        self.tick_s = tick_s
        self.max_pending_connects = max_pending_connects
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._members: set[PoolMember] = set()
        self._connecting = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- scheduling (any thread) -------------------------------------------------------------------

    def in_loop(self) -> bool:
        """True when called on the loop thread."""
        return threading.current_thread() is self._thread

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread, in the order of calls."""
        self._calls.append(fn)
        if len(self._calls) == 1:  # was empty: the loop may sleep; otherwise a wake-up is already due
            self._wake()

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread after ``delay_s`` seconds."""
        entry = (time.monotonic() + max(0.0, delay_s), next(self._order), fn)
        if self.in_loop():
            heapq.heappush(self._timers, entry)
        else:
            self.call_soon(lambda: heapq.heappush(self._timers, entry))

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the loop is already due to wake up
        except OSError:
            if not self._stopping:
                raise

    # ---- membership (loop thread) ------------------------------------------------------------------

    def attach(self, member: PoolMember) -> None:
        """Route ``member.client``'s sockets through this loop and tick it. Loop thread only."""
        client = member.client
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._members.add(member)

    def detach(self, member: PoolMember) -> None:
        """Stop ticking ``member``; its socket must be closed already. Loop thread only."""
        self._members.discard(member)

    def try_begin_connect(self) -> bool:
        """Take a connect slot (see ``max_pending_connects``); False when all are taken."""
        if self._connecting >= self.max_pending_connects:
            return False
        self._connecting += 1
        return True

    def end_connect(self) -> None:
        """Give back the slot taken by :meth:`try_begin_connect` (CONNACK received or attempt failed)."""
        self._connecting = max(0, self._connecting - 1)

    def forget_socket(self, sock: Any) -> None:
        """Stop watching ``sock`` (a link closing a socket paho did not close itself)."""
        with contextlib.suppress(KeyError, ValueError):  # not registered, or closed: nothing to forget
            self._selector.unregister(sock)

    # ---- paho socket callbacks (loop thread, from inside paho calls) -------------------------------

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._selector.register(sock, selectors.EVENT_READ, client)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.forget_socket(sock)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._set_events(sock, client, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._set_events(sock, client, selectors.EVENT_READ)

    def _set_events(self, sock: Any, client: mqtt.Client, events: int) -> None:
        if not self.in_loop():
            # Only the loop thread touches the selector; a stray paho call elsewhere is re-routed.
            self.call_soon(lambda: self._set_events(sock, client, events))
            return
        try:
            self._selector.modify(sock, events, client)
        except (KeyError, ValueError):
            log.debug("socket %r closed before its events could change", sock)

    # ---- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        next_tick = time.monotonic() + self.tick_s
        while not self._stopping:
            now = time.monotonic()
            due = min(next_tick, self._timers[0][0]) if self._timers else next_tick
            timeout = 0.0 if self._calls else max(0.0, due - now)
            for key, mask in self._selector.select(timeout):
                if key.data is None:
                    self._drain_wake()
                else:
                    self._guard(self._service, key.data, key.fileobj, mask)
            while self._calls:
                self._guard(self._calls.popleft())
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                self._guard(heapq.heappop(self._timers)[2])
            if now >= next_tick:
                next_tick = now + self.tick_s
                for member in list(self._members):
                    self._guard(member.tick, now)
        self._selector.close()
        self._wake_r.close()

    @staticmethod
    def _service(client: mqtt.Client, sock: Any, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            client.loop_read()
            # TLS may hold decrypted bytes that epoll cannot see: read until its buffer is empty.
            tls = sock if isinstance(sock, ssl.SSLSocket) else None
            while tls is not None and tls.pending() and client.socket() is sock:
                client.loop_read()
        if mask & selectors.EVENT_WRITE and client.socket() is sock:
            client.loop_write()

    @staticmethod
    def _guard(fn: Callable[..., None], *args: Any) -> None:
        # One faulty link must not stop the loop for hundreds of others: log and go on.
        try:
            fn(*args)
        except Exception:
            log.exception("error in MQTT loop callback %r", fn)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            return

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the loop thread (links should be closed first) and release the selector."""
        if self._stopping:
            return

        def stop() -> None:
            self._stopping = True

        self.call_soon(stop)
        if not self.in_loop():
            self._thread.join(timeout_s)
        self._wake_w.close()

    @property
    def members(self) -> int:
        """How many links the loop drives."""
        return len(self._members)
