"""Worker targets of tests/test_hardening.py."""

from __future__ import annotations

import asyncio
import os

from cmd_ipc import CommandRegistry


async def slow_start(registry: CommandRegistry) -> None:
    """Takes a second to set up (a window to kill it while it starts), then serves
    ``slow.pid()``."""
    await asyncio.sleep(1.0)

    @registry.command("slow.pid", validate=False)
    def pid() -> int:
        return os.getpid()


def limits(registry: CommandRegistry) -> None:
    """Serves ``hard.big(n)`` (a string of ``n`` bytes), ``hard.wrap(request)`` (the request
    two levels deeper), ``hard.ping()`` and ``hard.hang()`` (never answers)."""

    @registry.command("hard.big", validate=False)
    def big(n: int) -> str:
        return "y" * n

    @registry.command("hard.wrap", validate=False)
    def wrap(request: dict[str, object], /) -> object:
        return {"a": {"b": request}}

    @registry.command("hard.ping", validate=False)
    def ping() -> str:
        return "pong"

    @registry.command("hard.hang", validate=False)
    async def hang() -> None:
        await asyncio.Event().wait()  # never set: the test kills this process
