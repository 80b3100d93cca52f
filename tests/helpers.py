"""Shared helpers for the registry and tree tests (no conftest: import what you need).

* :func:`eventually` -- poll a condition on the event loop, with a deadline.
* :func:`link` -- connect a parent and a child registry with an :class:`InMemoryChannel` pair.
* :class:`FakeChannel` -- a hand-made JSON channel that records what the registry sends and lets
  a test inject frames as if a peer had sent them.
* :func:`registries` -- fixture: a factory of registries closed at teardown.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from cmd_ipc import Channel, CommandRegistry, InMemoryChannel
from cmd_ipc.channels import OnClose, OnFrame

__all__ = [
    "FakeChannel",
    "eventually",
    "link",
    "new_id",
    "registries",
    "settle",
]


async def eventually(cond: Callable[[], Any], timeout: float = 2.0) -> None:
    """Yields to the loop until ``cond()`` is true; fails the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {cond}")
        await asyncio.sleep(0)


async def settle(rounds: int = 20) -> None:
    """Lets already-scheduled callbacks run (a quiescence barrier, never a readiness wait)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def new_id() -> str:
    return str(uuid.uuid4())


async def link(
    parent: CommandRegistry, child: CommandRegistry, *, encoding: str = "msgpack"
) -> tuple[InMemoryChannel, InMemoryChannel]:
    """Connects ``child`` under (or beside) ``parent``.

    Returns ``(parent_end, child_end)``: ``parent_end`` is registered in ``parent`` under the
    child's id, ``child_end`` in ``child`` under the parent's id.
    """
    parent_end, child_end = InMemoryChannel.pair(child.id, parent.id, encoding=encoding)  # type: ignore[arg-type]
    await parent.register_channel(parent_end)
    await child.register_channel(child_end)
    return parent_end, child_end


class FakeChannel(Channel):
    """A JSON channel driven by the test.

    Every frame the registry sends is decoded and appended to :attr:`sent`; :meth:`inject`
    delivers a message to the registry as if the peer had sent it (synchronously: the
    registry has handled it when ``inject`` returns).
    """

    def __init__(self, id: str) -> None:
        super().__init__(id, "json")
        self.sent: list[dict[str, Any]] = []
        self._on_frame: OnFrame | None = None
        self._on_close: OnClose | None = None
        self._closed = False

    async def start(self, on_frame: OnFrame, on_close: OnClose) -> None:
        self._on_frame, self._on_close = on_frame, on_close

    def send(self, frame: bytes) -> None:
        if not self._closed:
            self.sent.append(json.loads(frame))

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._on_close is not None:
                self._on_close(None)

    def inject(self, message: dict[str, Any]) -> None:
        self.inject_raw(json.dumps(message).encode())

    def inject_raw(self, frame: bytes) -> None:
        assert self._on_frame is not None, "channel not started"
        self._on_frame(frame)

    def take(self) -> list[dict[str, Any]]:
        """Returns and forgets what was sent so far."""
        out, self.sent = self.sent, []
        return out

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["type"] == type_]


@pytest.fixture
async def registries() -> AsyncIterator[Callable[..., CommandRegistry]]:
    """A factory of :class:`CommandRegistry` objects, all closed when the test ends."""
    made: list[CommandRegistry] = []

    def make(*args: Any, **kwargs: Any) -> CommandRegistry:
        r = CommandRegistry(*args, **kwargs)
        made.append(r)
        return r

    yield make
    for r in reversed(made):
        await r.close()
