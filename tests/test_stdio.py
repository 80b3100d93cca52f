"""StdioChannel: JSON lines over a child's stdin/stdout, parent and child side."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

import pytest
from cmd_ipc import ChannelDisconnectedError, CommandRegistry, StdioChannel
from helpers import eventually

CHILD = str(Path(__file__).resolve().parent / "stdio_child.py")


async def test_python_child_over_stdio() -> None:
    async with CommandRegistry("parent") as root:
        channel = await StdioChannel.spawn(
            "child", [sys.executable, CHILD], stderr=asyncio.subprocess.PIPE
        )
        await root.register_channel(channel)
        await eventually(lambda: root.route_of("child.where") == "child", timeout=10)
        assert await root.execute_command("child.add", {"a": 2, "b": 40}) == 42
        assert await root.execute_command("child.where") == channel.pid
        await root.close_channel("child")
        assert channel.process is not None and channel.process.stderr is not None
        err = await channel.process.stderr.read()
        # The child's print went to its stderr; its channel output stayed clean.
        assert b"a stray print goes to stderr" in err
        # The pipe (a terminal, run by hand) is blocking again once the channel ended.
        assert b"stdin blocking after close: True" in err
        assert channel.rejected == 0
        # Closing ended the child (it saw end of input).
        assert channel.process.returncode == 0


async def test_stray_lines_are_skipped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "cmd_ipc.stdio")
    async with CommandRegistry("parent") as root:
        channel = await StdioChannel.spawn(
            "child", [sys.executable, CHILD, "garbage"], max_line=4096
        )
        await root.register_channel(channel)
        await eventually(lambda: root.route_of("child.add") == "child", timeout=10)
        assert await root.execute_command("child.add", {"a": 1, "b": 1}) == 2
        # The banner, the JSON array and the over-long line; the blank line is ignored.
        assert channel.rejected == 3
        text = caplog.text
        assert "not a JSON object: b'plain text banner'" in text
        assert "line longer than 4096 bytes" in text


async def test_strict_channel_closes_on_a_stray_line() -> None:
    async with CommandRegistry("parent") as root:
        channel = await StdioChannel.spawn("child", [sys.executable, CHILD, "garbage"], strict=True)
        await root.register_channel(channel)
        await eventually(lambda: "child" not in root.channels, timeout=10)
        assert channel.rejected == 1
        await eventually(
            lambda: channel.process is not None and channel.process.returncode is not None,
            timeout=5,
        )


async def test_invalid_message_is_dropped_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    """A JSON line that is not a spec-v1 message is dropped by the router, which answers an
    execute request ``invalid_request``; the channel stays up."""
    script = (
        "import sys\n"
        'sys.stdout.write(\'{"type": "nonsense", "id": "x"}\\n\')\n'
        'sys.stdout.write(\'{"type": "execute.command.request", "id": "q1"}\\n\')\n'
        "sys.stdout.flush()\n"
        "print(sys.stdin.readline(), file=sys.stderr, flush=True)\n"
        "sys.stdin.read()\n"
    )
    caplog.set_level(logging.WARNING, "cmd_ipc")
    async with CommandRegistry("parent") as root:
        channel = await StdioChannel.spawn(
            "peer", [sys.executable, "-c", script], stderr=asyncio.subprocess.PIPE
        )
        await root.register_channel(channel)
        assert channel.process is not None and channel.process.stderr is not None
        # The peer echoes the first line it received to stderr: our list request. Then the
        # answer to its bad execute request arrives.
        first = await asyncio.wait_for(channel.process.stderr.readline(), 10)
        assert b"list.commands.request" in first
        await eventually(lambda: "dropped a message" in caplog.text, timeout=5)
        assert "peer" in root.channels
        assert channel.rejected == 0


async def test_child_death_fails_waiting_calls_at_once() -> None:
    async with CommandRegistry("parent") as root:
        channel = await StdioChannel.spawn("child", [sys.executable, CHILD])
        await root.register_channel(channel)
        await eventually(lambda: root.route_of("child.add") == "child", timeout=10)
        assert channel.process is not None
        channel.process.send_signal(signal.SIGSTOP)  # the next call waits
        slow = asyncio.ensure_future(root.execute_command("child.add", {"a": 1, "b": 2}))
        await asyncio.sleep(0.1)
        assert not slow.done()
        t0 = time.monotonic()
        channel.process.kill()
        with pytest.raises(ChannelDisconnectedError):
            await slow
        assert time.monotonic() - t0 < 1.0
        assert "child" not in root.channels


async def test_spawn_errors() -> None:
    with pytest.raises(ValueError, match="argv"):
        await StdioChannel.spawn("x", [])
    with pytest.raises(OSError):
        await StdioChannel.spawn("x", ["/nonexistent/program"])
