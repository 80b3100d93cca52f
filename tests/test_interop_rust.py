"""Live interop with the Rust implementation (crate ``coralstack-cmd-ipc`` from crates.io).

``tests/interop`` is a small Rust program (its own Cargo package) whose registry talks spec-v1
JSON lines on stdin/stdout and uses this process's registry (channel ``python``) as its
router. Each test spawns it through a :class:`StdioChannel`.

Behaviour differences found between the implementations are asserted where they show, and
listed in ``docs/channels.md``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cmd_ipc import (
    ChannelDisconnectedError,
    CommandRegistry,
    DuplicateCommandError,
    InvalidRequestError,
    NotFoundError,
    StdioChannel,
)
from helpers import eventually, link

INTEROP = Path(__file__).resolve().parent / "interop"
BINARY = INTEROP / "target" / "debug" / "cmd-ipc-rust-peer"

# The first build of the Rust peer on a fresh machine compiles tokio and the crate.
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="session")
def rust_peer() -> Path:
    """Builds the Rust peer (a no-op when it is up to date) and returns its path."""
    subprocess.run(
        ["cargo", "build", "--quiet", "--manifest-path", str(INTEROP / "Cargo.toml")],
        check=True,
        timeout=280,
    )
    assert BINARY.exists(), BINARY
    return BINARY


class Tree:
    """``python`` (root) with an in-memory child ``pychild``, and the Rust peer ``rust``."""

    def __init__(self, root: CommandRegistry, child: CommandRegistry, channel: StdioChannel):
        self.root, self.child, self.channel = root, child, channel
        self.ready: list[Any] = []


@pytest.fixture
async def tree(rust_peer: Path) -> AsyncIterator[Tree]:
    root = CommandRegistry("python", request_ttl=10.0)
    child = CommandRegistry("pychild", router_channel="python", request_ttl=10.0)
    await link(root, child)
    await root.register_command("py.mul", lambda a, b: a * b)
    await root.register_command("_py.secret", lambda: "python only")
    await child.register_command("pychild.hello", lambda name: f"hello {name}")
    channel = await StdioChannel.spawn("rust", [str(rust_peer), "python"])
    t = Tree(root, child, channel)
    root.add_event_listener("rust.ready", t.ready.append)
    await root.register_channel(channel)
    try:
        await eventually(lambda: t.ready, timeout=10.0)
        yield t
    finally:
        await child.close()
        await root.close()


async def test_python_calls_rust_commands(tree: Tree) -> None:
    root, child = tree.root, tree.child
    assert tree.ready[0]["commands"][:2] == ["rust.add", "rust.echo"]
    assert root.route_of("rust.add") == "rust"
    assert await root.execute_command("rust.add", {"a": 2, "b": 3}) == 5
    value = {"s": "é\n\u2028", "n": [1, 2.5, None, True], "big": 2**53 + 1}
    assert await root.execute_command("rust.echo", value) == value
    # From one level down, through the Python root.
    assert await child.execute_command("rust.add", {"a": -1, "b": 1}) == 0
    # The Rust registry's schemas reach Python (normalised: it adds additionalProperties).
    add = next(c for c in root.list_commands() if c["id"] == "rust.add")
    assert add["description"] == "Adds two integers (Rust)"
    assert add["schema"]["request"]["required"] == ["a", "b"]
    assert add["schema"]["request"]["additionalProperties"] is False
    # Errors raised by a Rust handler keep their code.
    with pytest.raises(InvalidRequestError, match="'a' must be an integer"):
        await root.execute_command("rust.add", {"a": "x", "b": 1})


async def test_rust_calls_python_commands_through_its_router(tree: Tree) -> None:
    root = tree.root
    # The Rust registry does not have py.mul: it escalates to its router (us).
    assert (
        await root.execute_command("rust.call", {"command": "py.mul", "request": {"a": 6, "b": 7}})
        == 42
    )
    # ...and to a registry below us.
    assert (
        await root.execute_command(
            "rust.call", {"command": "pychild.hello", "request": {"name": "rust"}}
        )
        == "hello rust"
    )
    # A Python error travels back through Rust with its code.
    with pytest.raises(NotFoundError):
        await root.execute_command("rust.call", {"command": "no.such.command"})
    with pytest.raises(InvalidRequestError):
        await root.execute_command("rust.call", {"command": "py.mul", "request": {"a": 1}})


async def test_events_cross_both_ways_exactly_once(tree: Tree) -> None:
    root, child = tree.root, tree.child
    at_root: list[Any] = []
    at_child: list[Any] = []
    root.add_event_listener("shared.news", at_root.append)
    child.add_event_listener("shared.news", at_child.append)
    # Rust -> Python: emitted by a Rust handler, flooded to the whole Python tree.
    assert await root.execute_command(
        "rust.emit", {"event_id": "shared.news", "payload": {"from": "rust"}}
    )
    await eventually(lambda: at_root and at_child)
    # Python -> Rust: from the child, through the root, to the Rust registry.
    child.emit_event("py.ping", {"n": 1})
    child.emit_event("shared.news", {"from": "pychild"})

    async def rust_events() -> list[Any]:
        return await root.execute_command("rust.events")  # type: ignore[no-any-return]

    deadline = time.monotonic() + 5
    while len(await rust_events()) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # room for a duplicate to show up
    assert await rust_events() == [
        # The Rust registry's own listener hears its own event, once.
        {"event_id": "shared.news", "payload": {"from": "rust"}},
        {"event_id": "py.ping", "payload": {"n": 1}},
        {"event_id": "shared.news", "payload": {"from": "pychild"}},
    ]
    assert at_root == [{"from": "rust"}, {"from": "pychild"}]
    assert at_child == [{"from": "rust"}, {"from": "pychild"}]


async def test_duplicate_ids_across_languages_are_rejected(tree: Tree) -> None:
    root, child = tree.root, tree.child
    # Rust tries to take a Python command: its router (us) refuses.
    answer = await root.execute_command("rust.register", {"id": "py.mul"})
    assert answer["ok"] is False and "duplicate" in answer["error"]
    assert await root.execute_command("py.mul", {"a": 2, "b": 2}) == 4
    # A Python registry tries to take a Rust command.
    with pytest.raises(DuplicateCommandError, match=r"rust\.add"):
        await child.register_command("rust.add", lambda a, b: 0)
    # A fresh id is accepted and callable from Python.
    assert await root.execute_command("rust.register", {"id": "rust.late"}) == {"ok": True}
    assert await child.execute_command("rust.late") == "rust"


async def test_private_ids_stay_private(tree: Tree) -> None:
    root, child = tree.root, tree.child
    assert all(not c["id"].startswith("_rust") for c in root.list_commands())
    with pytest.raises(NotFoundError):
        await root.execute_command("_rust.secret")
    with pytest.raises(NotFoundError):
        await root.execute_command("rust.call", {"command": "_py.secret"})
    # A private event stays in the registry that emitted it.
    root.emit_event("_py.private", {"secret": True})
    root.emit_event("py.ping", {"n": 2})
    deadline = time.monotonic() + 5
    while not await root.execute_command("rust.events") and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert await root.execute_command("rust.events") == [
        {"event_id": "py.ping", "payload": {"n": 2}}
    ]
    del child


async def test_death_of_the_rust_program_fails_waiting_calls_at_once(tree: Tree) -> None:
    root = tree.root
    slow = asyncio.ensure_future(root.execute_command("rust.sleep", {"ms": 8000}))
    await asyncio.sleep(0.1)
    assert not slow.done()
    t0 = time.monotonic()
    with pytest.raises(ChannelDisconnectedError):
        await root.execute_command("rust.exit", {"code": 7})
    with pytest.raises(ChannelDisconnectedError):
        await slow
    assert time.monotonic() - t0 < 1.0
    assert "rust" not in root.channels
    assert root.route_of("rust.add") is None
    assert tree.channel.process is not None and tree.channel.process.returncode == 7


async def test_kill_fails_waiting_calls_at_once(tree: Tree) -> None:
    root = tree.root
    slow = asyncio.ensure_future(root.execute_command("rust.sleep", {"ms": 8000}))
    await asyncio.sleep(0.1)
    assert tree.channel.process is not None
    t0 = time.monotonic()
    tree.channel.process.kill()
    with pytest.raises(ChannelDisconnectedError, match="closed"):
        await slow
    assert time.monotonic() - t0 < 1.0


async def test_malformed_lines_to_rust_are_skipped_by_it(tree: Tree) -> None:
    # The Rust peer skips what it cannot parse (and logs it on stderr); the channel lives.
    tree.channel.send(b"not json at all")
    tree.channel.send(json.dumps({"type": "execute.command.request", "id": 5}).encode())
    assert await tree.root.execute_command("rust.add", {"a": 1, "b": 1}) == 2


async def test_difference_rust_requires_uuid_message_ids(rust_peer: Path) -> None:
    """spec-v1 allows any non-empty string as a message id; the Rust implementation parses
    ids as UUIDs and skips any other message. (Our ids are UUIDv4, so our own traffic is
    never affected.)"""
    async with CommandRegistry("python") as root:
        channel = await StdioChannel.spawn(
            "rust", [str(rust_peer), "python"], stderr=asyncio.subprocess.PIPE
        )
        ready: list[Any] = []
        root.add_event_listener("rust.ready", ready.append)
        await root.register_channel(channel)
        await eventually(lambda: ready, timeout=10.0)
        channel.send(b'{"id":"not-a-uuid","type":"list.commands.request"}')
        assert await root.execute_command("rust.add", {"a": 1, "b": 2}) == 3
        await root.close_channel("rust")
        assert channel.process is not None and channel.process.stderr is not None
        err = (await channel.process.stderr.read()).decode()
    assert "UUID parsing failed" in err and "not-a-uuid" in err
