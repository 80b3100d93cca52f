"""``cmd-ipc bench``: the latency benchmark (the main job).

One run spawns the worker processes of :mod:`cmd_ipc.bench.targets` and the baseline
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
* remote, against one server child on loopback (:mod:`cmd_ipc.bench.remote`):
  ``HTTPChannel`` [a bare keep-alive aiohttp POST to the same server; its ratio is of
  calls/s], ``WebSocketChannel`` and ``GrpcChannel`` [the HTTPChannel row; the gRPC row
  only with grpcio installed];
* baselines: ``multiprocessing.Pipe`` send/recv with a child process (Pipe), and
  length-prefixed msgpack over an asyncio Unix socket to a child process (streams);

then the idle cost: CPU used by the idle workers and the idle bench process over
``--idle-seconds``. Each latency row reports p50/p99/mean (µs) and calls/s; its ratio is
``p50 / baseline p50`` (for the pipelined rows, time per call ``1 / calls/s`` over the
baseline's), lower is better. Each target of the project is printed as met or NOT met; they
are judged only by a pinned full run (``--pin``, not ``--quick``), and any other run says so
at the top of its table. The progress bar is drawn only on a terminal.

Workers are started just before the rows that use them. A call that takes longer than
``CALL_TIMEOUT`` fails its row (shown in the table) instead of hanging the run. ``--pin``
pins the bench process to CPU 0 and every child (workers, their sub-workers, baseline
children) to CPU 1.

The package: :mod:`~cmd_ipc.bench.runner` (the run), :mod:`~cmd_ipc.bench.remote` (the remote
rows and their server), :mod:`~cmd_ipc.bench.targets` (what the children run),
:mod:`~cmd_ipc.bench.results` (rows, targets, figures), :mod:`~cmd_ipc.bench.render` (progress
bar and table), :mod:`~cmd_ipc.bench.timing` and :mod:`~cmd_ipc.bench.children` (helpers);
this module is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cmd_ipc.bench.children import reap
from cmd_ipc.bench.render import render, table_rows
from cmd_ipc.bench.results import (
    AWAIT_SHM,
    BASE_AIOHTTP,
    BASE_PIPE,
    BASE_STREAMS,
    BASELINE_OF,
    BASELINES,
    BLOCKING_PIPE,
    BLOCKING_SHM,
    DIRECT_SIBLING,
    FULL_CALLS,
    GRPC_CHANNEL,
    HOP_SIBLING,
    HOP_SUB,
    HTTP_CHANNEL,
    IDLE_PARENT,
    IDLE_ROWS,
    IDLE_WORKER,
    LABELS,
    LATENCY_ROWS,
    PIPELINED,
    PIPELINED_AWAIT,
    REQ,
    SHORT,
    WS_CHANNEL,
    BenchConfig,
    Results,
    Row,
    machine_info,
)
from cmd_ipc.bench.runner import CALL_TIMEOUT, TARGETS_MODULE, run
from cmd_ipc.bench.timing import machine_noise

__all__ = [
    "AWAIT_SHM",
    "BASELINES",
    "BASELINE_OF",
    "BASE_AIOHTTP",
    "BASE_PIPE",
    "BASE_STREAMS",
    "BLOCKING_PIPE",
    "BLOCKING_SHM",
    "CALL_TIMEOUT",
    "DIRECT_SIBLING",
    "FULL_CALLS",
    "GRPC_CHANNEL",
    "HOP_SIBLING",
    "HOP_SUB",
    "HTTP_CHANNEL",
    "IDLE_PARENT",
    "IDLE_ROWS",
    "IDLE_WORKER",
    "LABELS",
    "LATENCY_ROWS",
    "PIPELINED",
    "PIPELINED_AWAIT",
    "REQ",
    "SHORT",
    "TARGETS_MODULE",
    "WS_CHANNEL",
    "BenchConfig",
    "Results",
    "Row",
    "add_arguments",
    "config_from_args",
    "machine_info",
    "machine_noise",
    "main",
    "reap",
    "render",
    "run",
    "table_rows",
]


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
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (there is none either when stderr is not a terminal)",
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    calls = args.calls if args.calls is not None else (2000 if args.quick else FULL_CALLS)
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
        quick=args.quick,
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
