"""What ``cmd-ipc bench`` measures: the rows, their baselines and targets, and the results."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LABELS", "BenchConfig", "Results", "Row", "machine_info"]

#: The request of every timed call: ``add(a, b)``.
REQ = {"a": 1, "b": 2}

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
GRPC_CHANNEL = "grpc_channel"
BASE_AIOHTTP = "baseline_aiohttp_post"
NATS_CHANNEL = "nats_channel"
BASE_NATS = "baseline_nats_request"
POOL_ONE = "pool_one_member"
POOL_TWO = "pool_two_members"
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
    PIPELINED_AWAIT: "pipelined, await shm, under load",
    BASE_PIPE: "multiprocessing.Pipe (baseline)",
    BASE_STREAMS: "asyncio streams (baseline)",
    HTTP_CHANNEL: "HTTPChannel, loopback",
    WS_CHANNEL: "WebSocketChannel, loopback",
    GRPC_CHANNEL: "GrpcChannel, loopback",
    BASE_AIOHTTP: "aiohttp POST (baseline)",
    NATS_CHANNEL: "NatsChannel, loopback",
    BASE_NATS: "nats-py request (baseline)",
    POOL_TWO: "pool of 2, 1 ms CPU-bound calls",
    POOL_ONE: "pool of 1, 1 ms CPU-bound (baseline)",
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
    GRPC_CHANNEL: HTTP_CHANNEL,
    NATS_CHANNEL: BASE_NATS,
    POOL_TWO: POOL_ONE,
}
SHORT = {BASE_PIPE: "Pipe", BASE_STREAMS: "streams", BASE_AIOHTTP: "aiohttp", HTTP_CHANNEL: "HTTP"}
SHORT[BASE_NATS] = "nats-py"
SHORT[POOL_ONE] = "pool of 1"
BASELINES = (BASE_PIPE, BASE_STREAMS, BASE_AIOHTTP, BASE_NATS, POOL_ONE)
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
    GRPC_CHANNEL,
    BASE_AIOHTTP,
    NATS_CHANNEL,
    BASE_NATS,
    POOL_TWO,
    POOL_ONE,
)
IDLE_ROWS = (IDLE_WORKER, IDLE_PARENT)


#: Timed calls per latency row of a full run (the default of ``--calls``).
FULL_CALLS = 20_000


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
    #: A ``--quick`` run.
    quick: bool = False

    @property
    def judged(self) -> bool:
        """Whether this run's figures judge the targets: a pinned full run (``--pin``,
        not ``--quick``, at least the default :data:`FULL_CALLS` calls a row)."""
        return self.pin and not self.quick and self.calls >= FULL_CALLS

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
        if key in (PIPELINED, PIPELINED_AWAIT, HTTP_CHANNEL, NATS_CHANNEL, POOL_TWO):
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

        def throughput(key: str, base_key: str, text: str, limit: float) -> None:
            """A target on ``key``'s calls/s over ``base_key``'s (higher is better)."""
            row, base = self.rows.get(key), self.rows.get(base_key)
            add(
                (key,),
                text,
                row.calls_per_s / base.calls_per_s if row and base else None,
                limit,
                "x",
                f"{row.calls_per_s:,.0f} / {base.calls_per_s:,.0f} calls/s" if row and base else "",
                higher_is_better=True,
            )

        throughput(
            HTTP_CHANNEL,
            BASE_AIOHTTP,
            "HTTPChannel sequential calls/s >= 0.8x a bare aiohttp POST",
            0.8,
        )
        add(
            (WS_CHANNEL,),
            "WebSocketChannel p50 <= 0.5x HTTPChannel p50",
            self.ratio(WS_CHANNEL),
            0.5,
            "x",
            _detail(self.rows.get(WS_CHANNEL), self.rows.get(HTTP_CHANNEL)),
        )
        throughput(
            NATS_CHANNEL,
            BASE_NATS,
            "NatsChannel sequential calls/s >= 0.9x a bare nats-py request",
            0.9,
        )
        throughput(
            POOL_TWO,
            POOL_ONE,
            "pool of 2 calls/s >= 1.8x a pool of 1 (CPU-bound handler, 2 CPUs)",
            1.8,
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
            "judged": self.config.judged,
            "config": {
                "calls": self.config.calls,
                "quick": self.config.quick,
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
    from cmd_ipc._core import __version__

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "cmd_ipc": __version__,
    }
