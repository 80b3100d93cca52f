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

from typing import TYPE_CHECKING, Any

from cmd_ipc._core import __version__
from cmd_ipc.channels import Channel, InMemoryChannel
from cmd_ipc.channels.native import NativeChannel
from cmd_ipc.commands import command
from cmd_ipc.errors import (
    ChannelDisconnectedError,
    CmdIpcError,
    CommandError,
    CommandTimeoutError,
    DuplicateCommandError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    ProtocolError,
    WorkerError,
)
from cmd_ipc.registry import CommandRegistry
from cmd_ipc.workers import Pool, RestartPolicy, Worker

if TYPE_CHECKING:
    from cmd_ipc.channels.grpc import GrpcChannel
    from cmd_ipc.channels.http import HTTPChannel
    from cmd_ipc.channels.nats import NatsChannel
    from cmd_ipc.channels.stdio import StdioChannel
    from cmd_ipc.channels.websocket import WebSocketChannel

#: Names imported on first use: their optional dependencies (aiohttp, websockets, nats-py,
#: grpcio) load only when a program uses them.
_LAZY = {
    "GrpcChannel": "cmd_ipc.channels.grpc",
    "HTTPChannel": "cmd_ipc.channels.http",
    "NatsChannel": "cmd_ipc.channels.nats",
    "WebSocketChannel": "cmd_ipc.channels.websocket",
    "StdioChannel": "cmd_ipc.channels.stdio",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cmd_ipc' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


__all__ = [
    "Channel",
    "ChannelDisconnectedError",
    "CmdIpcError",
    "CommandError",
    "CommandRegistry",
    "CommandTimeoutError",
    "DuplicateCommandError",
    "GrpcChannel",
    "HTTPChannel",
    "InMemoryChannel",
    "InternalError",
    "InvalidRequestError",
    "NativeChannel",
    "NatsChannel",
    "NotFoundError",
    "Pool",
    "ProtocolError",
    "RestartPolicy",
    "StdioChannel",
    "WebSocketChannel",
    "Worker",
    "WorkerError",
    "__version__",
    "command",
]
