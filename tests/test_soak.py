"""Soak: random kills, restarts, stalls and floods against a tree of real workers while
callers keep calling (``make soak``; not in the default run).

The tree: a pool of two members (``soak.double``), and a worker with a sub-worker two hops
down (``soak.echo``), all with unlimited restarts. Three async callers and one blocking
caller call without pause; a chaos task kills (SIGKILL) a random process of the tree, stops
one (SIGSTOP, then SIGCONT), floods 1 KB events or fires a batch, in random order. At the
end: no call was lost (each one returned its right result or raised a typed
:class:`~cmd_ipc.CmdIpcError` within its timeout plus a small slack), every command works
again, and after close no descriptor or memfd is left and RSS grew less than a bound.
``SOAK_SECONDS`` (default 300) sets the length; the figures are printed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import random
import signal
import threading
import time
from typing import Any

import pytest
from cmd_ipc import CmdIpcError, CommandRegistry, RestartPolicy

pytestmark = pytest.mark.soak

SECONDS = float(os.environ.get("SOAK_SECONDS", "300"))
CALL_TIMEOUT = 3.0
#: A call must end (result or typed error) within its timeout plus this.
SLACK = 1.5
RSS_BOUND_MB = 150


def _fd_table() -> dict[str, str]:
    """This process's open descriptors: what each one is."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return out


def _fds() -> tuple[int, int]:
    """(open descriptors, of which memfds) of this process."""
    table = _fd_table()
    return len(table), sum(t.startswith("/memfd:") for t in table.values())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.lost: list[str] = []
        self.slowest = 0.0
        self.lock = threading.Lock()

    def outcome(self, what: str, elapsed: float, err: BaseException | None, right: bool) -> None:
        with self.lock:
            self.slowest = max(self.slowest, elapsed)
            if elapsed > CALL_TIMEOUT + SLACK:
                self.lost.append(f"{what} took {elapsed:.2f}s ({err!r})")
            if err is None:
                if right:
                    self.ok += 1
                else:
                    self.lost.append(f"{what}: wrong result")
            elif isinstance(err, CmdIpcError):
                self.errors[getattr(err, "code", type(err).__name__)] += 1
            else:
                self.lost.append(f"{what}: untyped {err!r}")


async def _run() -> tuple[Tally, collections.Counter[str], tuple[list[int], int], float]:
    """The soak itself: (tally, chaos done, restarts, RSS at the end in MB). Everything
    that holds the registry ends with this call."""
    tally = Tally()
    chaos: collections.Counter[str] = collections.Counter()
    policy = RestartPolicy(max_restarts=None, backoff=0.05, max_backoff=0.5)
    seed = int(os.environ.get("SOAK_SEED", "1"))
    # The chaos is reproducible by its seed; the callers draw from their own generators.
    rng = random.Random(seed)
    registry = CommandRegistry("soak", request_ttl=CALL_TIMEOUT)
    async with registry:
        pool = await registry.spawn_pool("members", "soak_targets:member", size=2, restart=policy)
        middle = await registry.spawn_worker("middle", "soak_targets:middle", restart=policy)
        stop = asyncio.Event()
        deadline = time.monotonic() + SECONDS

        async def caller(k: int) -> None:
            pick = random.Random(seed * 100 + k)
            n = 0
            while not stop.is_set():
                n += 1
                command, request, want = pick.choice(
                    [
                        ("soak.double", {"n": n}, 2 * n),
                        ("soak.echo", {"x": [k, n]}, [k, n]),
                    ]
                )
                start = time.monotonic()
                err: BaseException | None = None
                got: Any = None
                try:
                    got = await registry.execute_command(command, request, timeout=CALL_TIMEOUT)
                except Exception as e:
                    err = e
                tally.outcome(command, time.monotonic() - start, err, got == want)
                if err is not None:
                    await asyncio.sleep(0.01)  # a restart is under way: do not spin on it

        def blocking_caller() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                start = time.monotonic()
                err: BaseException | None = None
                got: Any = None
                try:
                    got = registry.execute_command_sync(
                        "soak.double", {"n": n}, timeout=CALL_TIMEOUT
                    )
                except Exception as e:
                    err = e
                tally.outcome("sync soak.double", time.monotonic() - start, err, got == 2 * n)
                if err is not None:
                    time.sleep(0.01)

        def tree_pids() -> list[int]:
            pids = [w.pid for w in pool.workers if w.pid is not None]
            if middle.pid is not None:
                pids += [middle.pid, *_children(middle.pid)]
            return pids

        async def chaos_monkey() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(rng.uniform(0.1, 0.6))
                action = rng.choice(["kill", "stall", "flood", "batch"])
                pids = tree_pids()
                if action == "kill" and pids:
                    pid = rng.choice(pids)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        chaos["kill"] += 1
                    except ProcessLookupError:
                        pass
                elif action == "stall" and pids:
                    pid = rng.choice(pids)
                    try:
                        os.kill(pid, signal.SIGSTOP)
                        # Some stalls outlast the calls' timeout (they must end typed).
                        await asyncio.sleep(rng.choice([rng.uniform(0.2, 1.5), 4.0]))
                        os.kill(pid, signal.SIGCONT)
                        chaos["stall"] += 1
                    except ProcessLookupError:
                        pass
                elif action == "flood":
                    for _ in range(300):
                        registry.emit_event("soak.flood", {"pad": "x" * 1000})
                    chaos["flood"] += 1
                else:
                    results = await registry.execute_many(
                        "soak.double",
                        [{"n": i} for i in range(500)],
                        timeout=CALL_TIMEOUT,
                        return_exceptions=True,
                    )
                    for i, r in enumerate(results):
                        if isinstance(r, BaseException):
                            tally.outcome("batch", 0.0, r, False)
                        else:
                            tally.outcome("batch", 0.0, None, r == 2 * i)
                    chaos["batch"] += 1

        thread = threading.Thread(target=blocking_caller)
        thread.start()
        callers = [asyncio.ensure_future(caller(k)) for k in range(3)]
        try:
            await chaos_monkey()
        finally:
            stop.set()
            await asyncio.gather(*callers, return_exceptions=True)
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
            for pid in tree_pids():  # nothing may stay stopped
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        # Every command works again once the restarts are done.
        for command, request, want in [("soak.double", {"n": 21}, 42), ("soak.echo", {"x": 1}, 1)]:
            end = time.monotonic() + 30
            while True:
                try:
                    assert await registry.execute_command(command, request, timeout=5) == want
                    break
                except CmdIpcError:
                    assert time.monotonic() < end, f"{command} never came back"
                    await asyncio.sleep(0.05)
        rss1 = _rss_mb()
        restarts = ([w.restarts for w in pool.workers], middle.restarts)
    return tally, chaos, restarts, rss1


async def test_soak() -> None:
    fds0, memfds0 = _fds()
    table0 = _fd_table()
    rss0 = _rss_mb()
    tally, chaos, restarts, rss1 = await _run()
    # The registry's own descriptors (its node's eventfd) go with the object; a thread that
    # made blocking calls keeps its own eventfd while it lives (execute_many's executor).
    gc.collect()
    await asyncio.get_running_loop().shutdown_default_executor()
    fds1, memfds1 = _fds()
    print(
        f"\nsoak: {SECONDS:.0f}s, calls ok {tally.ok}, typed errors {dict(tally.errors)}, "
        f"lost {len(tally.lost)}, slowest call {tally.slowest:.2f}s (timeout {CALL_TIMEOUT}s), "
        f"chaos {dict(chaos)}, restarts pool {restarts[0]} middle {restarts[1]}, "
        f"RSS {rss0:.0f} -> {rss1:.0f} MB, "
        f"fds {fds0} -> {fds1}, memfds {memfds0} -> {memfds1}"
    )
    assert not tally.lost, tally.lost[:20]
    assert tally.ok > 0
    assert rss1 - rss0 < RSS_BOUND_MB, f"RSS grew {rss1 - rss0:.0f} MB"
    assert memfds1 <= memfds0, "memfds left after close"
    left = {k: v for k, v in _fd_table().items() if table0.get(k) != v}
    assert fds1 <= fds0, f"descriptors left after close: {fds0} -> {fds1}: {left}"
