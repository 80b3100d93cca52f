"""Worker targets and ``cmd-ipc serve`` setups for tests/test_interrupt.py.

A target that prints a line does so on the worker's stdout, which it shares with its parent,
so a test reading the parent's stdout learns when the worker got that far.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from cmd_ipc import CommandRegistry

#: Printed by :func:`hanging` once the worker runs its target.
HANGING = "worker is starting"


def calc(registry: CommandRegistry) -> None:
    """``<id>.add(a, b)`` and ``<id>.pid()``."""

    @registry.command(f"{registry.id}.add", validate=False)
    def add(a: int, b: int) -> int:
        return a + b

    @registry.command(f"{registry.id}.pid", validate=False)
    def pid() -> int:
        return os.getpid()


async def with_sub(registry: CommandRegistry) -> None:
    """:func:`calc`, and a sub-worker of its own running :func:`calc`."""
    calc(registry)
    await registry.spawn_worker(f"{registry.id}-sub", "interrupt_targets:calc")


async def hanging(registry: CommandRegistry) -> None:
    """Never gets ready: says so, then waits (a worker interrupted while it starts), with a
    sub-worker that is ready."""
    await registry.spawn_worker(f"{registry.id}-sub", "interrupt_targets:calc")
    print(HANGING, flush=True)
    await asyncio.Event().wait()


async def serve_setup(registry: CommandRegistry) -> None:
    """For ``cmd-ipc serve``: two workers, one with a sub-worker."""
    await registry.spawn_worker("w1", "interrupt_targets:calc")
    await registry.spawn_worker("w2", "interrupt_targets:with_sub")


async def serve_setup_hanging(registry: CommandRegistry) -> None:
    """For ``cmd-ipc serve``: a worker, then one that never gets ready."""
    await registry.spawn_worker("w1", "interrupt_targets:calc")
    await registry.spawn_worker("w2", "interrupt_targets:hanging")


def slow(registry: CommandRegistry) -> None:
    """:func:`calc`, plus ``<id>.wait(seconds)``: emits ``<id>.waiting``, then answers
    ``"late"`` after ``seconds`` or once ``<id>.release()`` was called, whichever is first."""
    calc(registry)
    release = asyncio.Event()

    @registry.command(f"{registry.id}.wait", validate=False)
    async def wait(seconds: float) -> str:
        registry.emit_event(f"{registry.id}.waiting")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(release.wait(), seconds)
        return "late"

    @registry.command(f"{registry.id}.release", validate=False)
    def release_all() -> bool:
        release.set()
        return True
