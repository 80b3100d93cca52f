"""Worker targets a worker cannot run get an error that says why and what to do: a function of
``__main__``, a module that spawns workers when imported (no ``if __name__ == "__main__"``
guard); a failure several levels down reads as one chain, never "failed to start:
WorkerError: ... failed to start". And ``Worker.ready()`` waits for a restarted worker.

The scripts run as a new user would run them: ``python script.py``, stderr checked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from cmd_ipc import CommandRegistry, RestartPolicy, WorkerError
from helpers import registries

__all__ = ["registries"]  # the fixture is imported from helpers

Make = Callable[..., CommandRegistry]
TESTS = Path(__file__).resolve().parent

CALC = """
from cmd_ipc import CommandRegistry


def calc(registry):
    @registry.command("calc.add")
    def add(a: int, b: int) -> int:
        return a + b

"""


def run_script(tmp_path: Path, name: str, body: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, f"{name}.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])},
    )


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_a_main_target_says_to_move_the_function(tmp_path: Path) -> None:
    out = run_script(
        tmp_path,
        "app",
        CALC
        + """
with CommandRegistry("main") as registry:
    registry.spawn_worker_sync("calc", "__main__:calc")
""",
    )
    assert out.returncode == 1
    assert last_line(out.stderr) == (
        "ValueError: target '__main__:calc' cannot be imported by a worker: a worker is a new "
        "interpreter that imports its target's module by name, and its __main__ is not your "
        "script. Move the function to a module (e.g. myapp/workers.py, target "
        "'myapp.workers:calc'), or name this module ('app:calc') and put the code that spawns "
        'workers under `if __name__ == "__main__":`'
    )
    assert "[worker" not in out.stderr  # refused before any worker started


def test_an_unguarded_module_says_to_add_the_guard(tmp_path: Path) -> None:
    out = run_script(
        tmp_path,
        "unguarded",
        CALC
        + """
with CommandRegistry("main") as registry:
    registry.spawn_worker_sync("calc", "unguarded:calc")
    print(registry.execute_command_sync("calc.add", {"a": 1, "b": 2}))
""",
    )
    assert out.returncode == 1
    assert last_line(out.stderr) == (
        "cmd_ipc.errors.WorkerError: worker 'calc' failed to start: module 'unguarded' spawns "
        "a worker ('calc') when it is imported, and a worker imports its target's module: "
        "each worker would spawn another. Put the code of 'unguarded' that spawns workers "
        'under `if __name__ == "__main__":`, or move the target function to a module that '
        "spawns nothing when imported"
    )
    # The worker says it once, without a traceback of its own.
    worker_lines = [line for line in out.stderr.splitlines() if line.startswith("[worker")]
    assert len(worker_lines) == 1 and "spawns a worker ('calc')" in worker_lines[0]
    assert "failed to start: WorkerError" not in out.stderr
    # With the guard, the same module works.
    guarded = run_script(
        tmp_path,
        "guarded",
        CALC
        + """
if __name__ == "__main__":
    with CommandRegistry("main") as registry:
        registry.spawn_worker_sync("calc", "guarded:calc")
        print(registry.execute_command_sync("calc.add", {"a": 1, "b": 2}))
""",
    )
    assert (guarded.returncode, guarded.stdout, guarded.stderr) == (0, "3\n", "")


def test_a_failure_down_the_tree_reads_as_one_chain(tmp_path: Path) -> None:
    (tmp_path / "levels.py").write_text(
        textwrap.dedent(
            """
            async def parent(registry):
                await registry.spawn_worker("leaf", "levels:broken")

            def broken(registry):
                raise RuntimeError("target exploded on purpose")
            """
        )
    )
    out = run_script(
        tmp_path,
        "main_levels",
        """
from cmd_ipc import CommandRegistry

with CommandRegistry("main") as registry:
    registry.spawn_worker_sync("mid", "levels:parent")
""",
    )
    assert out.returncode == 1
    assert last_line(out.stderr) == (
        "cmd_ipc.errors.WorkerError: worker 'mid' failed to start: worker 'leaf' failed to "
        "start: RuntimeError: target exploded on purpose"
    )
    assert out.stderr.count("WorkerError") == 1  # the spawn's own, never one inside another
    # The workers' failed starts are reported by the spawn, not as closed channels.
    assert "closed" not in out.stderr


async def test_missing_targets_name_what_is_missing(registries: Make) -> None:
    main = registries("main")
    with pytest.raises(WorkerError, match=r"cannot import 'no_such_module_zz' \(target"):
        await main.spawn_worker("a", "no_such_module_zz:f")
    with pytest.raises(WorkerError, match="module 'interrupt_targets' has no attribute 'nope'"):
        await main.spawn_worker("b", "interrupt_targets:nope")
    with pytest.raises(ValueError, match="cannot be imported by a worker"):
        await main.spawn_worker("c", "__main__:f")
    assert not main.channels


async def test_ready_waits_for_a_restarted_worker(registries: Make) -> None:
    main = registries("main")
    worker = await main.spawn_worker(
        "w", "interrupt_targets:calc", restart=RestartPolicy(max_restarts=1, backoff=0.05)
    )
    await asyncio.wait_for(worker.ready(), 1)  # ready: returns at once
    first = worker.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert await worker.wait() == -signal.SIGKILL
    await worker.ready(30)  # the restarted process has registered its commands again
    assert worker.pid != first and worker.restarts == 1
    assert await main.execute_command("w.pid") == worker.pid
    # Out of restarts: ready() says the worker will not come back.
    os.kill(worker.pid, signal.SIGKILL)
    await worker.wait()
    with pytest.raises(WorkerError, match="gave up after 1 restarts"):
        await worker.ready(30)
    # A stopped worker is not ready either; without a policy, an exit is final.
    other = await main.spawn_worker("x", "interrupt_targets:calc")
    os.kill(other.pid, signal.SIGKILL)  # type: ignore[arg-type]
    await other.wait()
    with pytest.raises(WorkerError, match="has no restart policy"):
        await other.ready()
    third = await main.spawn_worker("y", "interrupt_targets:calc")
    await third.stop()
    with pytest.raises(WorkerError, match="was stopped"):
        await third.ready()
    with pytest.raises(TimeoutError):
        # A worker that is restarting, with a deadline shorter than its backoff.
        slow = await main.spawn_worker(
            "z", "interrupt_targets:calc", restart=RestartPolicy(backoff=30)
        )
        os.kill(slow.pid, signal.SIGKILL)  # type: ignore[arg-type]
        await slow.wait()
        await slow.ready(0.1)
