"""Native channels: their I/O runs in Rust, without the GIL.

Two transports, both carrying length-prefixed spec-v1 frames (msgpack by default, after a
hello frame that checks both ends agree on the protocol version and the encoding):

* ``"shm"``: two single-producer/single-consumer rings in a shared-memory segment (a
  ``memfd``: nothing appears in ``/dev/shm``, and the kernel frees it when the last process
  holding it exits, even after a crash), plus a Unix socket used as doorbell and liveness
  signal. Readers spin briefly, then park on the socket; the writer rings only when the
  reader is parked.
* ``"pipe"``: the frames travel over the Unix stream socket itself.

A :class:`NativeChannel` only describes one end (its descriptors); register it with
:meth:`CommandRegistry.register_channel`, which hands the descriptors to the registry's
native core (which duplicates them) and closes this object's copies. The peer dying is seen
at once as end-of-file on the socket: every call waiting on the channel fails with
``channel_disconnected``. The contract of :mod:`cmd_ipc.channels.base` holds.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Literal

from cmd_ipc import _core
from cmd_ipc.channels.base import Encoding

__all__ = ["DEFAULT_RING_SIZE", "NativeChannel", "Transport"]

#: Transports of native channels.
Transport = Literal["shm", "pipe"]
#: Default capacity of each ring of a shm channel, in bytes.
DEFAULT_RING_SIZE = 1 << 20


class NativeChannel:
    """One end of a native channel, as descriptors.

    Args:
        id: The name under which the registry holding this end knows the peer.
        sock_fd: A connected Unix stream socket.
        transport: ``"shm"`` or ``"pipe"``.
        shm_fd: The segment's descriptor (``"shm"`` only).
        side: ``0`` for the end that created the segment, ``1`` for the other.
        encoding: Frame encoding; both ends must agree (checked by the hello frame).

    Example:
        >>> a, b = NativeChannel.pair("worker", "main", transport="pipe")
        >>> (a.id, b.id, a.transport)
        ('worker', 'main', 'pipe')
        >>> a.close_fds(); b.close_fds()
    """

    def __init__(
        self,
        id: str,
        *,
        sock_fd: int,
        transport: Transport = "shm",
        shm_fd: int | None = None,
        side: int = 0,
        encoding: Encoding = "msgpack",
    ) -> None:
        if not isinstance(id, str) or not id:
            raise ValueError("a channel id must be a non-empty string")
        if transport not in ("shm", "pipe"):
            raise ValueError(f"unknown transport {transport!r}: expected 'shm' or 'pipe'")
        if transport == "shm" and shm_fd is None:
            raise ValueError("a shm channel needs shm_fd")
        if side not in (0, 1):
            raise ValueError("side must be 0 or 1")
        self.id = id
        self.sock_fd = sock_fd
        self.transport: Transport = transport
        self.shm_fd = shm_fd if transport == "shm" else None
        self.side = side
        self.encoding: Encoding = encoding

    @classmethod
    def pair(
        cls,
        a_id: str,
        b_id: str,
        *,
        transport: Transport = "shm",
        ring_size: int = DEFAULT_RING_SIZE,
        encoding: Encoding = "msgpack",
    ) -> tuple[NativeChannel, NativeChannel]:
        """Creates both ends of a new channel (``a.id == a_id``, ``b.id == b_id``).

        Give ``b``'s descriptors to another process (``subprocess`` ``pass_fds``, or
        ``socket.send_fds``) and register ``a`` here; or register both in one process.
        """
        s_a, s_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        shm_fd = _core.create_segment(ring_size) if transport == "shm" else None
        shm_b = None if shm_fd is None else os.dup(shm_fd)
        a = cls(a_id, sock_fd=s_a.detach(), transport=transport, shm_fd=shm_fd, side=0,
                encoding=encoding)  # fmt: skip
        b = cls(b_id, sock_fd=s_b.detach(), transport=transport, shm_fd=shm_b, side=1,
                encoding=encoding)  # fmt: skip
        return a, b

    def fds(self) -> list[int]:
        """The descriptors of this end (to pass to another process)."""
        return [self.sock_fd] if self.shm_fd is None else [self.sock_fd, self.shm_fd]

    def describe(self) -> dict[str, object]:
        """A JSON-able description of this end (descriptor numbers included), for a child
        process that inherits the descriptors; see :meth:`from_description`."""
        return {
            "id": self.id,
            "sock_fd": self.sock_fd,
            "transport": self.transport,
            "shm_fd": self.shm_fd,
            "side": self.side,
            "encoding": self.encoding,
        }

    @classmethod
    def from_description(cls, d: dict[str, object]) -> NativeChannel:
        """Rebuilds an end from :meth:`describe` output."""
        return cls(
            str(d["id"]),
            sock_fd=int(d["sock_fd"]),  # type: ignore[call-overload]
            transport=d["transport"],  # type: ignore[arg-type]
            shm_fd=None if d.get("shm_fd") is None else int(d["shm_fd"]),  # type: ignore[call-overload]
            side=int(d.get("side", 0)),  # type: ignore[call-overload]
            encoding=d.get("encoding", "msgpack"),  # type: ignore[arg-type]
        )

    def close_fds(self) -> None:
        """Closes this object's descriptors (a registry that attached it keeps its own)."""
        for fd in self.fds():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sock_fd = -1
        self.shm_fd = None

    def __repr__(self) -> str:
        return f"<NativeChannel id={self.id!r} transport={self.transport!r}>"
