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
