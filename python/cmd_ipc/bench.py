"""``cmd-ipc bench``: the latency benchmark (the main job).

One run spawns the worker processes of :mod:`cmd_ipc._bench_targets` and the baseline
children, and times the round trip of ``add({"a": 1, "b": 2})`` (baseline in brackets):

* blocking shm: ``execute_command_sync`` to a worker over shared memory [Pipe];
* await shm: ``await execute_command`` to the same worker [streams];
* blocking pipe: ``execute_command_sync`` to a worker over the pipe transport [Pipe];
* hop bench→worker→sub-worker: a blocking call of a sub-worker's command, which the middle
  worker forwards natively [Pipe]; its extra cost is measured against blocking shm;
* hop worker→parent→worker: blocking calls timed inside a worker, of a sibling's command,
  which the bench process forwards natively [Pipe]; its extra cost is measured against
  the next row;
* direct worker→worker: the same calls after ``connect_workers`` [Pipe];
* pipelined shm: ``execute_many_sync`` batches of ``calc.add``, ``--window`` calls in
  flight [Pipe]; its p50/p99 are of the time per call of each batch;
* pipelined await shm: ``await execute_command`` with ``--window`` calls in flight [Pipe];
* remote, against one server child on loopback (:mod:`cmd_ipc._bench_remote`):
  ``HTTPChannel`` [a bare keep-alive aiohttp POST to the same server; its ratio is of
  calls/s] and ``WebSocketChannel`` [the HTTPChannel row];
* baselines: ``multiprocessing.Pipe`` send/recv with a child process (Pipe), and
  length-prefixed msgpack over an asyncio Unix socket to a child process (streams);

then the idle cost: CPU used by the idle workers and the idle bench process over
``--idle-seconds``. Each latency row reports p50/p99/mean (µs) and calls/s; its ratio is
``p50 / baseline p50`` (for the pipelined rows, time per call ``1 / calls/s`` over the
baseline's), lower is better. The targets of issues 3 and 4 are printed as met or NOT met.

Workers are started just before the rows that use them. A call that takes longer than
``CALL_TIMEOUT`` fails its row (shown in the table) instead of hanging the run. ``--pin``
pins the bench process to CPU 0 and every child (workers, their sub-workers, baseline
children) to CPU 1.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import datetime
import json
import math
import multiprocessing
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import msgpack

from cmd_ipc.registry import CommandRegistry

__all__ = ["BenchConfig", "main", "run"]

REQ = {"a": 1, "b": 2}
TARGETS_MODULE = "cmd_ipc._bench_targets"
_LEN = struct.Struct("<I")

# Keys of the rows, in table order.
BLOCKING_SHM = "blocking_shm"
AWAIT_SHM = "await_shm"
BLOCKING_PIPE = "blocking_pipe"
HOP_SUB = "hop_bench_worker_sub"
HOP_SIBLING = "hop_worker_parent_worker"
DIRECT_SIBLING = "direct_worker_worker"
PIPELINED = "pipelined_shm"
PIPELINED_AWAIT = "pipelined_await_shm"
BASE_PIPE = "baseline_mp_pipe"
BASE_STREAMS = "baseline_asyncio_streams"
HTTP_CHANNEL = "http_channel"
WS_CHANNEL = "ws_channel"
BASE_AIOHTTP = "baseline_aiohttp_post"
IDLE_WORKER = "idle_worker"
IDLE_PARENT = "idle_parent"

LABELS = {
    BLOCKING_SHM: "blocking call, shm",
    AWAIT_SHM: "await call, shm",
    BLOCKING_PIPE: "blocking call, pipe",
    HOP_SUB: "hop: bench→worker→sub-worker",
    HOP_SIBLING: "hop: worker→parent→worker",
    DIRECT_SIBLING: "direct: worker→worker",
    PIPELINED: "pipelined, shm (execute_many)",
    PIPELINED_AWAIT: "pipelined, await shm",
    BASE_PIPE: "multiprocessing.Pipe (baseline)",
    BASE_STREAMS: "asyncio streams (baseline)",
    HTTP_CHANNEL: "HTTPChannel, loopback",
    WS_CHANNEL: "WebSocketChannel, loopback",
    BASE_AIOHTTP: "aiohttp POST (baseline)",
    IDLE_WORKER: "idle worker (busiest)",
    IDLE_PARENT: "idle bench process",
}
BASELINE_OF = {
    BLOCKING_SHM: BASE_PIPE,
    AWAIT_SHM: BASE_STREAMS,
    BLOCKING_PIPE: BASE_PIPE,
    HOP_SUB: BASE_PIPE,
    HOP_SIBLING: BASE_PIPE,
    DIRECT_SIBLING: BASE_PIPE,
    PIPELINED: BASE_PIPE,
    PIPELINED_AWAIT: BASE_PIPE,
    HTTP_CHANNEL: BASE_AIOHTTP,
    WS_CHANNEL: HTTP_CHANNEL,
}
SHORT = {BASE_PIPE: "Pipe", BASE_STREAMS: "streams", BASE_AIOHTTP: "aiohttp", HTTP_CHANNEL: "HTTP"}
BASELINES = (BASE_PIPE, BASE_STREAMS, BASE_AIOHTTP)
LATENCY_ROWS = (
    BLOCKING_SHM,
    AWAIT_SHM,
    BLOCKING_PIPE,
    HOP_SUB,
    HOP_SIBLING,
    DIRECT_SIBLING,
    PIPELINED,
    PIPELINED_AWAIT,
    BASE_PIPE,
    BASE_STREAMS,
    HTTP_CHANNEL,
    WS_CHANNEL,
    BASE_AIOHTTP,
)
IDLE_ROWS = (IDLE_WORKER, IDLE_PARENT)

# Worker ids.
W_ADD = "bench-add"
W_PIPE = "bench-pipe"
W_HOP = "bench-hop"
W_CALLER = "bench-caller"


@dataclass
class BenchConfig:
    """How big a run is (see ``cmd-ipc bench --help``)."""

    calls: int = 20_000
    pipelined_calls: int | None = None
    window: int = 256
    idle_seconds: float = 5.0
    pin: bool = False
    progress: bool = True
    #: Spin of native readers before parking, in µs (None: the registry's default).
    spin_us: int | None = None
    #: Timed calls of each remote row (HTTP, WebSocket, aiohttp); 0 leaves them out.
    remote_calls: int | None = None

    @property
    def n_remote(self) -> int:
        if self.remote_calls is not None:
            return self.remote_calls
        return max(200, self.calls // 10)

    @property
    def warmup(self) -> int:
        return max(100, self.calls // 10)

    @property
    def n_pipelined(self) -> int:
        return self.pipelined_calls or max(self.window * 4, self.calls * 10)


@dataclass
class Row:
    """Figures of one latency row."""

    key: str
    samples_ns: list[int]
    elapsed_s: float
    note: str = ""

    @property
    def n(self) -> int:
        return len(self.samples_ns)

    def percentile_us(self, q: float) -> float:
        s = self.samples_ns
        if not s:
            return math.nan
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] / 1000.0

    @property
    def calls_per_s(self) -> float:
        return self.n / self.elapsed_s if self.elapsed_s > 0 else math.nan

    def figures(self) -> dict[str, Any]:
        s = self.samples_ns
        return {
            "label": LABELS[self.key],
            "n": self.n,
            "p50_us": self.percentile_us(0.50),
            "p90_us": self.percentile_us(0.90),
            "p99_us": self.percentile_us(0.99),
            "p999_us": self.percentile_us(0.999),
            "min_us": s[0] / 1000.0 if s else math.nan,
            "max_us": s[-1] / 1000.0 if s else math.nan,
            "mean_us": sum(s) / len(s) / 1000.0 if s else math.nan,
            "calls_per_s": self.calls_per_s,
            "baseline": BASELINE_OF.get(self.key),
            "note": self.note,
        }


@dataclass
class Results:
    """Everything one run measured."""

    config: BenchConfig
    rows: dict[str, Row] = field(default_factory=dict)
    idle: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    started: str = ""
    duration_s: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)

    def p50(self, key: str) -> float | None:
        row = self.rows.get(key)
        return None if row is None else row.percentile_us(0.5)

    def ratio(self, key: str) -> float | None:
        """Time per call relative to the row's baseline (lower is better)."""
        base_key = BASELINE_OF.get(key)
        row, base = self.rows.get(key), self.rows.get(base_key or "")
        if row is None or base is None:
            return None
        if key in (PIPELINED, PIPELINED_AWAIT, HTTP_CHANNEL):
            return base.calls_per_s / row.calls_per_s
        return row.percentile_us(0.5) / base.percentile_us(0.5)

    def targets(self) -> list[dict[str, Any]]:
        """The project's targets, each with the measured value and whether it is met."""
        out: list[dict[str, Any]] = []

        def add(
            rows: tuple[str, ...],
            text: str,
            value: float | None,
            limit: float,
            unit: str,
            detail: str = "",
            higher_is_better: bool = False,
        ) -> None:
            met = None
            if value is not None and not math.isnan(value):
                met = value >= limit if higher_is_better else value <= limit
            out.append(
                {
                    "rows": list(rows),
                    "target": text,
                    "value": value,
                    "limit": limit,
                    "unit": unit,
                    "met": met,
                    "detail": detail,
                }
            )

        shm, pipe = self.rows.get(BLOCKING_SHM), self.rows.get(BASE_PIPE)
        add(
            (BLOCKING_SHM,),
            "blocking shm p50 <= 0.12x multiprocessing.Pipe p50",
            self.ratio(BLOCKING_SHM),
            0.12,
            "x",
            _detail(shm, pipe),
        )
        add(
            (BLOCKING_SHM,),
            "blocking shm p99 <= 10 µs",
            None if shm is None else shm.percentile_us(0.99),
            10.0,
            "µs",
        )
        aw, st = self.rows.get(AWAIT_SHM), self.rows.get(BASE_STREAMS)
        add(
            (AWAIT_SHM,),
            "await shm p50 <= 0.5x asyncio-streams p50",
            self.ratio(AWAIT_SHM),
            0.5,
            "x",
            _detail(aw, st),
        )
        pl = self.rows.get(PIPELINED)
        add(
            (PIPELINED,),
            "pipelined shm >= 500000 calls/s",
            None if pl is None else pl.calls_per_s,
            500_000.0,
            "calls/s",
            higher_is_better=True,
        )
        for key, ref in ((HOP_SUB, BLOCKING_SHM), (HOP_SIBLING, DIRECT_SIBLING)):
            a, b = self.p50(key), self.p50(ref)
            extra = None if a is None or b is None else a - b
            add(
                (key,),
                f"{LABELS[key]}: extra hop <= +1 µs p50 (vs {LABELS[ref]})",
                extra,
                1.0,
                "µs",
                "" if extra is None else f"{a:.2f} - {b:.2f} µs",
            )
        http, bare = self.rows.get(HTTP_CHANNEL), self.rows.get(BASE_AIOHTTP)
        add(
            (HTTP_CHANNEL,),
            "HTTPChannel sequential calls/s >= 0.8x a bare aiohttp POST",
            None if http is None or bare is None else http.calls_per_s / bare.calls_per_s,
            0.8,
            "x",
            ""
            if http is None or bare is None
            else f"{http.calls_per_s:,.0f} / {bare.calls_per_s:,.0f} calls/s",
            higher_is_better=True,
        )
        ws = self.rows.get(WS_CHANNEL)
        add(
            (WS_CHANNEL,),
            "WebSocketChannel p50 <= 0.5x HTTPChannel p50",
            self.ratio(WS_CHANNEL),
            0.5,
            "x",
            _detail(ws, http),
        )
        for key in IDLE_ROWS:
            idle = self.idle.get(key)
            add(
                (key,),
                f"{LABELS[key]} < 1% of one CPU",
                None if idle is None else idle["cpu_percent"],
                1.0,
                "%",
                "" if idle is None else str(idle.get("process", "")),
            )
            out[-1]["met"] = None if idle is None else idle["cpu_percent"] < 1.0
        return out

    def to_json(self) -> dict[str, Any]:
        rows: dict[str, Any] = {}
        for key in LATENCY_ROWS:
            row = self.rows.get(key)
            if row is not None:
                rows[key] = {**row.figures(), "ratio": self.ratio(key)}
        return {
            "tool": "cmd-ipc bench",
            "date": self.started,
            "duration_s": round(self.duration_s, 3),
            "machine": self.machine or machine_info(),
            "config": {
                "calls": self.config.calls,
                "warmup": self.config.warmup,
                "pipelined_calls": self.config.n_pipelined,
                "window": self.config.window,
                "idle_seconds": self.config.idle_seconds,
                "pin": self.config.pin,
                "spin_us": self.config.spin_us,
                "remote_calls": self.config.n_remote,
                "payload": REQ,
            },
            "rows": rows,
            "idle": {k: {**v, "label": LABELS[k]} for k, v in self.idle.items()},
            "targets": self.targets(),
            "errors": self.errors,
        }


def _detail(row: Row | None, base: Row | None) -> str:
    if row is None or base is None:
        return ""
    return f"{row.percentile_us(0.5):.2f} vs {base.percentile_us(0.5):.2f} µs"


def machine_info() -> dict[str, Any]:
    """CPU count, CPU model, OS and Python of this machine."""
    model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from cmd_ipc import __version__

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "cmd_ipc": __version__,
    }


# ---------------------------------------------------------------------------- progress


class _Progress:
    """A progress bar on stderr: rich's when rich is installed, else a small one."""

    def __init__(self, total: float, enabled: bool, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0.0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.label = ""
        self._rich: Any = None
        self._task: Any = None
        self._last_label = ""
        if enabled and self.tty:
            with contextlib.suppress(ImportError):
                from rich.console import Console  # type: ignore[import-not-found,unused-ignore]
                from rich.progress import (  # type: ignore[import-not-found,unused-ignore]
                    BarColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                self._rich = Progress(
                    TextColumn("{task.description:<34}"),
                    BarColumn(),
                    TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(),
                    console=Console(file=self.stream),
                    transient=True,
                )
                self._rich.start()
                self._task = self._rich.add_task("starting", total=total)

    def set(self, label: str) -> None:
        self.label = label
        self._draw()

    def advance(self, amount: float) -> None:
        self.done = min(self.total, self.done + amount)
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done, description=self.label)
            return
        frac = self.done / self.total if self.total else 1.0
        width = 30
        filled = int(frac * width)
        bar = "#" * filled + "-" * (width - filled)
        line = f"[{bar}] {frac * 100:3.0f}%  {self.label}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self.stream.flush()
        elif self.label != self._last_label:
            # Not a terminal (a log or a test): one line per step.
            self.stream.write(line + "\n")
            self.stream.flush()
        self._last_label = self.label

    def close(self) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.stop()
        elif self.tty:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


# ---------------------------------------------------------------------------- measuring


def _chunks(n: int, k: int) -> Iterator[int]:
    k = max(1, min(k, n))
    for i in range(k):
        yield n // k + (1 if i < n % k else 0)


CHUNKS = 10
#: Seconds one call may take before the row is reported failed (a stall, not a slow call).
CALL_TIMEOUT = 10.0


def reap(proc: subprocess.Popen[Any], timeout: float) -> None:
    """Waits for a child to end by itself, then kills it."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _samples(n: int) -> array.array[int]:
    """Storage for ``n`` timings, allocated and touched before the timed loop: storing
    the timings in a list would keep one new int object per call, and the memory pages
    those take are first touched (a page fault) in the middle of the timed calls."""
    return array.array("q", bytes(8 * n))


def _time_blocking(call: Callable[[], Any], n: int, warmup: int) -> tuple[list[int], float]:
    """Times ``n`` calls of ``call`` (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        call()
    clock = time.perf_counter_ns
    out = _samples(n)
    t_start = clock()
    for i in range(n):
        t0 = clock()
        call()
        out[i] = clock() - t0
    return out.tolist(), (clock() - t_start) / 1e9


async def _time_async(
    call: Callable[[], Awaitable[Any]], n: int, warmup: int
) -> tuple[list[int], float]:
    for _ in range(warmup):
        await call()
    clock = time.perf_counter_ns
    out = _samples(n)
    t_start = clock()
    for i in range(n):
        t0 = clock()
        await call()
        out[i] = clock() - t0
    return out.tolist(), (clock() - t_start) / 1e9


class _Bench:
    def __init__(self, config: BenchConfig, results: Results, progress: _Progress) -> None:
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

    def on_loop(self, make: Callable[[], Awaitable[Any]], timeout: float | None = None) -> Any:
        """Runs a coroutine on the registry's event loop (its background thread) and waits."""
        return self.reg._blocking(make, timeout)

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
        chunks = list(_chunks(n, CHUNKS))
        try:
            for count in chunks:
                s, e = run_chunk(count, warmup)
                warmup = 0
                samples.extend(s)
                elapsed += e
                self.progress.advance(weight / len(chunks))
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

        self.measure_chunked(key, weight, lambda n, w: _time_blocking(one, n, w))

    def awaited(self, weight: float) -> None:
        ex = self.reg.execute_command

        def one() -> Awaitable[Any]:
            return ex("calc.add", REQ)

        self.measure_chunked(
            AWAIT_SHM, weight, lambda n, w: self.on_loop(lambda: _time_async(one, n, w))
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
        deadline = time.monotonic() + 10
        route = None
        while time.monotonic() < deadline:
            route = self.control("bench.route_of", {"command_id": "calc.add"})
            if route == W_ADD:
                break
            time.sleep(0.01)
        return str(route)

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
            for count in _chunks(n, max(1, n // batch)):
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
                await asyncio.gather(*(lane(c, []) for c in _chunks(warmup, window)))
            outs: list[list[int]] = [[] for _ in range(window)]
            counts = list(_chunks(n, window))
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
            env=_child_env(),
        )
        child.close()
        try:
            send, recv = parent.send, parent.recv

            def one() -> Any:
                send(REQ)
                return recv()

            self.measure_chunked(BASE_PIPE, weight, lambda n, w: _time_blocking(one, n, w))
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
        try:
            lsock.bind(path)
            lsock.listen(1)
            code = f"import {TARGETS_MODULE} as t; t.streams_child()"
            cpu = -1 if self.child_cpu is None else self.child_cpu
            proc = subprocess.Popen(
                [sys.executable, "-c", code, str(lsock.fileno()), str(cpu)],
                pass_fds=[lsock.fileno()],
                env=_child_env(),
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
                BASE_STREAMS, weight, lambda n, w: self.on_loop(lambda: _time_async(one, n, w))
            )

            async def close() -> None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

            self.on_loop(close, 10)
        finally:
            lsock.close()
            if proc is not None:
                reap(proc, 5)
            with contextlib.suppress(OSError):
                os.unlink(path)
            with contextlib.suppress(OSError):
                os.rmdir(tmp)

    # -- idle

    def idle(self) -> None:
        window = self.cfg.idle_seconds
        time.sleep(0.2)  # let every reader finish its spin and park
        pids = dict(self.worker_pids)
        before = {wid: _cpu_ns(pid) for wid, pid in pids.items()}
        self_before = time.process_time_ns()
        t0 = time.monotonic()
        time.sleep(window)
        wall = time.monotonic() - t0
        self_after = time.process_time_ns()
        after = {wid: _cpu_ns(pid) for wid, pid in pids.items()}
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
                        "installed (pip install 'cmd-ipc[remote]')",
                        file=sys.stderr,
                    )
                else:
                    self.step(HTTP_CHANNEL, 1.0, self.remote)
            self.progress.set(f"idle cost ({cfg.idle_seconds:g} s)")
            self.step(IDLE_WORKER, 1.0, self.idle)
            self.progress.set("stopping workers")
            # Stop in reverse order of start: callers before what they call.
            for wid in reversed(list(reg.workers)):
                with contextlib.suppress(Exception):
                    self.stop(wid)
        self.registry = None

    def remote(self) -> None:
        """HTTPChannel, WebSocketChannel and a bare aiohttp POST against one server child."""
        from cmd_ipc import _bench_remote

        n, warmup = self.cfg.n_remote, max(50, self.cfg.n_remote // 10)
        self.progress.set(f"remote rows ({n} calls each)")
        proc, urls = _bench_remote.start_server(self.child_cpu)
        try:
            timed = self.on_loop(lambda: _bench_remote.measure(urls, n, warmup), timeout=600)
        finally:
            _bench_remote.stop_server(proc)
        for key, name in ((BASE_AIOHTTP, "bare"), (HTTP_CHANNEL, "http"), (WS_CHANNEL, "ws")):
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


def _cpu_ns(pid: int) -> int | None:
    """CPU time used so far by every thread of ``pid``, in nanoseconds (from schedstat)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    found = False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
                found = True
        except (OSError, ValueError, IndexError):
            continue
    if found:
        return total
    try:  # no schedstat: clock ticks from /proc/<pid>/stat
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [pkg_root, *(p for p in sys.path if p), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return env


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
    progress = _Progress(total, config.progress, progress_stream)
    try:
        _Bench(config, results, progress).run()
    finally:
        progress.close()
    results.duration_s = time.monotonic() - t0
    return results


def machine_noise(seconds: float = 0.5, threshold_us: float = 5.0) -> dict[str, Any]:
    """How often the machine itself stops this process: a tight loop reading the clock (in
    Rust, so that no interpreter work is counted), on each of (at most) two of the CPUs this
    process may use, counts the gaps longer than ``threshold_us`` (interrupts, the hypervisor
    taking the CPU...). Any such gap that falls inside a call lengthens it by as much,
    whatever the library does: the figure says how far a p99 target is in reach on this
    machine, now."""
    from cmd_ipc import _core

    original = os.sched_getaffinity(0)
    out: dict[str, Any] = {"threshold_us": threshold_us, "seconds_per_cpu": seconds, "cpus": {}}
    try:
        for cpu in sorted(original)[:2]:
            os.sched_setaffinity(0, {cpu})
            gaps, longest = _core.clock_gaps(seconds, threshold_us)
            out["cpus"][str(cpu)] = {"gaps_per_s": gaps / seconds, "longest_us": longest}
    finally:
        os.sched_setaffinity(0, original)
    return out


# ---------------------------------------------------------------------------- output


def _fmt_us(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:,.1f}" if v >= 100 else f"{v:.2f}"


def _fmt_rate(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:,.0f}"


def _status(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "NOT met")


def table_rows(results: Results) -> tuple[list[str], list[list[str]]]:
    """The table as text cells: (header, rows)."""
    header = ["row", "p50 µs", "p99 µs", "mean µs", "calls/s", "vs baseline", "target"]
    targets = results.targets()
    by_row: dict[str, list[bool | None]] = {}
    for t in targets:
        for key in t["rows"]:
            by_row.setdefault(key, []).append(t["met"])
    rows: list[list[str]] = []
    for key in LATENCY_ROWS:
        row = results.rows.get(key)
        status = ""
        if key in by_row:
            mets = by_row[key]
            status = " / ".join(_status(m) for m in mets)
        if row is None:
            why = "failed (below)" if key in results.errors else "not measured"
            rows.append([LABELS[key], "-", "-", "-", "-", why, status])
            continue
        ratio = results.ratio(key)
        base = BASELINE_OF.get(key)
        vs = "" if ratio is None or base is None else f"{ratio:.2f}x {SHORT[base]}"
        if key in BASELINES:
            vs = "(baseline)"
        f = row.figures()
        rows.append(
            [
                LABELS[key],
                _fmt_us(f["p50_us"]),
                _fmt_us(f["p99_us"]),
                _fmt_us(f["mean_us"]),
                _fmt_rate(f["calls_per_s"]),
                vs,
                status,
            ]
        )
    for key in IDLE_ROWS:
        idle = results.idle.get(key)
        status = _status(None if idle is None else idle["cpu_percent"] < 1.0)
        if idle is None:
            why = "failed (below)" if key in results.errors else "not measured"
            rows.append([LABELS[key], "-", "-", "-", "-", why, status])
            continue
        cpu = f"{idle['cpu_percent']:.3f}% CPU"
        rows.append([LABELS[key], "", "", "", "", cpu, status])
    return header, rows


class _Plain:
    """Writes to a stream whose encoding may lack "µ" or "→" (replaced then)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        try:
            "µ→".encode(out.encoding or "utf-8")
            self.ok = True
        except (UnicodeEncodeError, LookupError):
            self.ok = False

    def write(self, text: str) -> int:
        if not self.ok:
            text = text.replace("µ", "u").replace("→", "->")
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()

    @property
    def encoding(self) -> str:
        return self.out.encoding or "utf-8"


def render(results: Results, out: TextIO | None = None) -> None:
    """Prints the table and the targets."""
    out = _Plain(out or sys.stdout)  # type: ignore[assignment]
    assert out is not None
    header, rows = table_rows(results)
    cfg = results.config
    title = (
        f"cmd-ipc bench: add(a, b) round trip, {cfg.calls} calls per row"
        f"{', pinned (bench CPU 0, children CPU 1)' if cfg.pin else ', not pinned'}"
        f"{'' if cfg.spin_us is None else f', readers spin {cfg.spin_us} µs'}"
    )
    targets = results.targets()
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=None if out.isatty() else 130)
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i in (0, 5, 6) else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    print("", file=out)
    print("targets (issues 3 and 4):", file=out)
    for t in targets:
        value = t["value"]
        if value is None:
            shown = "not measured"
        elif t["unit"] == "x":
            shown = f"{value:.3f}x"
        elif t["unit"] == "calls/s":
            shown = f"{value:,.0f} calls/s"
        elif t["unit"] == "%":
            shown = f"{value:.3f}%"
        else:
            shown = f"{value:+.2f} µs" if "extra" in t["target"] else f"{value:.2f} µs"
        detail = f" ({t['detail']})" if t["detail"] else ""
        print(f"  [{_status(t['met']):>7}] {t['target']}: {shown}{detail}", file=out)
    noise = results.machine.get("noise")
    if noise and noise.get("cpus"):
        per_cpu = ", ".join(
            f"CPU {cpu}: {v['gaps_per_s']:,.0f}/s (longest {v['longest_us']:,.0f} µs)"
            for cpu, v in noise["cpus"].items()
        )
        print(
            f"\n  machine noise (pauses > {noise['threshold_us']:g} µs of a bare loop, "
            f"{noise['seconds_per_cpu']:g} s per CPU): {per_cpu}",
            file=out,
        )
    notes = [
        f"{LABELS[k]}: {results.rows[k].note}"
        for k in LATENCY_ROWS
        if k in results.rows and results.rows[k].note
    ]
    if notes:
        print("", file=out)
        for n in notes:
            print(f"  note: {n}", file=out)
    if results.errors:
        print("", file=out)
        for key, err in results.errors.items():
            print(f"  error in {LABELS.get(key, key)}: {err}", file=out)
    m = results.machine or machine_info()
    print(
        f"\n{m['cpu_count']} CPUs ({m['cpu_model']}), Python {m['python']}, "
        f"{results.started}, {results.duration_s:.1f} s",
        file=out,
    )


# ---------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cmd-ipc bench``."""
    parser.add_argument(
        "--calls",
        type=int,
        default=None,
        metavar="N",
        help="timed calls per latency row (default 20000; 2000 with --quick)",
    )
    parser.add_argument(
        "--pipelined-calls",
        type=int,
        default=None,
        metavar="N",
        help="calls of each pipelined row (default 10 x --calls)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=256,
        metavar="N",
        help="calls in flight in the pipelined rows (default 256)",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=None,
        metavar="S",
        help="window of the idle-cost measurement (default 5; 1 with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short run (--calls 2000, --idle-seconds 1)"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the bench process to CPU 0 and its children to CPU 1",
    )
    parser.add_argument(
        "--spin-us",
        type=int,
        default=None,
        metavar="US",
        help="how long native readers spin before parking, in µs, in this process and the "
        "workers (default: the registry's, 50)",
    )
    parser.add_argument(
        "--remote-calls",
        type=int,
        default=None,
        metavar="N",
        help="timed calls of each remote row: HTTPChannel, WebSocketChannel, bare aiohttp "
        "(default --calls / 10, at least 200; 0 leaves them out)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    calls = args.calls if args.calls is not None else (2000 if args.quick else 20_000)
    idle = args.idle_seconds
    if idle is None:
        idle = 1.0 if args.quick else 5.0
    if calls < 1:
        raise SystemExit("--calls must be at least 1")
    if idle <= 0:
        raise SystemExit("--idle-seconds must be positive")
    if args.window < 1:
        raise SystemExit("--window must be at least 1")
    if args.remote_calls is not None and args.remote_calls < 0:
        raise SystemExit("--remote-calls must not be negative")
    if args.spin_us is not None and args.spin_us < 0:
        raise SystemExit("--spin-us must not be negative")
    return BenchConfig(
        calls=calls,
        pipelined_calls=args.pipelined_calls,
        window=args.window,
        idle_seconds=idle,
        pin=args.pin,
        progress=not args.no_progress,
        spin_us=args.spin_us,
        remote_calls=args.remote_calls,
    )


def main(args: argparse.Namespace) -> int:
    """Runs ``cmd-ipc bench`` with parsed arguments; returns the exit status (1 when a row
    could not be measured; unmet targets are reported, not an error)."""
    config = config_from_args(args)
    if config.pin and (not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2):
        print("--pin needs two usable CPUs; running unpinned", file=sys.stderr)
        config.pin = False
    results = run(config)
    render(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                results.to_json(),
                f,
                indent=2,
                ensure_ascii=False,
                allow_nan=False,
                default=_json_default,
            )
            f.write("\n")
    return 1 if results.errors else 0


def _json_default(o: object) -> object:
    raise TypeError(f"not JSON serialisable: {o!r}")
