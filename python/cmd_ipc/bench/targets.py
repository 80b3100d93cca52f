"""What the processes started by ``cmd-ipc bench`` run (see :mod:`cmd_ipc.bench`).

Worker targets (``"cmd_ipc.bench.targets:<function>"``, each receives the worker's
registry):

* :func:`add_worker`: ``calc.add(a, b)``;
* :func:`pipe_worker`: ``pipe.add(a, b)`` (spawned with ``transport="pipe"``);
* :func:`hop_worker`: spawns a sub-worker running :func:`hop_leaf` (``hop.add(a, b)``), so a
  call of ``hop.add`` from the bench process is forwarded natively by this worker;
* :func:`caller_worker`: ``bench.call_many(command, n, warmup)``, which times ``n`` blocking
  calls of ``command`` from this worker (through whatever route its registry picks) and
  returns ``{"ns": [latency of each call], "elapsed_ns": total}``; ``bench.route_of(command_id)``;
  ``bench.wait_route(command_id, channel_id, timeout)``, the route once that channel's commands
  are known.

Baseline children (not workers: they know nothing about cmd-ipc):

* :func:`mp_pipe_child` (:func:`mp_pipe_child_main` from ``python -c``): a
  ``multiprocessing.Pipe`` end that answers ``{"a", "b"}`` with ``a + b``;
* :func:`streams_child`: an asyncio Unix-socket server answering length-prefixed msgpack
  ``{"a", "b"}`` with ``a + b``.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import struct
import sys
import time
from typing import Any

import msgpack

from cmd_ipc.registry import CommandRegistry

# Every command here is registered with `validate=False`: `cmd-ipc bench` measures the transport,
# so its handlers take the untyped path (no pydantic per call, nor pydantic imported in the
# workers). The cost of validation is measured in benches/test_bench_validation.py.

_LEN = struct.Struct("<I")


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setaffinity(0, {cpu})


# ---------------------------------------------------------------------------- workers


def add_worker(registry: CommandRegistry) -> None:
    """``calc.add``: the handler every latency row calls."""

    @registry.command("calc.add", validate=False)
    def add(a: int, b: int) -> int:
        return a + b


def pipe_worker(registry: CommandRegistry) -> None:
    """``pipe.add``: the same handler, for the worker spawned over the pipe transport."""

    @registry.command("pipe.add", validate=False)
    def add(a: int, b: int) -> int:
        return a + b


def hop_leaf(registry: CommandRegistry) -> None:
    """``hop.add``: the same handler, one level further down the tree."""

    @registry.command("hop.add", validate=False)
    def add(a: int, b: int) -> int:
        return a + b


async def hop_worker(registry: CommandRegistry) -> None:
    """A middle registry: its sub-worker owns ``hop.add``; calls of it pass through here.
    ``bench.hop_pids()`` gives the process ids of both (for the idle-cost measurement)."""
    # The sub-worker inherits this process's CPU affinity.
    leaf = await registry.spawn_worker(f"{registry.id}-leaf", "cmd_ipc.bench.targets:hop_leaf")

    @registry.command("bench.hop_pids", validate=False)
    def hop_pids() -> dict[str, int | None]:
        return {registry.id: os.getpid(), leaf.id: leaf.pid}


def caller_worker(registry: CommandRegistry) -> None:
    """``bench.call_many``: times blocking calls made from this worker."""

    def call_many(command: str, n: int, warmup: int, timeout: float | None) -> dict[str, Any]:
        req = {"a": 1, "b": 2}
        call = registry.execute_command_sync
        clock = time.perf_counter_ns
        for _ in range(warmup):
            call(command, req, timeout=timeout)
        # Preallocated (see cmd_ipc.bench.timing.samples): no page faults inside the timed loop.
        out = array.array("q", bytes(8 * n))
        t_start = clock()
        for i in range(n):
            t0 = clock()
            call(command, req, timeout=timeout)
            out[i] = clock() - t0
        return {"ns": out.tolist(), "elapsed_ns": clock() - t_start}

    @registry.command("bench.call_many", validate=False)
    async def call_many_cmd(
        command: str, n: int, warmup: int = 0, timeout: float | None = None
    ) -> dict[str, Any]:
        # A blocking call may not run on the registry's loop thread: use another thread,
        # as a user without asyncio would.
        return await asyncio.to_thread(call_many, command, n, warmup, timeout)

    @registry.command("bench.route_of", validate=False)
    def route_of(command_id: str) -> str | None:
        return registry.route_of(command_id)

    @registry.command("bench.wait_route", validate=False)
    async def wait_route(command_id: str, channel_id: str, timeout: float = 5.0) -> str | None:
        # After connect_workers: the direct channel's commands are routed once it is listed.
        await registry.wait_listed(channel_id, timeout)
        return registry.route_of(command_id)


# ---------------------------------------------------------------------------- baselines


def mp_pipe_child(conn: Any, cpu: int | None) -> None:
    """``multiprocessing.Pipe`` baseline: answer each ``{"a", "b"}`` with ``a + b``
    until ``None``."""
    _pin(cpu)
    recv, send = conn.recv, conn.send
    while True:
        try:
            msg = recv()
        except EOFError:
            return
        if msg is None:
            return
        send(msg["a"] + msg["b"])


def mp_pipe_child_main() -> None:
    """``python -c`` entry of :func:`mp_pipe_child`; argv: the inherited descriptor of a
    ``multiprocessing.Pipe`` end, cpu or -1."""
    from multiprocessing.connection import Connection

    fd, cpu = int(sys.argv[1]), int(sys.argv[2])
    mp_pipe_child(Connection(fd), None if cpu < 0 else cpu)


async def _streams_serve(listen_fd: int) -> None:
    lsock = socket.socket(fileno=listen_fd)
    done = asyncio.Event()
    unpackb, packb, pack_len, unpack_len = msgpack.unpackb, msgpack.packb, _LEN.pack, _LEN.unpack

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (n,) = unpack_len(await reader.readexactly(4))
                msg = unpackb(await reader.readexactly(n))
                out = packb(msg["a"] + msg["b"])
                writer.write(pack_len(len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_unix_server(serve, sock=lsock)
    async with server:
        await done.wait()  # one client; exit when it leaves


def streams_child() -> None:
    """asyncio-streams baseline: ``python -c`` entry; argv: listening socket fd, cpu or -1."""
    listen_fd, cpu = int(sys.argv[1]), int(sys.argv[2])
    _pin(None if cpu < 0 else cpu)
    asyncio.run(_streams_serve(listen_fd))
