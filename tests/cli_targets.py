"""Setups for tests/test_cli_errors.py (``cmd-ipc serve cli_targets:<function>``)."""

from __future__ import annotations

import asyncio

from cmd_ipc import CommandRegistry


def setup(registry: CommandRegistry) -> None:
    """``api.add``, ``api.slow`` (never answers) and an internal ``admin.reset``."""

    @registry.command("api.add", validate=False)
    def add(a: int, b: int) -> int:
        return a + b

    @registry.command("api.slow", validate=False)
    async def slow() -> None:
        await asyncio.Event().wait()

    @registry.command("admin.reset", validate=False)
    def reset() -> str:
        return "reset"
