"""A Python registry whose parent channel is its own stdin/stdout (StdioChannel.from_stdio).

Run as ``python stdio_child.py [garbage]``: registers ``child.add`` and ``child.where``; with
``garbage`` it first writes stray lines straight to the channel's output.
"""

from __future__ import annotations

import asyncio
import os
import sys

from cmd_ipc import CommandRegistry, StdioChannel


async def main() -> None:
    # A second handle on the parent's pipe: is it left blocking, as it was, at the end?
    probe = os.dup(0)
    async with CommandRegistry("child", router_channel="parent") as registry:
        channel = StdioChannel.from_stdio("parent")
        if "garbage" in sys.argv:
            assert channel._write_fd is not None
            os.write(channel._write_fd, b"plain text banner\n[1, 2]\n\n" + b"x" * 5000 + b"\n")
        done = asyncio.Event()
        registry.add_close_listener(lambda _cid, _reason: done.set())
        await registry.register_channel(channel)
        print("a stray print goes to stderr, not into the channel")
        await registry.register_command("child.add", lambda a, b: a + b)
        await registry.register_command("child.where", lambda: os.getpid())
        await done.wait()
    print(f"stdin blocking after close: {os.get_blocking(probe)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
