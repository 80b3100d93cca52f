"""The pool scaling row: a CPU-bound command served by a pool of 2 members vs 1.

The handler (:func:`spin_worker`'s ``pool.spin``) does ``ms`` milliseconds of pure-Python
work per call; the caller keeps ``2 * size`` calls in flight (``execute_many``) so every
member always has work. The ratio of the two throughputs, measured in the same run, is the
pool's scaling on this machine (ideal: the number of CPUs the members get).
"""

from __future__ import annotations

import time
from typing import Any

from cmd_ipc.registry import CommandRegistry

__all__ = ["measure_pool", "spin_worker"]


def spin_worker(registry: CommandRegistry) -> None:
    """Worker target: ``pool.spin(ms)``, busy for ``ms`` ms of Python bytecode."""

    @registry.command("pool.spin", validate=False)
    def spin(ms: float) -> int:
        end = time.perf_counter() + ms / 1000
        n = 0
        while time.perf_counter() < end:
            n += 1
        return n


def measure_pool(
    registry: CommandRegistry, size: int, calls: int, ms: float = 1.0, pool_id: str | None = None
) -> dict[str, Any]:
    """Calls/s of ``calls`` calls of ``pool.spin(ms)`` over a pool of ``size`` members,
    spawned (and stopped) here, from a blocking caller of ``registry``, in batches of
    ``50 * size`` calls (``2 * size`` in flight; each batch ends with members idle while
    its last calls finish, so batches are long). Also returns ``samples_ns``: the time per
    call of each batch, one sample per call (for percentiles), and ``elapsed_s``."""
    pool = registry.spawn_pool_sync(
        pool_id or f"bench-pool-{size}", "cmd_ipc.bench.pool:spin_worker", size=size
    )
    try:
        request = {"ms": ms}
        registry.execute_many_sync("pool.spin", [request] * (4 * size))  # warm-up
        batch = 50 * size
        samples: list[int] = []
        elapsed = 0
        done = 0
        while done < calls:
            count = min(batch, calls - done)
            t0 = time.perf_counter_ns()
            registry.execute_many_sync("pool.spin", [request] * count, window=2 * size)
            took = time.perf_counter_ns() - t0
            elapsed += took
            samples.extend([took // count] * count)
            done += count
    finally:
        registry.run_blocking(pool.stop)
    samples.sort()
    return {
        "size": size,
        "calls": calls,
        "ms": ms,
        "calls_per_s": calls / (elapsed / 1e9),
        "samples_ns": samples,
        "elapsed_s": elapsed / 1e9,
    }
