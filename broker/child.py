"""A broker as a child process on loopback: started, waited for until it accepts, stopped by PID.

The base of both brokers fleetlora runs (:class:`broker.mosquitto.Mosquitto` and the zero-setup
:class:`broker.embedded.EmbeddedBroker`), so a test or the simulator can kill and restart either.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from broker.credentials import BrokerError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ChildBroker:
    """A broker running as a child process on loopback: start, wait until it accepts, stop by PID."""

    log_name = "broker.log"

    def __init__(self, workdir: Path | str, host: str, port: int) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Write whatever the child reads before it starts (config files)."""

    def _environment(self) -> dict[str, str] | None:
        return None

    @property
    def url(self) -> str:
        """Where clients connect: ``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> Self:
        """Start the child and return once its port accepts TCP connections."""
        if self.running:
            raise BrokerError(f"{type(self).__name__} already running (pid {self.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        self._output = open(self.workdir / "stdout.log", "ab")  # noqa: SIM115 - lives as long as the child
        self._proc = subprocess.Popen(
            self._command(),
            stdout=self._output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._environment(),
            start_new_session=True,
        )  # Ctrl-C reaches us only: we stop it
        atexit.register(self.stop)  # a forgotten broker must not outlive this process
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._close_output()
                raise BrokerError(
                    f"{type(self).__name__} exited with status {code} at start:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    log.info(
                        "%s listening on %s:%d (pid %d)",
                        type(self).__name__,
                        self.host,
                        self.port,
                        self._proc.pid,
                    )
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise BrokerError(
            f"{type(self).__name__} did not accept connections on port {self.port} "
            f"within {timeout} s:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the child by PID, SIGKILL it if it has not exited after ``timeout`` seconds."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s pid %d ignored SIGTERM; killing it", type(self).__name__, proc.pid)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        self._close_output()

    def kill(self) -> None:
        """SIGKILL the child, as a crash would: it saves nothing (no persistence flush, no last words)."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self._close_output()

    def restart(self, timeout: float = 10.0) -> Self:
        """Stop and start again on the same port(s)."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the child's logs, for error messages."""
        texts = []
        for name in ("stdout.log", self.log_name):
            path = self.workdir / name
            if path.exists():
                texts.append(path.read_text(errors="replace")[-chars:])
        return "\n".join(texts)

    def _close_output(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
