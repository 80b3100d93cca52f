"""Worker processes end to end: real children joined by shared-memory and pipe channels.

Targets live in ``tests/worker_targets.py`` (importable in the children, which inherit this
process's ``sys.path``). Every wait has a deadline; nothing asserts a duration. The idle-cost
test bounds CPU *ticks* consumed over a 5 s idle window (a resource bound).
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import logging
import os
import resource
import select
import signal
import socket
import struct
import uuid
import warnings
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import Any

import pytest
import worker_targets
from cmd_ipc import (
    ChannelDisconnectedError,
    CommandError,
    CommandRegistry,
    InternalError,
    NativeChannel,
    NotFoundError,
    RestartPolicy,
    Worker,
    WorkerError,
)
from cmd_ipc.channels.native import Transport
from helpers import registries

__all__ = ["registries"]  # the fixture is imported from helpers

Make = Callable[..., CommandRegistry]

TRANSPORTS: list[Transport] = ["shm", "pipe"]


# ---------------------------------------------------------------------------- helpers


def ids(reg: CommandRegistry) -> list[str]:
    return [c["id"] for c in reg.list_commands()]


async def until(
    probe: Callable[[], Awaitable[Any]],
    accept: Callable[[Any], bool],
    timeout: float = 10.0,
    what: str = "condition",
) -> Any:
    """Awaits ``probe()`` until ``accept(value)``; fails after ``timeout`` seconds.

    Exceptions of ``probe`` count as "not yet" (a worker that is re-registering, say).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        try:
            last = await probe()
            if accept(last):
                return last
        except (CommandError, WorkerError) as e:
            last = e
        if loop.time() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s (last: {last!r})")
        await asyncio.sleep(0.01)


async def until_true(cond: Callable[[], Any], timeout: float = 10.0, what: str = "") -> None:
    async def probe() -> Any:
        return cond()

    await until(probe, bool, timeout, what or repr(cond))


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def memfd_count(pid: int | str = "self") -> int:
    """Descriptors of ``pid`` that point to a cmd-ipc shared-memory segment."""
    n = 0
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        try:
            if "memfd:cmd-ipc" in os.readlink(f"{base}/{fd}"):
                n += 1
        except OSError:
            pass
    return n


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15.
    return int(fields[11]) + int(fields[12])


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def nonce() -> str:
    return uuid.uuid4().hex


# ---------------------------------------------------------------------------- 1. seed topology

#: process id -> command namespace in the seed topology.
SEED = {
    "main": "app",
    "worker-1": "calc",
    "worker-2": "image",
    "worker-3": "data",
    "transform": "transform",
}


async def seed_topology(make: Make) -> tuple[CommandRegistry, dict[str, Worker]]:
    main = make("main")
    worker_targets._common(main, "app")  # main registers app.* itself
    w1 = await main.spawn_worker("worker-1", "worker_targets:calc")
    w2 = await main.spawn_worker("worker-2", "worker_targets:image")  # spawns `transform`
    w3 = await main.spawn_worker("worker-3", "worker_targets:data", transport="pipe")
    await main.connect_workers(w2, w3)
    return main, {"worker-1": w1, "worker-2": w2, "worker-3": w3}


async def call_from(
    main: CommandRegistry, process: str, command_id: str, request: Any = None
) -> Any:
    """Runs ``execute_command(command_id, request)`` inside ``process``."""
    if process == "main":
        return await main.execute_command(command_id, request)
    ns = SEED[process]
    return await main.execute_command(f"{ns}.call", {"command_id": command_id, "request": request})


async def test_seed_topology_end_to_end(registries: Make) -> None:
    main, workers = await seed_topology(registries)

    # Every command of the tree is known at the root, sub-worker's included.
    known = ids(main)
    for ns in SEED.values():
        for cmd in ("whoami", "call", "stats", "emit", "seen", "echo"):
            assert f"{ns}.{cmd}" in known
    assert {"calc.add", "image.resize", "data.query", "transform.upper"} <= set(known)
    assert main.route_of("transform.upper") == "worker-2"
    assert main.route_of("data.query") == "worker-3"

    # Five distinct processes.
    who = {p: await main.execute_command(f"{ns}.whoami") for p, ns in SEED.items()}
    assert {p: w["id"] for p, w in who.items()} == {p: p for p in SEED}
    assert who["main"]["pid"] == os.getpid()
    assert len({w["pid"] for w in who.values()}) == 5
    for wid, worker in workers.items():
        assert worker.alive and worker.pid == who[wid]["pid"]

    # Every command callable from every process.
    for caller in SEED:
        for target, ns in SEED.items():
            got = await call_from(main, caller, f"{ns}.whoami")
            assert got == who[target], (caller, target, got)
    assert await call_from(main, "transform", "calc.add", {"a": 2, "b": 3}) == 5
    assert await call_from(main, "worker-1", "transform.upper", {"text": "abc"}) == "ABC"
    assert await call_from(main, "worker-3", "image.resize", {"w": 8, "h": 4}) == {"w": 4, "h": 2}
    missing = await call_from(main, "transform", "nobody.has.this")
    assert missing["code"] == "not_found"

    # The direct connection is known on both sides, for sub-worker commands too.
    assert await main.execute_command("image.route_of", {"command_id": "data.query"}) == "worker-3"
    assert await main.execute_command("data.route_of", {"command_id": "image.resize"}) == "worker-2"
    assert (
        await main.execute_command("data.route_of", {"command_id": "transform.upper"}) == "worker-2"
    )
    assert await main.execute_command("transform.route_of", {"command_id": "data.query"}) == (
        "worker-2"
    )

    # transform -> worker-2 -> worker-3, directly: main forwards nothing for it.
    main_fwd = main.stats()["forwarded"]
    w2_stats = await main.execute_command("image.stats")
    w3_stats = await main.execute_command("data.stats")
    row = await call_from(main, "transform", "data.query", {"q": "direct"})
    assert row == {"q": "direct", "rows": ["DIRECT"], "by": "worker-3"}
    assert main.stats()["forwarded"] == main_fwd
    w2_after = await main.execute_command("image.stats")
    w3_after = await main.execute_command("data.stats")
    # worker-2 forwarded main's transform.call down to transform, and transform's
    # data.query across to worker-3.
    assert w2_after["forwarded"] - w2_stats["forwarded"] == 2
    # worker-3 received the request on its direct channel from worker-2.
    received = w3_after["channels"]["worker-2"]["received"]
    assert received > w3_stats["channels"]["worker-2"]["received"]

    # Events: one emitted from each process reaches every process exactly once.
    sent: list[str] = []
    for process, ns in SEED.items():
        n = f"{process}:{nonce()}"
        sent.append(n)
        if process == "main":
            main.emit_event(worker_targets.PING, n)
        else:
            await main.execute_command(
                f"{ns}.emit", {"event_id": worker_targets.PING, "payload": n}
            )

    async def seen_everywhere() -> dict[str, list[str]]:
        return {p: await main.execute_command(f"{ns}.seen") for p, ns in SEED.items()}

    await until(
        seen_everywhere,
        lambda got: all(set(sent) <= set(v) for v in got.values()),
        what="every event seen in every process",
    )
    # A fence: one more event from the far leaf, then a round trip to everyone, so that a
    # duplicate still travelling the mesh would have arrived before we count.
    fence = f"fence:{nonce()}"
    await main.execute_command(
        "transform.emit", {"event_id": worker_targets.PING, "payload": fence}
    )
    final = await until(
        seen_everywhere,
        lambda got: all(fence in v for v in got.values()),
        what="the fence event seen in every process",
    )
    for process, got in final.items():
        for n in [*sent, fence]:
            assert got.count(n) == 1, (process, n, got)
        assert len(got) == len(sent) + 1, (process, got)

    # Closing the root stops the whole tree, the sub-worker included.
    await main.close()
    pids = [w["pid"] for process, w in who.items() if process != "main"]
    await until_true(lambda: all(process_gone(pid) for pid in pids), what="every worker exited")


# ---------------------------------------------------------------------------- 2. SIGKILL mid-call


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sigkill_mid_call(registries: Make, transport: Transport) -> None:
    shm_before = shm_entries()
    main = registries("main")
    memfds_before = memfd_count()
    started = asyncio.Event()
    main.add_event_listener("calc.slow.started", lambda _: started.set())
    worker = await main.spawn_worker("worker-1", "worker_targets:calc", transport=transport)
    assert "calc.add" in ids(main)
    call = asyncio.ensure_future(main.execute_command("calc.slow"))
    await asyncio.wait_for(started.wait(), 10)
    assert not call.done()

    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(ChannelDisconnectedError):
        await asyncio.wait_for(call, 1.0)  # the issue's deadline, not a timing assertion

    assert not [c for c in ids(main) if c.startswith("calc.")]
    assert "worker-1" not in main.channels
    with pytest.raises(NotFoundError):
        await main.execute_command("calc.add", {"a": 1, "b": 2})
    assert await asyncio.wait_for(worker.wait(), 10) == -signal.SIGKILL
    assert not worker.alive
    # Nothing left behind: no /dev/shm entry, and this process holds no segment any more.
    assert shm_entries() - shm_before == set()
    assert memfd_count() == memfds_before


# ---------------------------------------------------------------- 3. close with calls in flight


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_close_channel_with_50_calls_in_flight(
    registries: Make, transport: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    main = registries("main")
    started: list[Any] = []
    all_started = asyncio.Event()

    def on_started(payload: Any) -> None:
        started.append(payload)
        if len(started) == 50:
            all_started.set()

    main.add_event_listener("calc.slow.started", on_started)
    await main.spawn_worker("worker-1", "worker_targets:calc", transport=transport)
    calls = [asyncio.ensure_future(main.execute_command("calc.slow")) for _ in range(50)]
    await asyncio.wait_for(all_started.wait(), 10)  # all 50 handlers run in the worker
    assert not any(c.done() for c in calls)

    await main.close_channel("worker-1")
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert len(results) == 50
    assert all(isinstance(r, ChannelDisconnectedError) for r in results), results
    assert not [c for c in ids(main) if c.startswith("calc.")]

    del calls, results
    gc.collect()
    await asyncio.sleep(0)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not [c for c in loop_errors if "never retrieved" in str(c.get("message"))], loop_errors


# ---------------------------------------------------------------------------- 4. restart policy


async def test_restart_policy_brings_a_killed_worker_back(registries: Make) -> None:
    main = registries("main")
    worker = await main.spawn_worker(
        "worker-1", "worker_targets:calc", restart=RestartPolicy(backoff=0.05)
    )
    assert await main.execute_command("calc.add", {"a": 1, "b": 2}) == 3
    old_pid = worker.pid
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)

    await until_true(
        lambda: worker.pid != old_pid and worker.alive, what="worker restarted with a new pid"
    )
    assert worker.restarts == 1

    async def add() -> Any:
        return await main.execute_command("calc.add", {"a": 20, "b": 22}, timeout=5)

    assert await until(add, lambda v: v == 42, what="calc.add works after the restart") == 42
    who = await main.execute_command("calc.whoami")
    assert who == {"id": "worker-1", "pid": worker.pid}
    assert main.route_of("calc.add") == "worker-1"

    # stop() disables the policy: no restart after it.
    assert await worker.stop() == 0
    assert not worker.alive and worker.restarts == 1
    assert "calc.add" not in ids(main)


# ---------------------------------------------------------------------------- 5. large payloads


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_large_payloads_and_bytes(registries: Make, transport: Transport) -> None:
    main = registries("main")
    await main.spawn_worker("worker-1", "worker_targets:calc", transport=transport, ring_size=4096)

    async def echo(value: Any) -> Any:
        return await asyncio.wait_for(main.execute_command("calc.echo", {"value": value}), 30)

    # A frame far larger than the 4 KiB ring, both ways.
    text = "x" * 100_000
    assert await echo(text) == text
    # bytes of every value, empty bytes, bytes nested in containers.
    every_byte = bytes(range(256)) * 4
    got = await echo(every_byte)
    assert type(got) is bytes and got == every_byte
    assert await echo(b"") == b""
    nested = {"a": [b"\x00\xff", {"b": b"\x80" * 1000}], "s": "\u00e9\U0001f600"}
    assert await echo(nested) == nested
    big = os.urandom(100_000)
    assert await echo(big) == big
    # 16 MiB of bytes through the 4 KiB ring (or the socket), echoed unchanged.
    huge = os.urandom(16 * 1024 * 1024)
    got = await echo(huge)
    assert type(got) is bytes and len(got) == len(huge) and got == huge
    # Concurrent large frames in both directions do not deadlock.
    values = [os.urandom(50_000) for _ in range(8)]
    results = await asyncio.wait_for(asyncio.gather(*(echo(v) for v in values)), 30)
    assert results == values
    # The channel is still fine for small calls.
    assert await main.execute_command("calc.add", {"a": 1, "b": 1}) == 2


# ---------------------------------------------------------------------------- 6. garbage on a pipe


def _frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


GARBAGE = {
    # The first 4 bytes read as a length far above the limit.
    "http-request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "all-ones": b"\xff" * 64,
    # A well-framed first frame that is not a hello.
    "not-a-hello": _frame(b"garbage!"),
    # A hello for another encoding than the one this end was configured with.
    "wrong-encoding-hello": _frame(b'{"cmd-ipc":1,"encoding":"json"}'),
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
async def test_garbage_on_a_pipe_channel(
    registries: Make, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    main = registries("main")
    await main.spawn_worker("worker-1", "worker_targets:calc", transport="pipe")
    closes: list[tuple[str, str]] = []
    main.add_close_listener(lambda cid, reason: closes.append((cid, reason)))

    ours, theirs = NativeChannel.pair("intruder", "main", transport="pipe")
    await main.register_channel(ours)
    assert "intruder" in main.channels
    sock = socket.socket(fileno=theirs.sock_fd)
    try:
        with caplog.at_level(logging.INFO, logger="cmd_ipc"):
            sock.sendall(GARBAGE[kind])
            await until_true(lambda: "intruder" not in main.channels, what="intruder dropped")
        assert [c for c, _ in closes] == ["intruder"]
        reason = closes[0][1]
        assert reason and reason != "closed locally"
        logged = [
            r
            for r in caplog.records
            if r.name == "cmd_ipc" and "intruder" in r.getMessage() and reason in r.getMessage()
        ]
        assert logged and logged[0].levelno >= logging.WARNING, caplog.records
        # Our side of the socket sees the end of the stream (after main's hello).
        sock.settimeout(5)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        assert rest.startswith(_frame(b'{"cmd-ipc":1,"encoding":"msgpack"}'))
    finally:
        sock.close()
    # The registry keeps serving its real worker.
    assert await main.execute_command("calc.add", {"a": 2, "b": 2}) == 4
    assert await main.execute_command("calc.echo", {"value": b"ok"}) == b"ok"


async def test_invalid_message_after_hello_is_dropped_and_logged(
    registries: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """Framing and msgpack are fine but the message is not a spec message: like any peer's
    bad message, it is dropped, counted and logged; the channel keeps working."""
    main = registries("main")
    await main.spawn_worker("worker-1", "worker_targets:calc", transport="pipe")
    ours, theirs = NativeChannel.pair("intruder", "main", transport="pipe")
    await main.register_channel(ours)
    sock = socket.socket(fileno=theirs.sock_fd)
    try:
        dropped = main.stats()["dropped"]
        with caplog.at_level(logging.WARNING, logger="cmd_ipc"):
            sock.sendall(
                _frame(b'{"cmd-ipc":1,"encoding":"msgpack"}')
                + _frame(b"\x93\x01\x02\x03")
                + _frame(b"\x81\xa4type\xa5event")
            )
            await until_true(lambda: main.stats()["dropped"] >= dropped + 2, what="2 drops")
        msgs = [r.getMessage() for r in caplog.records if r.name == "cmd_ipc"]
        assert sum("intruder" in m and "dropped" in m for m in msgs) >= 2, msgs
        assert "intruder" in main.channels
    finally:
        sock.close()
    assert await main.execute_command("calc.add", {"a": 2, "b": 3}) == 5
    await until_true(lambda: "intruder" not in main.channels, what="EOF closes the channel")


async def test_malformed_bytes_after_hello_disconnect_with_reason(
    registries: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """A frame that is not even msgpack means a broken peer: the channel is closed with a
    logged reason, and the registry keeps serving its other channels."""
    main = registries("main")
    await main.spawn_worker("worker-1", "worker_targets:calc", transport="pipe")
    ours, theirs = NativeChannel.pair("intruder", "main", transport="pipe")
    await main.register_channel(ours)
    sock = socket.socket(fileno=theirs.sock_fd)
    try:
        with caplog.at_level(logging.WARNING, logger="cmd_ipc"):
            sock.sendall(
                _frame(b'{"cmd-ipc":1,"encoding":"msgpack"}') + _frame(b"\xc1\xc1 not msgpack")
            )
            await until_true(lambda: "intruder" not in main.channels, what="disconnect")
        msgs = [r.getMessage() for r in caplog.records if r.name == "cmd_ipc"]
        assert any("intruder" in m and "malformed_message" in m for m in msgs), msgs
    finally:
        sock.close()
    assert await main.execute_command("calc.add", {"a": 2, "b": 3}) == 5


# ---------------------------------------------------------------------------- 7. blocking API


def _wait_child(pid: int, timeout: float) -> int:
    """Waits (with a deadline) for a forked child; returns its exit code."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"forked child did not exit within {timeout}s")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_blocking_api(transport: Transport) -> None:
    with CommandRegistry("main") as r:
        # A 4 KiB ring: the payloads below cross it in pieces, both ways, on the fast path.
        worker = r.spawn_worker_sync(
            "worker-1", "worker_targets:calc", transport=transport, ring_size=4096
        )
        assert worker.alive
        assert r.execute_command_sync("calc.add", {"a": 1, "b": 2}) == 3
        results = [r.execute_command_sync("calc.add", {"a": i, "b": i}) for i in range(200)]
        assert results == [2 * i for i in range(200)]
        for size in (200_000, 4 * 1024 * 1024):
            payload = os.urandom(size)
            assert r.execute_command_sync("calc.echo", {"value": payload}, timeout=30) == payload
        # Values that are not plain (encoded in Python, not in Rust) cross the same way.
        when = datetime.datetime(2026, 11, 26, 1, 2, 3)
        assert r.execute_command_sync("calc.echo", {"value": when}) == when.isoformat()
        assert r.execute_command_sync("calc.echo", {"value": {1, 2}}) == [1, 2]
        assert r.execute_command_sync("calc.add", MappingProxyType({"a": 2, "b": 3})) == 5
        with pytest.raises(TypeError, match="out of range"):
            r.execute_command_sync("calc.echo", {"value": 2**70})
        with pytest.raises(TypeError, match="mapping"):
            r.execute_command_sync("calc.add", [1, 2])  # type: ignore[arg-type]

        # Error codes propagate.
        with pytest.raises(NotFoundError):
            r.execute_command_sync("nobody.has.this")
        with pytest.raises(InternalError) as info:
            r.execute_command_sync("calc.fail", {"message": "boom-42"})
        assert "boom-42" in info.value.message

        # A blocking call from a handler on the registry's own loop thread is refused.
        def reenter() -> dict[str, str]:
            out: dict[str, str] = {}
            attempts: dict[str, Callable[[], object]] = {
                "execute": lambda: r.execute_command_sync("calc.add", {"a": 1, "b": 1}),
                "spawn": lambda: r.spawn_worker_sync("worker-x", "worker_targets:calc"),
            }
            for name, fn in attempts.items():
                try:
                    fn()
                    out[name] = "no error"
                except RuntimeError as e:
                    out[name] = f"RuntimeError: {e}"
            return out

        r.register_command_sync("app.reenter", reenter)
        got = r.execute_command_sync("app.reenter", timeout=10)
        assert got["execute"].startswith("RuntimeError:") and "loop" in got["execute"], got
        assert got["spawn"].startswith("RuntimeError:"), got
        assert "worker-x" not in r.workers
        # Calls from a worker reach main's local command too.
        assert r.execute_command_sync("calc.call", {"command_id": "app.reenter"})["execute"]

        # A forked child cannot use the registry: a clear RuntimeError, not a hang.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 3
            try:
                r.execute_command_sync("calc.add", {"a": 1, "b": 2})
                code = 1
            except RuntimeError as e:
                code = 0 if "fork" in str(e) else 4
            except BaseException:
                code = 2
            finally:
                os._exit(code)
        assert _wait_child(pid, 10) == 0
        # The parent's registry is unaffected.
        assert r.execute_command_sync("calc.add", {"a": 5, "b": 5}) == 10
        assert r.stop_worker_sync(worker) == 0
    assert r.closed


# ---------------------------------------------------------------------------- 8. worker errors


async def test_worker_errors_and_stop(registries: Make) -> None:
    main = registries("main")
    with pytest.raises(WorkerError, match="target exploded on purpose"):
        await main.spawn_worker("bad-1", "worker_targets:broken")
    with pytest.raises(WorkerError, match="no_such_function"):
        await main.spawn_worker("bad-2", "worker_targets:no_such_function")
    with pytest.raises(WorkerError, match="no_such_module_zz"):
        await main.spawn_worker("bad-3", "no_such_module_zz:f")
    with pytest.raises(ValueError):
        await main.spawn_worker("bad-4", "worker_targets.calc")  # no ':'
    with pytest.raises(ValueError):
        await main.spawn_worker("bad-5", "worker_targets:calc", transport="carrier-pigeon")  # type: ignore[arg-type]
    for i in range(1, 6):
        assert f"bad-{i}" not in main.channels
    # A failed id can be used again.
    worker = await main.spawn_worker("bad-1", "worker_targets:calc")
    with pytest.raises(ValueError):
        await main.spawn_worker("bad-1", "worker_targets:calc")  # already attached
    assert await main.execute_command("calc.add", {"a": 1, "b": 2}) == 3

    status = await worker.stop()
    assert status == 0 and worker.returncode == 0
    assert not worker.alive
    assert not [c for c in ids(main) if c.startswith("calc.")]
    assert "bad-1" not in main.channels
    with pytest.raises(NotFoundError):
        await main.execute_command("calc.add", {"a": 1, "b": 2})
    assert await worker.stop() == 0  # idempotent


# ---------------------------------------------------------------------------- 9. idle cost


async def test_idle_worker_and_parent_cost_no_cpu(registries: Make) -> None:
    main = registries("main")
    shm = await main.spawn_worker("idle-shm", "worker_targets:idle")
    pipe = await main.spawn_worker("idle-pipe", "worker_targets:idle", transport="pipe")
    # One call each, so the channels have been used (and their readers parked) before.
    assert await main.execute_command("idle-shm.ping") == "pong"
    assert await main.execute_command("idle-pipe.ping") == "pong"
    shm_pid, pipe_pid = shm.pid, pipe.pid
    assert shm_pid is not None and pipe_pid is not None

    hz = os.sysconf("SC_CLK_TCK")
    window = 5.0
    budget_ticks = 0.01 * window * hz  # 1% of one CPU over the window
    before = {p: cpu_ticks(p) for p in (shm_pid, pipe_pid)}
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.sleep(window)  # everything idle: the resource window itself
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    after = {p: cpu_ticks(p) for p in (shm_pid, pipe_pid)}

    used = {
        f"worker {w.id} (pid {pid})": after[pid] - before[pid]
        for w, pid in ((shm, shm_pid), (pipe, pipe_pid))
    }
    used["parent"] = round(((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) * hz)
    over = {who: ticks for who, ticks in used.items() if ticks >= budget_ticks}
    assert not over, f"idle for {window}s, used CPU ticks (budget {budget_ticks:.0f}): {used}"
    assert shm.alive and pipe.alive
    assert await main.execute_command("idle-shm.ping") == "pong"
    assert await main.execute_command("idle-pipe.ping") == "pong"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_blocking_calls_from_many_threads_and_the_loop_at_once(transport: Transport) -> None:
    """Several threads call over one channel while the loop awaits calls on it too: whoever
    holds the reading role reads the others' replies and wakes them (and only them)."""
    import concurrent.futures

    with CommandRegistry("main") as r:
        r.spawn_worker_sync("worker-1", "worker_targets:calc", transport=transport)

        def caller(t: int) -> list[int]:
            return [r.execute_command_sync("calc.add", {"a": t, "b": i}) for i in range(300)]

        async def awaited() -> list[int]:
            return [await r.execute_command("calc.add", {"a": -1, "b": i}) for i in range(300)]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            threads = [pool.submit(caller, t) for t in range(4)]
            on_loop = r.run_blocking(awaited, timeout=60)
            results = [f.result(timeout=60) for f in threads]
        assert results == [[t + i for i in range(300)] for t in range(4)]
        assert on_loop == [i - 1 for i in range(300)]
