"""A child that breaks the shared memory of its channel never freezes or crashes its parent.

* Corrupt ring (issue 14, item 1): a worker writes an impossible index into its ring's header
  (a head beyond the capacity or moved backwards, a tail ahead of the parent's head). The
  parent closes that channel with the reason ``corrupt_ring`` (logged), fails the calls
  waiting on it with ``channel_disconnected`` at once (an async caller, and a blocking caller
  parked on the ring), and keeps serving: another worker, its local handlers, async calls.
  Before, its event loop spun forever in Rust on a ring that could never be read (a blocking
  caller's thread likewise, at 100% CPU).
* Sealed segments (item 9): a child holding the segment's descriptor cannot truncate it
  (``EPERM``), so the parent does not die of SIGBUS on its next ring access; a segment without
  the seals is refused on attach.

A parent that froze or crashed would take pytest with it, so each parent runs in a process
of its own and reports what it saw as one JSON line; every wait in it has a deadline.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cmd_ipc import CommandRegistry, NativeChannel

TESTS = Path(__file__).resolve().parent
#: Seconds a parent may take in all (spawning workers included) before it counts as frozen.
PARENT_DEADLINE = 90.0

CORRUPT_ASYNC = """
import asyncio, json, logging, sys, time
from cmd_ipc import ChannelDisconnectedError, CommandError, CommandRegistry

how = sys.argv[1]
records = []
handler = logging.Handler()
handler.emit = lambda r: records.append(r.getMessage())
logging.getLogger("cmd_ipc").addHandler(handler)

async def outcome(fut, timeout):
    try:
        return ["ok", await asyncio.wait_for(fut, timeout)]
    except asyncio.TimeoutError:
        return ["hang", None]
    except CommandError as e:
        return [e.code, None]

async def main():
    registry = CommandRegistry("main")
    try:
        await registry.register_command("main.local", lambda: "local")
        await registry.spawn_worker("bad", "shm_hardening_targets:corrupter")
        await registry.spawn_worker("good", "worker_targets:calc")
        started = asyncio.Event()
        registry.add_event_listener("bad.slow.started", lambda _: started.set())
        waiting = asyncio.ensure_future(registry.execute_command("bad.slow", timeout=60))
        await asyncio.wait_for(started.wait(), 30)
        t0 = time.monotonic()
        if how == "tail_ahead":
            # A bad tail is met by the parent's next send (the ping), as the ring's writer.
            corrupted = await outcome(registry.execute_command("bad.corrupt_tail"), 20)
            after = await outcome(registry.execute_command("bad.ping", timeout=20), 20)
        else:
            # A bad head is met by the reading loop at the doorbell; nothing is sent after.
            registry.emit_event("bad.corrupt", how)
            corrupted, after = ["ok", "done"], None
        out = {
            "corrupted": corrupted,
            "waiting": await outcome(waiting, 20),
            "after": after or await outcome(registry.execute_command("bad.ping"), 20),
            "seconds": time.monotonic() - t0,
            "good": await outcome(registry.execute_command("calc.add", {"a": 1, "b": 2}), 20),
            "local": await outcome(registry.execute_command("main.local"), 20),
            "again": await outcome(registry.execute_command("calc.add", {"a": 2, "b": 2}), 20),
            "logged": [m for m in records if "corrupt_ring" in m],
        }
        print(json.dumps(out), flush=True)
    finally:
        await registry.close()

asyncio.run(main())
"""

CORRUPT_SYNC = """
import json, logging, sys, threading, time
from cmd_ipc import CommandError, CommandRegistry

how = sys.argv[1]
records = []
handler = logging.Handler()
handler.emit = lambda r: records.append(r.getMessage())
logging.getLogger("cmd_ipc").addHandler(handler)

def outcome(call):
    try:
        return ["ok", call()]
    except CommandError as e:
        return [e.code, None]

with CommandRegistry("main") as registry:
    registry.register_command_sync("main.local", lambda: "local")
    registry.spawn_worker_sync("bad", "shm_hardening_targets:corrupter")
    registry.spawn_worker_sync("good", "worker_targets:calc")
    started = threading.Event()
    registry.add_event_listener("bad.slow.started", lambda _: started.set())
    result = {}
    # A blocking caller: this thread reads its reply from the ring itself, parked on it.
    caller = threading.Thread(
        target=lambda: result.update(
            waiting=outcome(lambda: registry.execute_command_sync("bad.slow", timeout=60))
        ),
        daemon=True,
    )
    caller.start()
    assert started.wait(30), "bad.slow never started"
    t0 = time.monotonic()
    registry.emit_event("bad.corrupt", how)
    caller.join(20)
    out = {
        "waiting": result.get("waiting", ["hang", None]),
        "seconds": time.monotonic() - t0,
        "good": outcome(lambda: registry.execute_command_sync("calc.add", {"a": 1, "b": 2})),
        "local": outcome(lambda: registry.execute_command_sync("main.local")),
        "logged": [m for m in records if "corrupt_ring" in m],
    }
    print(json.dumps(out), flush=True)
"""

TRUNCATE = """
import asyncio, json, os, subprocess, sys
from cmd_ipc import CommandRegistry, NativeChannel

CHILD = '''
import os, sys
fd = int(sys.argv[1])
for size in (1 << 20, 0):  # grow, then shrink (the SIGBUS of the parent)
    try:
        os.ftruncate(fd, size)
        print("resized", flush=True)
    except OSError as e:
        print(e.errno, flush=True)
'''

async def main():
    parent = CommandRegistry("main")
    child = CommandRegistry("peer", router_channel="main")
    try:
        a, b = NativeChannel.pair("peer", "main", transport="shm", ring_size=65536)
        held = os.dup(a.shm_fd)  # what a child process holds: the segment's descriptor
        await parent.register_channel(a)
        await child.register_channel(b)
        await child.register_command("peer.echo", lambda value: value)
        big = bytes(range(256)) * 1024  # crosses the rings several times: every page
        before = await parent.execute_command("peer.echo", {"value": big})
        tried = subprocess.run(
            [sys.executable, "-c", CHILD, str(held)], pass_fds=[held],
            capture_output=True, text=True, timeout=30,
        )
        # The parent touches every page of the rings again (SIGBUS here if truncated).
        after = await parent.execute_command("peer.echo", {"value": big})
        print(json.dumps({
            "child": tried.stdout.split(),
            "child_status": tried.returncode,
            "echoed": before == big and after == big,
        }), flush=True)
    finally:
        await parent.close()
        await child.close()

asyncio.run(main())
"""


def run_parent(tmp_path: Path, script: str, *args: str) -> dict[str, Any]:
    """Runs ``script`` as a parent process of its own; returns the JSON it printed. Fails
    if it froze (no answer within the deadline) or died (a signal, a traceback)."""
    path = tmp_path / "parent.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=PARENT_DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the parent froze (no answer in {PARENT_DEADLINE}s)\n{out}\n{err[-4000:]}")
    if proc.returncode != 0:
        died = -proc.returncode if proc.returncode < 0 else None
        what = signal.Signals(died).name if died else f"status {proc.returncode}"
        pytest.fail(f"the parent died ({what})\n{out}\n{err[-4000:]}")
    return dict(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.timeout(150)
@pytest.mark.parametrize("how", ["head_beyond", "head_backwards", "tail_ahead"])
def test_corrupt_ring_closes_that_channel_only(tmp_path: Path, how: str) -> None:
    """The event loop reads the ring (or writes it, for a bad tail): the call waiting on
    the broken channel fails with channel_disconnected at once, the close is logged with
    corrupt_ring, and the other worker, local handlers and async calls are still served."""
    out = run_parent(tmp_path, CORRUPT_ASYNC, how)
    assert out["corrupted"] == ["ok", "done"], out
    assert out["waiting"] == ["channel_disconnected", None], out
    # The channel is gone: its commands with it (or the call that met the bad tail failed).
    assert out["after"][0] in ("channel_disconnected", "not_found"), out
    # Well before the waiting call's own timeout (60 s) or the trigger's (20 s).
    assert out["seconds"] < 15, out
    assert out["good"] == ["ok", 3], out
    assert out["local"] == ["ok", "local"], out
    assert out["again"] == ["ok", 4], out
    assert any("'bad'" in m for m in out["logged"]), out


@pytest.mark.timeout(150)
def test_corrupt_ring_under_a_parked_blocking_caller(tmp_path: Path) -> None:
    """A blocking caller parked on the ring (it holds the channel's reading role) finds the
    impossible head on its next wake-up: it raises channel_disconnected instead of spinning,
    and the parent goes on serving."""
    out = run_parent(tmp_path, CORRUPT_SYNC, "head_beyond")
    assert out["waiting"] == ["channel_disconnected", None], out
    assert out["seconds"] < 15, out
    assert out["good"] == ["ok", 3], out
    assert out["local"] == ["ok", "local"], out
    assert any("'bad'" in m for m in out["logged"]), out


@pytest.mark.timeout(150)
def test_a_child_cannot_resize_the_segment(tmp_path: Path) -> None:
    """A child holding the segment's descriptor tries to grow it and to truncate it: both
    fail with EPERM (the seals), and the parent keeps using every page of the rings."""
    out = run_parent(tmp_path, TRUNCATE)
    assert out["child"] == [str(errno.EPERM)] * 2, out
    assert out["child_status"] == 0, out
    assert out["echoed"] is True, out


async def test_an_unsealed_segment_is_refused() -> None:
    """A segment that anyone holding it could resize is refused when attached, with an
    error that says why."""
    import socket
    import struct

    fd = os.memfd_create("cmd-ipc", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096 + 2 * 4096)
    os.pwrite(fd, struct.pack("<QQ", 0x3130_4350_4944_4D43, 4096), 0)  # our magic, capacity
    s_a, s_b = socket.socketpair()
    channel = NativeChannel("peer", sock_fd=s_a.detach(), transport="shm", shm_fd=fd, side=1)
    registry = CommandRegistry("main")
    try:
        with pytest.raises(OSError, match="not sealed"):
            await registry.register_channel(channel)
    finally:
        s_b.close()
        channel.close_fds()
        await registry.close()
