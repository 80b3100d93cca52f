"""Worker targets of tests/test_soak.py."""

from __future__ import annotations

import os

from cmd_ipc import CommandRegistry


def member(registry: CommandRegistry) -> None:
    """A pool member: ``soak.double(n)``; counts the flood events it receives."""
    seen = [0]

    @registry.command("soak.double", validate=False)
    def double(n: int) -> int:
        return 2 * n

    @registry.on("soak.flood", validate=False)
    def flooded(payload: object) -> None:
        seen[0] += 1


async def middle(registry: CommandRegistry) -> None:
    """A worker with a sub-worker: ``soak.echo(x)`` is served two hops down."""
    await registry.spawn_worker(
        f"{registry.id}-leaf", "soak_targets:leaf", restart=_policy(), transport="pipe"
    )

    @registry.command("soak.pid", validate=False)
    def pid() -> int:
        return os.getpid()


def leaf(registry: CommandRegistry) -> None:
    @registry.command("soak.echo", validate=False)
    def echo(x: object) -> object:
        return x


def _policy():  # type: ignore[no-untyped-def]
    from cmd_ipc import RestartPolicy

    return RestartPolicy(max_restarts=None, backoff=0.05, max_backoff=0.5)
