"""Targets of the worker processes the tests spawn (``"worker_targets:<function>"``).

Each target receives the worker's :class:`~cmd_ipc.CommandRegistry` and registers commands
under its namespace. :func:`_common` gives every namespace the same probes, so a test can
drive the tree from inside any process:

* ``<ns>.whoami()`` -> ``{"id": registry id, "pid": process id}``;
* ``<ns>.call(command_id, request=None)`` -> the result of ``registry.execute_command`` run in
  that process (an error is returned as ``{"error": class name, "code": ..., "message": ...}``);
* ``<ns>.stats()`` -> ``registry.stats()`` of that process;
* ``<ns>.route_of(command_id)`` -> ``registry.route_of(command_id)``;
* ``<ns>.emit(event_id, payload)`` -> emits an event from that process;
* ``<ns>.seen()`` -> the payloads of ``topo.ping`` events this process received, in order;
* ``<ns>.echo(value)`` -> ``value`` (bytes and large payloads);
* ``<ns>.fail(message)`` -> raises ``ValueError(message)`` (``internal_error`` at the caller);
* ``<ns>.slow()`` -> emits ``<ns>.slow.started`` then never answers (until killed).

These commands are registered with ``validate=False``: the tests of the tree and of workers
check routing, with the handlers called exactly as written. :func:`typed` is the target with
typed (validated) commands, for tests/test_schemas.py.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from typing import Any

from cmd_ipc import CommandError, CommandRegistry

#: The event every process of the seed topology records.
PING = "topo.ping"


def _common(registry: CommandRegistry, ns: str) -> None:
    seen: list[Any] = []
    registry.add_event_listener(PING, seen.append)

    @registry.command(f"{ns}.whoami", validate=False)
    def whoami() -> dict[str, Any]:
        return {"id": registry.id, "pid": os.getpid()}

    @registry.command(f"{ns}.call", validate=False)
    async def call(command_id: str, request: Any = None) -> Any:
        try:
            return await registry.execute_command(command_id, request)
        except CommandError as e:
            return {"error": type(e).__name__, "code": e.code, "message": e.message}

    @registry.command(f"{ns}.stats", validate=False)
    def stats() -> dict[str, Any]:
        return registry.stats()

    @registry.command(f"{ns}.route_of", validate=False)
    def route_of(command_id: str) -> Any:
        return registry.route_of(command_id)

    @registry.command(f"{ns}.emit", validate=False)
    def emit(event_id: str, payload: Any = None) -> None:
        registry.emit_event(event_id, payload)

    @registry.command(f"{ns}.seen", validate=False)
    def seen_events() -> list[Any]:
        return list(seen)

    @registry.command(f"{ns}.echo", validate=False)
    def echo(value: Any) -> Any:
        return value

    @registry.command(f"{ns}.fail", validate=False)
    def fail(message: str) -> None:
        raise ValueError(message)

    @registry.command(f"{ns}.slow", validate=False)
    async def slow() -> str:
        registry.emit_event(f"{ns}.slow.started", {"pid": os.getpid()})
        await asyncio.Event().wait()  # never set: the test kills this process
        return "never"


def calc(registry: CommandRegistry) -> None:
    """``worker-1``: ``calc.*``."""
    _common(registry, "calc")

    @registry.command("calc.add", validate=False)
    def add(a: float, b: float) -> float:
        return a + b


def data(registry: CommandRegistry) -> None:
    """``worker-3``: ``data.*``."""
    _common(registry, "data")

    @registry.command("data.query", validate=False)
    def query(q: str) -> dict[str, Any]:
        return {"q": q, "rows": [q.upper()], "by": registry.id}


def transform(registry: CommandRegistry) -> None:
    """The sub-worker ``transform`` of ``worker-2``: ``transform.*``."""
    _common(registry, "transform")

    @registry.command("transform.upper", validate=False)
    def upper(text: str) -> str:
        return text.upper()


async def image(registry: CommandRegistry) -> None:
    """``worker-2``: ``image.*``, and spawns its own sub-worker ``transform``."""
    _common(registry, "image")

    @registry.command("image.resize", validate=False)
    def resize(w: int, h: int) -> dict[str, int]:
        return {"w": w // 2, "h": h // 2}

    await registry.spawn_worker("transform", "worker_targets:transform")


async def broken(registry: CommandRegistry) -> None:
    """A target that fails while starting."""
    raise RuntimeError("target exploded on purpose")


def idle(registry: CommandRegistry) -> None:
    """A worker with one command, ``<worker id>.ping``, that otherwise does nothing."""

    @registry.command(f"{registry.id}.ping", validate=False)
    def ping() -> str:
        return "pong"


def typed(registry: CommandRegistry) -> None:
    """``typed.make_item(name, qty=1)``: validated, returns an ``Item`` model (a datetime and
    bytes in it); ``typed.calls()``: how many times ``make_item`` ran. (pydantic is imported
    here, not at module level: the other targets' workers never load it.)"""
    from pydantic import BaseModel

    class Item(BaseModel):
        name: str
        qty: int
        made: datetime.datetime
        blob: bytes

    calls: list[str] = []

    @registry.command("typed.make_item", description="Makes an item")
    def make_item(name: str, qty: int = 1) -> Item:
        calls.append(name)
        made = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
        return Item(name=name, qty=qty, made=made, blob=name.encode())

    @registry.command("typed.calls")
    def count() -> int:
        return len(calls)


def pooled(registry: CommandRegistry) -> None:
    """A pool member: ``pool.whoami``, ``pool.add``, ``pool.slow`` (never answers) and
    ``pool.spin(ms)`` (pure-Python work, for the scaling benchmark)."""

    @registry.command("pool.whoami", validate=False)
    def whoami() -> str:
        return registry.id

    @registry.command("pool.add", validate=False)
    def add(a: int, b: int) -> list[Any]:
        return [a + b, registry.id]

    @registry.command("pool.slow", validate=False)
    async def slow() -> str:
        registry.emit_event("pool.slow.started", registry.id)
        await asyncio.Event().wait()  # never set: the test kills this process
        return "never"
