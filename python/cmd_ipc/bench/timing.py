"""Timing helpers of ``cmd-ipc bench``: timed loops, CPU time of a process, machine noise."""

from __future__ import annotations

import array
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

__all__ = ["chunks", "cpu_ns", "machine_noise", "samples", "time_async", "time_blocking"]


def chunks(n: int, k: int) -> Iterator[int]:
    """``n`` split into ``k`` near-equal parts (fewer when ``n < k``)."""
    k = max(1, min(k, n))
    for i in range(k):
        yield n // k + (1 if i < n % k else 0)


def samples(n: int) -> array.array[int]:
    """Storage for ``n`` timings, allocated and touched before the timed loop: storing
    the timings in a list would keep one new int object per call, and the memory pages
    those take are first touched (a page fault) in the middle of the timed calls."""
    return array.array("q", bytes(8 * n))


def time_blocking(call: Callable[[], Any], n: int, warmup: int) -> tuple[list[int], float]:
    """Times ``n`` calls of ``call`` (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        call()
    clock = time.perf_counter_ns
    out = samples(n)
    t_start = clock()
    for i in range(n):
        t0 = clock()
        call()
        out[i] = clock() - t0
    return out.tolist(), (clock() - t_start) / 1e9


async def time_async(
    call: Callable[[], Awaitable[Any]], n: int, warmup: int
) -> tuple[list[int], float]:
    """Times ``n`` awaited calls of ``call`` (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        await call()
    clock = time.perf_counter_ns
    out = samples(n)
    t_start = clock()
    for i in range(n):
        t0 = clock()
        await call()
        out[i] = clock() - t0
    return out.tolist(), (clock() - t_start) / 1e9


def cpu_ns(pid: int) -> int | None:
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
