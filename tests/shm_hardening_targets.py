"""Worker targets of tests/test_shm_hardening.py: a worker that breaks the shared memory of
its channel to its parent, as a buggy or hostile child could.

The worker finds its segment the way any process can: its mapping is listed in
``/proc/self/maps`` (``/memfd:cmd-ipc``), and the process writes into it through
``/proc/self/mem`` (no descriptor needed, no test hook in the library). The layout is the one
documented in ``rust/native/src/transport.rs``: ring ``i``'s header at ``64 + 256 * i``
(``head``, then ``tail`` 64 bytes on), the capacity at offset 8. A worker is side 1 of its
channel: it writes ring 1 (its parent reads it) and reads ring 0.
"""

from __future__ import annotations

import asyncio
import os
import struct

from cmd_ipc import CommandRegistry

#: Offset of ring 1's header (the ring a worker writes to its parent).
RING1 = 320
#: Offset of ring 0's header (the ring the parent writes to the worker).
RING0 = 64
TAIL = 64


def segment_address() -> int:
    """The start of this process's one mapping of a cmd-ipc segment."""
    starts = set()
    with open("/proc/self/maps") as f:
        for line in f:
            if "/memfd:cmd-ipc" in line:
                starts.add(int(line.split("-", 1)[0], 16))
    if len(starts) != 1:
        raise RuntimeError(f"expected one cmd-ipc segment mapped, found {len(starts)}")
    return starts.pop()


def peek(address: int) -> int:
    fd = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        return int(struct.unpack("<Q", os.pread(fd, 8, address))[0])
    finally:
        os.close(fd)


def poke(address: int, value: int) -> None:
    fd = os.open("/proc/self/mem", os.O_RDWR)
    try:
        os.pwrite(fd, struct.pack("<Q", value % 2**64), address)
    finally:
        os.close(fd)


def corrupter(registry: CommandRegistry) -> None:
    """``<id>.slow()`` (emits ``<id>.slow.started``, never answers) and ``<id>.ping()``; on
    the event ``<id>.corrupt`` with ``how`` (or the command ``<id>.corrupt_tail()`` for the
    last):

    * ``"head_beyond"``: the head of the ring it writes, capacity + 1 ahead of the parent's
      tail;
    * ``"head_backwards"``: that head one byte behind the parent's tail;
    * ``"tail_ahead"``: the tail of the ring it reads, one byte ahead of the parent's head
      (the parent, as the writer of that ring, finds it on its next send).

    Then it rings its channel's doorbell (one byte on the socket, as a writer that published
    bytes does), so that a parent whose loop sleeps on the socket reads the ring now.
    """
    ns = registry.id

    @registry.command(f"{ns}.slow", validate=False)
    async def slow() -> str:
        registry.emit_event(f"{ns}.slow.started", os.getpid())
        await asyncio.Event().wait()  # never set: the parent closes the channel
        return "never"

    @registry.command(f"{ns}.ping", validate=False)
    def ping() -> str:
        return "pong"

    def corrupt(how: str) -> None:
        base = segment_address()
        capacity = peek(base + 8)
        if how == "head_beyond":
            poke(base + RING1, peek(base + RING1 + TAIL) + capacity + 1)
        elif how == "head_backwards":
            poke(base + RING1, peek(base + RING1 + TAIL) - 1)
        elif how == "tail_ahead":
            poke(base + RING0 + TAIL, peek(base + RING0) + 1)
        else:
            raise ValueError(how)
        # The node's socket of the channel to the parent (a private accessor: test only).
        fd = registry._node.native_fd(registry.router_channel or "")
        if fd is not None:
            os.write(fd, b"\x01")

    registry.add_event_listener(f"{ns}.corrupt", corrupt)

    @registry.command(f"{ns}.corrupt_tail", validate=False)
    def corrupt_tail() -> str:
        # As a command: its answer goes out on the other ring, and the parent's next send
        # (after this answer) meets the bad tail. (A head is broken by the event instead: a
        # reply written after it would publish a good head over the bad one.)
        corrupt("tail_ahead")
        return "done"
