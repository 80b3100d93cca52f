"""Ctrl-C: a script with workers, ``cmd-ipc serve`` with workers and ``cmd-ipc bench`` end
quietly (nothing on stderr: no traceback from a worker or from asyncio), exit with 130, and
leave no process behind.

Ctrl-C in a terminal sends SIGINT to the whole foreground process group: each program here
runs in a session of its own and gets SIGINT as its group, as from a terminal. Every wait
has a deadline: for a line on stdout, for the processes to end (pidfds, no polling).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from interrupt_targets import HANGING

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux >= 5.3)"
)

TESTS = Path(__file__).resolve().parent
#: Seconds a program may take to start, and to end after Ctrl-C.
START_DEADLINE = 60.0
END_DEADLINE = 20.0

SCRIPT = """
import sys
from cmd_ipc import CommandRegistry

try:
    with CommandRegistry("main") as registry:
        registry.spawn_worker_sync("w1", "interrupt_targets:calc")
        registry.spawn_worker_sync("w2", "interrupt_targets:with_sub", transport="pipe")
        if sys.argv[1] == "starting":
            registry.spawn_worker_sync("w3", "interrupt_targets:hanging")
        print("ready", flush=True)
        while True:
            registry.execute_command_sync("w1.add", {"a": 1, "b": 2})
            registry.execute_command_sync("w2-sub.add", {"a": 1, "b": 2})
except KeyboardInterrupt:
    sys.exit(130)
"""


#: Seconds the slow command of SLOW_SCRIPT takes unless interrupted.
SLOW = 10.0

SLOW_SCRIPT = """
import sys, time
from cmd_ipc import CommandRegistry

mode, transport, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
with CommandRegistry("main") as registry:
    registry.spawn_worker_sync("w", "interrupt_targets:slow", transport=transport)
    registry.add_event_listener("w.waiting", lambda _: print("waiting", flush=True))
    t0 = time.monotonic()
    try:
        if mode == "one":
            registry.execute_command_sync("w.wait", {"seconds": seconds})
        else:
            registry.execute_many_sync("w.wait", [{"seconds": seconds}] * 4, window=4)
        print("finished", time.monotonic() - t0, flush=True)
    except KeyboardInterrupt:
        print("interrupted", time.monotonic() - t0, flush=True)
    # The channel is still usable: the late replies (released now) are dropped, the next
    # calls are answered with their own results.
    assert registry.execute_command_sync("w.release") is True
    print("next", registry.execute_command_sync("w.add", {"a": 1, "b": 2}), flush=True)
    print("next", registry.execute_many_sync("w.add", [{"a": 2, "b": 2}] * 3), flush=True)
"""


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, theirs...), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for child, parent in parents.items():
            if parent == p and child not in out:
                out.add(child)
                todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    """Waits until every process of ``pids`` has ended; returns those still running."""
    fds: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # gone already
            fds[os.pidfd_open(pid)] = pid
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    try:
        while fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd, _ in poller.poll(remaining * 1000):
                poller.unregister(fd)
                os.close(fd)
                del fds[fd]
        return set(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def read_until(proc: subprocess.Popen[str], done: Callable[[str], bool], timeout: float) -> str:
    """Reads ``proc``'s stdout lines until ``done(line)``; fails after ``timeout`` s."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        if done(line):
            return seen
    raise AssertionError(f"no expected line within {timeout}s; stdout so far:\n{seen}")


@pytest.fixture
def run() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Starts programs in sessions of their own; kills whatever is left of them after."""
    started: list[subprocess.Popen[str]] = []
    below: set[int] = set()

    def start(*argv: str, cwd: Path | None = None) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
        env.pop("CMD_IPC_TOKEN", None)
        proc = subprocess.Popen(
            [sys.executable, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        below.update(descendants(proc.pid))
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    for pid in below:
        if "cmd_ipc" in cmdline(pid) or "interrupt_targets" in cmdline(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def ctrl_c(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """SIGINT to the program's process group, as Ctrl-C in a terminal sends it; returns its
    exit status, the rest of its stdout and its stderr, once every process below it ended."""
    below = descendants(proc.pid)
    assert below, "the program has no child process to stop"
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=END_DEADLINE)
    left = wait_gone(below, END_DEADLINE)
    assert not left, f"still running after Ctrl-C: {[cmdline(p) for p in left]}\n{err}"
    assert proc.returncode is not None
    return proc.returncode, out, err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("moment", ["calling", "starting"])
def test_script_with_workers(
    run: Callable[..., subprocess.Popen[str]], tmp_path: Path, moment: str
) -> None:
    """A script that uses spawn_worker_sync: interrupted while it calls its workers, or
    while a worker (with a sub-worker of its own) is still starting."""
    (tmp_path / "script.py").write_text(SCRIPT)
    proc = run("script.py", moment, cwd=tmp_path)
    marker = "ready" if moment == "calling" else HANGING
    read_until(proc, lambda line: line.strip() == marker, START_DEADLINE)
    code, _, err = ctrl_c(proc)
    assert (code, err) == (130, ""), err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("moment", ["serving", "setup"])
def test_serve_with_workers(run: Callable[..., subprocess.Popen[str]], moment: str) -> None:
    """``cmd-ipc serve`` whose setup spawns workers: interrupted while it serves, or while
    its setup waits for a worker that is starting."""
    setup = "interrupt_targets:serve_setup" + ("" if moment == "serving" else "_hanging")
    proc = run("-m", "cmd_ipc", "serve", setup, "--http", "127.0.0.1:0", "--json")
    if moment == "serving":
        read_until(proc, lambda line: line.startswith("{"), START_DEADLINE)
    else:
        read_until(proc, lambda line: line.strip() == HANGING, START_DEADLINE)
    code, _, err = ctrl_c(proc)
    assert (code, err) == (130, ""), err


@pytest.mark.timeout(120)
def test_bench(run: Callable[..., subprocess.Popen[str]]) -> None:
    """``cmd-ipc bench``, interrupted once its workers are up."""
    proc = run(
        "-m", "cmd_ipc", "bench", "--quick", "--calls", "2000", "--idle-seconds", "5",
        "--remote-calls", "200",
    )  # fmt: skip
    deadline = time.monotonic() + START_DEADLINE
    while not any("cmd_ipc._worker" in cmdline(p) for p in descendants(proc.pid)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no bench worker started"
        time.sleep(0.05)  # polls /proc for the first worker (there is no line to wait for)
    code, out, err = ctrl_c(proc)
    assert (code, err) == (130, ""), out + err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["shm", "pipe"])
@pytest.mark.parametrize("mode", ["one", "many"])
def test_ctrl_c_interrupts_a_blocking_call(
    run: Callable[..., subprocess.Popen[str]], tmp_path: Path, mode: str, transport: str
) -> None:
    """SIGINT while execute_command_sync (or execute_many_sync) waits in Rust for a slow
    worker command: KeyboardInterrupt comes before the command would have finished, and the
    channel answers the next calls right (the interrupted call's late reply is dropped)."""
    (tmp_path / "slow.py").write_text(SLOW_SCRIPT)
    proc = run("slow.py", mode, transport, str(SLOW), cwd=tmp_path)
    read_until(proc, lambda line: line.strip() == "waiting", START_DEADLINE)
    os.kill(proc.pid, signal.SIGINT)  # the program only (its worker has a group of its own)
    out, err = proc.communicate(timeout=END_DEADLINE + SLOW)
    assert proc.returncode == 0, out + err
    lines = [line.split() for line in out.splitlines() if line and line != "waiting"]
    assert lines[0][0] == "interrupted", out + err
    assert float(lines[0][1]) < SLOW, f"interrupted only when the command ended: {out}"
    assert lines[1:] == [["next", "3"], ["next", "[4,", "4,", "4]"]], out + err
