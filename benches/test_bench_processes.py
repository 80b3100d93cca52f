"""Cross-process call latency (pytest-benchmark): ``make bench`` or
``pytest benches --benchmark-only``; ``cmd-ipc bench`` measures the same paths (with
percentiles, throughput and idle cost) in one run.

Each benchmark round makes ``BATCH`` sequential calls of ``add({"a": 1, "b": 2})``, so the
figure per round divided by ``BATCH`` is the cost of one call. Rows:

* ``blocking_shm``: ``execute_command_sync`` to a worker over shared memory;
* ``await_shm``: ``await execute_command`` to the same worker (on the registry's loop);
* ``blocking_pipe``: ``execute_command_sync`` to a worker over the pipe transport;
* ``hop_sub``: a blocking call of a sub-worker's command, forwarded natively by its worker;
* ``hop_sibling``: blocking calls timed inside a worker, of a sibling's command, forwarded
  natively by this process;
* ``pipelined_shm``: one ``execute_many_sync`` of ``BATCH`` calls per round (256 in flight)
  to a worker over shared memory;
* baselines measured in the same run: ``baseline_pipe`` (a ``multiprocessing.Pipe`` round
  trip with a child process) and ``baseline_streams`` (length-prefixed msgpack over an
  asyncio Unix socket to a child process).

The ratios to the baselines are printed at the end of the run (``benches/conftest.py``).
``CMD_IPC_BENCH_PIN=1`` pins this process to CPU 0 and the children to CPU 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgpack
import pytest
from cmd_ipc import CommandRegistry

BATCH = 2000
ROUNDS = 10
REQ = {"a": 1, "b": 2}
TARGETS = "cmd_ipc.bench.targets"
PIN = os.environ.get("CMD_IPC_BENCH_PIN", "") not in ("", "0")
CHILD_CPU = 1 if PIN else None
#: Per-call microseconds by row, read by the terminal summary in conftest.py.
RESULTS: dict[str, float] = {}
RATIOS = (
    ("blocking_shm", "baseline_pipe"),
    ("await_shm", "baseline_streams"),
    ("blocking_pipe", "baseline_pipe"),
    ("hop_sub", "baseline_pipe"),
    ("hop_sibling", "baseline_pipe"),
    ("pipelined_shm", "baseline_pipe"),
)
#: (row, reference): the extra cost of a router hop, printed by conftest.py too.
EXTRA = (("hop_sub", "blocking_shm"),)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


@pytest.fixture(scope="module")
def registry() -> Iterator[CommandRegistry]:
    if PIN:
        # The registry's loop thread (created below) inherits the affinity.
        os.sched_setaffinity(0, {0})
    with CommandRegistry("bench", request_ttl=10.0) as reg:
        yield reg


@contextlib.contextmanager
def _worker(
    registry: CommandRegistry, worker_id: str, target: str, **kwargs: Any
) -> Iterator[None]:
    """A worker for the duration of one benchmark (idle workers would share the CPUs)."""
    worker = registry.spawn_worker_sync(worker_id, f"{TARGETS}:{target}", cpu=CHILD_CPU, **kwargs)
    try:
        yield
    finally:
        registry.stop_worker_sync(worker)


def _record(benchmark: Any, name: str) -> None:
    per_call_us = benchmark.stats.stats.median / BATCH * 1e6
    benchmark.extra_info["per_call_us"] = per_call_us
    RESULTS[name] = per_call_us


def _bench_blocking(benchmark: Any, name: str, one_call: Callable[[], Any]) -> None:
    def batch() -> None:
        for _ in range(BATCH):
            one_call()

    benchmark.pedantic(batch, rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, name)


def _bench_on_loop(
    benchmark: Any, registry: CommandRegistry, name: str, one_call: Callable[[], Awaitable[Any]]
) -> None:
    """Each round runs on the registry's event loop (its background thread)."""

    async def batch() -> None:
        for _ in range(BATCH):
            await one_call()

    benchmark.pedantic(lambda: registry.run_blocking(batch), rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, name)


def test_baseline_pipe(benchmark: Any) -> None:
    parent, child = multiprocessing.Pipe()
    cpu = -1 if CHILD_CPU is None else CHILD_CPU
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import {TARGETS} as t; t.mp_pipe_child_main()",
         str(child.fileno()), str(cpu)],
        pass_fds=[child.fileno()],
        env=_child_env(),
    )  # fmt: skip
    child.close()
    try:

        def one_call() -> Any:
            parent.send(REQ)
            return parent.recv()

        assert one_call() == 3
        _bench_blocking(benchmark, "baseline_pipe", one_call)
    finally:
        parent.send(None)
        parent.close()
        proc.wait(10)


def test_baseline_streams(benchmark: Any, registry: CommandRegistry) -> None:
    tmp = tempfile.mkdtemp(prefix="cmd-ipc-bench-")
    path = os.path.join(tmp, "s")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    cpu = -1 if CHILD_CPU is None else CHILD_CPU
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import {TARGETS} as t; t.streams_child()",
         str(lsock.fileno()), str(cpu)],
        pass_fds=[lsock.fileno()],
        env=_child_env(),
    )  # fmt: skip
    lsock.close()
    length = struct.Struct("<I")
    try:
        conn: dict[str, Any] = {}

        async def connect() -> None:
            conn["rw"] = await asyncio.open_unix_connection(path)

        registry.run_blocking(connect)
        reader, writer = conn["rw"]

        async def one_call() -> Any:
            body = msgpack.packb(REQ)
            writer.write(length.pack(len(body)) + body)
            await writer.drain()
            (size,) = length.unpack(await reader.readexactly(4))
            return msgpack.unpackb(await reader.readexactly(size))

        _bench_on_loop(benchmark, registry, "baseline_streams", one_call)

        async def close() -> None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

        registry.run_blocking(close)
    finally:
        proc.wait(10)
        os.unlink(path)
        os.rmdir(tmp)


def test_blocking_shm(benchmark: Any, registry: CommandRegistry) -> None:
    with _worker(registry, "bench-add", "add_worker"):
        assert registry.execute_command_sync("calc.add", REQ) == 3
        _bench_blocking(
            benchmark, "blocking_shm", lambda: registry.execute_command_sync("calc.add", REQ)
        )


def test_await_shm(benchmark: Any, registry: CommandRegistry) -> None:
    with _worker(registry, "bench-add", "add_worker"):
        _bench_on_loop(
            benchmark, registry, "await_shm", lambda: registry.execute_command("calc.add", REQ)
        )


def test_blocking_pipe(benchmark: Any, registry: CommandRegistry) -> None:
    with _worker(registry, "bench-pipe", "pipe_worker", transport="pipe"):
        assert registry.execute_command_sync("pipe.add", REQ) == 3
        _bench_blocking(
            benchmark, "blocking_pipe", lambda: registry.execute_command_sync("pipe.add", REQ)
        )


def test_hop_sub(benchmark: Any, registry: CommandRegistry) -> None:
    """bench -> worker -> sub-worker: the middle worker forwards natively."""
    with _worker(registry, "bench-hop", "hop_worker"):
        assert registry.execute_command_sync("hop.add", REQ) == 3
        forwarded = registry.stats()["forwarded"]
        _bench_blocking(benchmark, "hop_sub", lambda: registry.execute_command_sync("hop.add", REQ))
        assert registry.stats()["forwarded"] == forwarded  # the hop was in the worker


def test_hop_sibling(benchmark: Any, registry: CommandRegistry) -> None:
    """worker -> this process -> worker: timed inside the calling worker."""
    with (
        _worker(registry, "bench-add", "add_worker"),
        _worker(registry, "bench-caller", "caller_worker"),
    ):
        forwarded = registry.stats()["forwarded"]
        times: list[float] = []

        def batch() -> None:
            out = registry.run_blocking(
                lambda: registry.execute_command(
                    "bench.call_many", {"command": "calc.add", "n": BATCH}, timeout=20
                )
            )
            times.append(out["elapsed_ns"] / 1e9)

        # The round's time is measured in the worker (it excludes the outer call).
        benchmark.pedantic(batch, rounds=ROUNDS, warmup_rounds=1)
        times = sorted(times[1:])
        per_call_us = times[len(times) // 2] / BATCH * 1e6
        benchmark.extra_info["per_call_us_in_worker"] = per_call_us
        RESULTS["hop_sibling"] = per_call_us
        assert registry.stats()["forwarded"] >= forwarded + BATCH * ROUNDS


def test_pipelined_shm(benchmark: Any, registry: CommandRegistry) -> None:
    with _worker(registry, "bench-add", "add_worker"):
        requests = [REQ] * BATCH

        def batch() -> None:
            assert registry.execute_many_sync("calc.add", requests, window=256)[-1] == 3

        benchmark.pedantic(batch, rounds=ROUNDS, warmup_rounds=1)
        _record(benchmark, "pipelined_shm")
