"""cmd-ipc for Python: call named commands anywhere in a tree of processes and services.

Implements the cmd-ipc "Service Mesh Tree" protocol (spec-v1); every routing rule runs in a
Rust core (``cmd_ipc._core``).

Example:
    >>> import asyncio
    >>> from cmd_ipc import CommandRegistry, InMemoryChannel
    >>> async def main():
    ...     async with CommandRegistry("main") as root, CommandRegistry(
    ...         "worker", router_channel="main"
    ...     ) as worker:
    ...         to_worker, to_main = InMemoryChannel.pair("worker", "main")
    ...         await root.register_channel(to_worker)
    ...         await worker.register_channel(to_main)
    ...         await worker.register_command("calc.add", lambda a, b: a + b)
    ...         return await root.execute_command("calc.add", {"a": 2, "b": 3})
    >>> asyncio.run(main())
    5
"""

from cmd_ipc._core import __version__
from cmd_ipc.channels import Channel, InMemoryChannel
from cmd_ipc.channels.native import NativeChannel
from cmd_ipc.commands import command
from cmd_ipc.errors import (
    ChannelDisconnectedError,
    CommandError,
    CommandTimeoutError,
    DuplicateCommandError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    ProtocolError,
)
from cmd_ipc.registry import CommandRegistry
from cmd_ipc.workers import RestartPolicy, Worker, WorkerError

__all__ = [
    "Channel",
    "ChannelDisconnectedError",
    "CommandError",
    "CommandRegistry",
    "CommandTimeoutError",
    "DuplicateCommandError",
    "InMemoryChannel",
    "InternalError",
    "InvalidRequestError",
    "NativeChannel",
    "NotFoundError",
    "ProtocolError",
    "RestartPolicy",
    "Worker",
    "WorkerError",
    "__version__",
    "command",
]
