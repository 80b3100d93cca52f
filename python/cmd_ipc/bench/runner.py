"""The run of ``cmd-ipc bench``: workers and baseline children started, every row measured."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import msgpack

from cmd_ipc._optional import install_hint
from cmd_ipc._procgroup import OWN_PROCESS_GROUP
from cmd_ipc.bench import mesh
from cmd_ipc.bench.children import child_env, reap
from cmd_ipc.bench.pool import measure_pool
from cmd_ipc.bench.remote import measure, start_server, stop_server
from cmd_ipc.bench.render import Progress
from cmd_ipc.bench.results import (
    AWAIT_SHM,
    BASE_AIOHTTP,
    BASE_PIPE,
    BASE_STREAMS,
    BLOCKING_PIPE,
    BLOCKING_SHM,
    DIRECT_SIBLING,
    GRPC_CHANNEL,
    HOP_SIBLING,
    HOP_SUB,
    HTTP_CHANNEL,
    IDLE_PARENT,
    IDLE_WORKER,
    LABELS,
    NATS_CHANNEL,
    PIPELINED,
    PIPELINED_AWAIT,
    POOL_ONE,
    POOL_TWO,
    REQ,
    WS_CHANNEL,
    BenchConfig,
    Results,
    Row,
    machine_info,
)
from cmd_ipc.bench.timing import (
    chunks,
    cpu_ns,
    machine_noise,
    time_async,
    time_blocking,
)
from cmd_ipc.registry import CommandRegistry

__all__ = ["CALL_TIMEOUT", "TARGETS_MODULE", "run"]

#: Where the workers' and baseline children's entry points are.
TARGETS_MODULE = "cmd_ipc.bench.targets"
_LEN = struct.Struct("<I")

# Worker ids.
W_ADD = "bench-add"
W_PIPE = "bench-pipe"
W_HOP = "bench-hop"
W_CALLER = "bench-caller"

CHUNKS = 10
#: Seconds one call may take before the row is reported failed (a stall, not a slow call).
CALL_TIMEOUT = 10.0


class _Bench:
    def __init__(self, config: BenchConfig, results: Results, progress: Progress) -> None:
        self.cfg = config
        self.res = results
        self.progress = progress
        self.child_cpu: int | None = 1 if config.pin else None
        self.registry: CommandRegistry | None = None
        self.worker_pids: dict[str, int] = {}

    # -- helpers

    @property
    def reg(self) -> CommandRegistry:
        assert self.registry is not None
        return self.registry

    def on_loop(
        self,
        make: Callable[[], Awaitable[Any]],
        timeout: float | None = None,
        stop: threading.Event | None = None,
    ) -> Any:
        """Runs a coroutine on the registry's event loop (its background thread) and waits.

        Interrupted (Ctrl-C), it ends the coroutine too, so that nothing goes on running on
        the loop against children being stopped: by setting ``stop`` (which the coroutine
        checks between its calls) when given, else by cancelling it; and waits a little for
        it to end.
        """
        task: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = []
        ended = threading.Event()

        async def run() -> Any:
            current = asyncio.current_task()
            assert current is not None
            task.append((asyncio.get_running_loop(), current))
            try:
                return await make()
            finally:
                ended.set()

        try:
            return self.reg.run_blocking(run, timeout)
        except BaseException as e:
            if not isinstance(e, Exception) and task:
                if stop is not None:
                    stop.set()
                    if ended.wait(5):
                        raise
                loop, running = task[0]
                with contextlib.suppress(RuntimeError):  # the loop is closed already
                    loop.call_soon_threadsafe(running.cancel)
                    ended.wait(5)
            raise

    def control(self, command: str, request: dict[str, Any] | None = None) -> Any:
        """A call that is not measured, made through the event loop (``await``)."""
        reg = self.reg
        return self.on_loop(lambda: reg.execute_command(command, request), CALL_TIMEOUT + 1)

    def step(self, key: str, weight: float, fn: Callable[[], None]) -> None:
        """Runs one step; a failure is recorded as the error of row ``key``."""
        self.progress.set(LABELS.get(key, key))
        try:
            fn()
        except Exception as e:
            self.res.errors.setdefault(key, f"{type(e).__name__}: {e}")
        self.progress.advance(weight)

    def measure_chunked(
        self,
        key: str,
        weight: float,
        run_chunk: Callable[[int, int], tuple[list[int], float]],
        n: int | None = None,
        note: str = "",
    ) -> None:
        """Times ``n`` calls in chunks (``run_chunk(count, warmup)``), advancing the bar
        between chunks (never inside a timed loop)."""
        self.progress.set(LABELS[key])
        n = self.cfg.calls if n is None else n
        samples: list[int] = []
        elapsed = 0.0
        warmup = self.cfg.warmup
        parts = list(chunks(n, CHUNKS))
        try:
            for count in parts:
                s, e = run_chunk(count, warmup)
                warmup = 0
                samples.extend(s)
                elapsed += e
                self.progress.advance(weight / len(parts))
        except Exception as e:
            self.res.errors[key] = f"{type(e).__name__}: {e} (after {len(samples)} of {n} calls)"
            self.progress.advance(weight * (1 - len(samples) / max(1, n)))
            return
        samples.sort()
        self.res.rows[key] = Row(key, samples, elapsed, note)

    # -- setup

    def spawn(self, worker_id: str, target: str, **kwargs: Any) -> None:
        """Spawns one worker (pinned to the children's CPU with ``--pin``)."""
        reg = self.reg
        self.progress.set(f"starting {worker_id}")
        w = reg.spawn_worker_sync(
            worker_id,
            f"{TARGETS_MODULE}:{target}",
            cpu=self.child_cpu,
            ready_timeout=60,
            **kwargs,
        )
        if w.pid is not None:
            self.worker_pids[worker_id] = w.pid

    def stop(self, worker_id: str) -> None:
        w = self.reg.workers.get(worker_id)
        if w is not None:
            self.reg.stop_worker_sync(w)
        self.worker_pids.pop(worker_id, None)

    # -- rows

    def blocking(self, key: str, command: str, weight: float) -> None:
        call = self.reg.execute_command_sync

        def one() -> Any:
            return call(command, REQ)

        self.measure_chunked(key, weight, lambda n, w: time_blocking(one, n, w))

    def awaited(self, weight: float) -> None:
        ex = self.reg.execute_command

        def one() -> Awaitable[Any]:
            return ex("calc.add", REQ)

        self.measure_chunked(
            AWAIT_SHM, weight, lambda n, w: self.on_loop(lambda: time_async(one, n, w))
        )

    def from_worker(self, key: str, weight: float, note: str) -> None:
        """Blocking calls of ``calc.add`` timed inside the caller worker."""
        reg = self.reg

        def chunk(n: int, warmup: int) -> tuple[list[int], float]:
            # The worker's calls time out after CALL_TIMEOUT too (its request_ttl is ours).
            req = {"command": "calc.add", "n": n, "warmup": warmup}
            limit = CALL_TIMEOUT + (n + warmup) * 0.002
            out = self.on_loop(lambda: reg.execute_command("bench.call_many", req, timeout=limit))
            return [int(x) for x in out["ns"]], int(out["elapsed_ns"]) / 1e9

        self.measure_chunked(key, weight, chunk, note=note)

    def connect_direct(self) -> str:
        """Connects the caller worker to the add worker directly; returns the new route."""
        reg = self.reg
        workers = reg.workers
        reg.connect_workers_sync(workers[W_CALLER], workers[W_ADD])
        # Answered once the caller knows the add worker's commands (it waits for that, with
        # a deadline), so the route is final.
        request = {"command_id": "calc.add", "channel_id": W_ADD, "timeout": 5.0}
        return str(self.control("bench.wait_route", request))

    def pipelined(self, weight: float) -> None:
        many = self.reg.execute_many_sync
        window = max(1, self.cfg.window)
        batch = window * 16
        clock = time.perf_counter_ns

        def run(n: int, warmup: int) -> tuple[list[int], float]:
            if warmup:
                many("calc.add", [REQ] * warmup, window=window)
            samples: list[int] = []
            elapsed = 0
            for count in chunks(n, max(1, n // batch)):
                requests = [REQ] * count
                t0 = clock()
                out = many("calc.add", requests, window=window)
                took = clock() - t0
                if len(out) != count or out[-1] != 3:
                    raise RuntimeError(f"wrong results: {out[:3]}...")
                elapsed += took
                samples.extend([took // count] * count)
            return samples, elapsed / 1e9

        self.measure_chunked(
            PIPELINED,
            weight,
            run,
            n=self.cfg.n_pipelined,
            note=(
                f"execute_many_sync batches of {batch}, {window} calls in flight; p50/p99 are "
                "of the time per call of each batch"
            ),
        )

    def pipelined_await(self, weight: float) -> None:
        ex = self.reg.execute_command
        window = max(1, self.cfg.window)

        async def run(n: int, warmup: int) -> tuple[list[int], float]:
            clock = time.perf_counter_ns

            async def lane(count: int, out: list[int]) -> None:
                for _ in range(count):
                    t0 = clock()
                    await ex("calc.add", REQ)
                    out.append(clock() - t0)

            if warmup:
                await asyncio.gather(*(lane(c, []) for c in chunks(warmup, window)))
            outs: list[list[int]] = [[] for _ in range(window)]
            counts = list(chunks(n, window))
            t_start = clock()
            await asyncio.gather(*(lane(c, outs[i]) for i, c in enumerate(counts)))
            elapsed = (clock() - t_start) / 1e9
            return [x for o in outs for x in o], elapsed

        self.measure_chunked(
            PIPELINED_AWAIT,
            weight,
            lambda n, w: self.on_loop(lambda: run(n, w)),
            n=self.cfg.n_pipelined,
            note=f"{window} calls in flight; p50/p99 are latencies under that load",
        )

    # -- baselines

    def baseline_pipe(self, weight: float) -> None:
        # The child gets its end of the multiprocessing.Pipe as an inherited descriptor
        # (not through multiprocessing's process start, which would re-import the main
        # module of whatever script runs this): the timed path, Connection.send/recv, is
        # the same.
        parent, child = multiprocessing.Pipe()
        cpu = -1 if self.child_cpu is None else self.child_cpu
        code = f"import {TARGETS_MODULE} as t; t.mp_pipe_child_main()"
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(child.fileno()), str(cpu)],
            pass_fds=[child.fileno()],
            env=child_env(),
            **OWN_PROCESS_GROUP,  # Ctrl-C reaches the bench only: it ends the child
        )
        child.close()
        try:
            send, recv = parent.send, parent.recv

            def one() -> Any:
                send(REQ)
                return recv()

            self.measure_chunked(BASE_PIPE, weight, lambda n, w: time_blocking(one, n, w))
        finally:
            with contextlib.suppress(OSError):
                parent.send(None)
            parent.close()
            reap(proc, 5)

    def baseline_streams(self, weight: float) -> None:
        tmp = tempfile.mkdtemp(prefix="cmd-ipc-bench-")
        path = os.path.join(tmp, "s")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        proc: subprocess.Popen[bytes] | None = None
        interrupted = False
        try:
            lsock.bind(path)
            lsock.listen(1)
            code = f"import {TARGETS_MODULE} as t; t.streams_child()"
            cpu = -1 if self.child_cpu is None else self.child_cpu
            proc = subprocess.Popen(
                [sys.executable, "-c", code, str(lsock.fileno()), str(cpu)],
                pass_fds=[lsock.fileno()],
                env=child_env(),
                **OWN_PROCESS_GROUP,  # Ctrl-C reaches the bench only: it ends the child
            )
            lsock.close()
            conn: dict[str, Any] = {}

            async def connect() -> None:
                conn["rw"] = await asyncio.open_unix_connection(path)

            self.on_loop(connect, 30)
            reader, writer = conn["rw"]
            packb, unpackb, pack_len, unpack_len = (
                msgpack.packb,
                msgpack.unpackb,
                _LEN.pack,
                _LEN.unpack,
            )

            async def one() -> Any:
                body = packb(REQ)
                writer.write(pack_len(len(body)) + body)
                await writer.drain()
                (size,) = unpack_len(await reader.readexactly(4))
                return unpackb(await reader.readexactly(size))

            self.measure_chunked(
                BASE_STREAMS, weight, lambda n, w: self.on_loop(lambda: time_async(one, n, w))
            )

            async def close() -> None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

            self.on_loop(close, 10)
        except BaseException as e:
            # Interrupted (Ctrl-C): the timed calls may still run on the loop, keeping the
            # child busy; it is ended at once rather than waited for.
            interrupted = not isinstance(e, Exception)
            raise
        finally:
            lsock.close()
            if proc is not None:
                reap(proc, 0 if interrupted else 5)
            with contextlib.suppress(OSError):
                os.unlink(path)
            with contextlib.suppress(OSError):
                os.rmdir(tmp)

    # -- idle

    def idle(self) -> None:
        window = self.cfg.idle_seconds
        time.sleep(0.2)  # let every reader finish its spin and park
        pids = dict(self.worker_pids)
        before = {wid: cpu_ns(pid) for wid, pid in pids.items()}
        self_before = time.process_time_ns()
        t0 = time.monotonic()
        time.sleep(window)
        wall = time.monotonic() - t0
        self_after = time.process_time_ns()
        after = {wid: cpu_ns(pid) for wid, pid in pids.items()}
        per_worker = {}
        for wid in pids:
            b, a = before.get(wid), after.get(wid)
            if a is not None and b is not None:
                per_worker[wid] = 100.0 * (a - b) / 1e9 / wall
        if per_worker:
            busiest = max(per_worker, key=lambda k: per_worker[k])
            self.res.idle[IDLE_WORKER] = {
                "cpu_percent": per_worker[busiest],
                "process": busiest,
                "window_s": wall,
                "per_worker": per_worker,
            }
        self.res.idle[IDLE_PARENT] = {
            "cpu_percent": 100.0 * (self_after - self_before) / 1e9 / wall,
            "process": "bench (all threads, with its registry's loop thread)",
            "window_s": wall,
        }

    # -- the run

    def run(self) -> None:
        cfg = self.cfg
        # Each step may fail (its row then shows the error); the rest of the run goes on.
        # Workers are started just before the rows that use them, so that a worker that is
        # not being measured does not share the CPUs with one that is.
        extra: dict[str, Any] = {} if cfg.spin_us is None else {"spin_us": cfg.spin_us}
        with CommandRegistry("bench", request_ttl=CALL_TIMEOUT, **extra) as reg:
            cfg.spin_us = reg.spin_us  # the effective value, for the report
            self.registry = reg
            self.step("spawn", 0.5, lambda: self.spawn(W_ADD, "add_worker"))
            have_add = W_ADD in reg.workers
            self.baseline_pipe(1.0)
            if have_add:
                self.blocking(BLOCKING_SHM, "calc.add", 1.0)
            else:
                self.skip(BLOCKING_SHM, 1.0)

            def pipe_row() -> None:
                self.spawn(W_PIPE, "pipe_worker", transport="pipe")
                try:
                    self.blocking(BLOCKING_PIPE, "pipe.add", 1.0)
                finally:
                    self.stop(W_PIPE)

            self.step(BLOCKING_PIPE, 0.0, pipe_row)
            self.baseline_streams(1.0)
            if have_add:
                self.awaited(1.0)
                self.pipelined(1.0)
                self.pipelined_await(2.0)
            else:
                self.skip(AWAIT_SHM, 1.0)
                self.skip(PIPELINED, 1.0)
                self.skip(PIPELINED_AWAIT, 2.0)

            def via_parent() -> None:
                if not have_add:
                    raise RuntimeError(f"{W_ADD} did not start")
                self.spawn(W_CALLER, "caller_worker")
                self.from_worker(
                    HOP_SIBLING, 1.0, f"timed in {W_CALLER}; forwarded by the bench process"
                )

            def direct() -> None:
                if W_CALLER not in reg.workers:
                    raise RuntimeError(f"{W_CALLER} did not start")
                route = self.connect_direct()
                if route != W_ADD:
                    raise RuntimeError(f"calc.add still routed to {route!r} after connect")
                self.from_worker(DIRECT_SIBLING, 1.0, f"timed in {W_CALLER}; direct channel")

            self.step(HOP_SIBLING, 0.0, via_parent)
            self.step(DIRECT_SIBLING, 0.0, direct)

            def hop_row() -> None:
                self.spawn(W_HOP, "hop_worker")
                pids = self.control("bench.hop_pids")
                for wid, pid in pids.items():
                    if pid is not None:
                        self.worker_pids.setdefault(wid, int(pid))
                self.blocking(HOP_SUB, "hop.add", 1.0)

            self.step(HOP_SUB, 0.0, hop_row)
            if cfg.n_remote > 0:
                missing = _missing_remote_dependencies()
                if missing:
                    print(
                        f"cmd-ipc bench: remote rows left out: {', '.join(missing)} not "
                        f"installed ({install_hint('remote')})",
                        file=sys.stderr,
                    )
                else:
                    self.step(HTTP_CHANNEL, 1.0, self.remote)
                note = mesh.missing()
                if note:
                    print(f"cmd-ipc bench: {note}", file=sys.stderr)
                else:
                    self.progress.set(f"NATS rows ({cfg.n_remote} calls each)")

                    def nats_rows() -> None:
                        self.res.rows.update(mesh.rows(self.on_loop, cfg.n_remote, self.child_cpu))

                    self.step(NATS_CHANNEL, 0.0, nats_rows)
            self.step(POOL_TWO, 1.0, self.pools)
            self.progress.set(f"idle cost ({cfg.idle_seconds:g} s)")
            self.step(IDLE_WORKER, 1.0, self.idle)
            self.progress.set("stopping workers")
            # Stop in reverse order of start: callers before what they call.
            for wid in reversed(list(reg.workers)):
                with contextlib.suppress(Exception):
                    self.stop(wid)
        self.registry = None

    def pools(self) -> None:
        """Pool scaling: a pool of 1 then of 2 members, each call about 1 ms of pure-Python
        work. The members may run on every CPU (a pinned run pins the bench process and
        its other children, which would put both members on one CPU)."""
        calls = max(100, self.cfg.calls // 20)

        async def pin(cpus: set[int]) -> set[int]:
            # The workers are started by the registry's loop thread, and a child takes the
            # CPUs of the thread that starts it.
            before = os.sched_getaffinity(0)
            os.sched_setaffinity(0, cpus)
            return before

        every = set(range(os.cpu_count() or 1))
        loop_cpus = self.reg.run_blocking(lambda: pin(every))
        try:
            for key, size in ((POOL_ONE, 1), (POOL_TWO, 2)):
                out = measure_pool(self.reg, size, calls * size, pool_id=f"bench-{key}")
                self.res.rows[key] = Row(
                    key,
                    out["samples_ns"],
                    out["elapsed_s"],
                    f"{size} member{'s' if size > 1 else ''} on any CPU, {2 * size} calls in "
                    "flight; p50/p99 are of the time per call of each batch",
                )
        finally:
            self.reg.run_blocking(lambda: pin(loop_cpus))

    def remote(self) -> None:
        """HTTPChannel, WebSocketChannel, GrpcChannel (with grpcio installed) and a bare
        aiohttp POST against one server child."""
        n, warmup = self.cfg.n_remote, max(50, self.cfg.n_remote // 10)
        self.progress.set(f"remote rows ({n} calls each)")
        proc, urls = start_server(self.child_cpu)
        # Interrupted, the calls stop between two (a cancelled call would leave a late answer
        # or a lost connection to report).
        stop = threading.Event()
        try:
            timed = self.on_loop(lambda: measure(urls, n, warmup, stop), 600, stop)
        finally:
            stop_server(proc)
        if "grpc" not in timed:
            print(
                f"cmd-ipc bench: the gRPC row left out: grpcio not installed "
                f"({install_hint('grpc')})",
                file=sys.stderr,
            )
        for key, name in (
            (BASE_AIOHTTP, "bare"),
            (HTTP_CHANNEL, "http"),
            (WS_CHANNEL, "ws"),
            (GRPC_CHANNEL, "grpc"),
        ):
            if name not in timed:
                continue
            samples, elapsed = timed[name]
            samples.sort()
            note = "sequential, one server process on loopback"
            self.res.rows[key] = Row(key, samples, elapsed, note)

    def skip(self, key: str, weight: float) -> None:
        self.res.errors.setdefault(key, f"{W_ADD} did not start")
        self.progress.advance(weight)


def _missing_remote_dependencies() -> list[str]:
    """The optional packages the remote rows need that are not installed."""
    import importlib.util

    return [m for m in ("aiohttp", "websockets") if importlib.util.find_spec(m) is None]


def run(config: BenchConfig, progress_stream: TextIO | None = None) -> Results:
    """Runs the whole benchmark; returns its results."""
    started = datetime.datetime.now(datetime.timezone.utc).astimezone()
    t0 = time.monotonic()
    # Before pinning, so that the CPUs this process may use are reported as they were.
    results = Results(config, started=started.isoformat(timespec="seconds"), machine=machine_info())
    # On the CPUs the rows will use (before pinning takes all but CPU 0 away).
    results.machine["noise"] = machine_noise()
    if config.pin:
        # Before any thread exists: threads inherit the affinity of the one creating them.
        os.sched_setaffinity(0, {0})
    total = 0.5 + 8 * 1.0 + 2.0 + 1.0
    progress = Progress(total, config.progress, progress_stream)
    try:
        _Bench(config, results, progress).run()
    finally:
        progress.close()
    results.duration_s = time.monotonic() - t0
    return results
