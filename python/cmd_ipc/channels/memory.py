"""In-memory channel: two registries in one process (possibly on two event loops)."""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from cmd_ipc.channels.base import Channel, Encoding, OnClose, OnFrame

__all__ = ["InMemoryChannel"]


class InMemoryChannel(Channel):
    """One end of an in-process connection, made with :meth:`InMemoryChannel.pair`.

    Frames are handed to the peer's event loop with ``call_soon`` (``call_soon_threadsafe``
    when the peer runs on another thread), so a send never re-enters the peer's registry and
    ordering is preserved. Frames sent before the peer starts are buffered until it does.

    Example:
        >>> a, b = InMemoryChannel.pair("worker", "main")
        >>> (a.id, b.id)
        ('worker', 'main')
    """

    def __init__(self, id: str, encoding: Encoding = "msgpack") -> None:
        super().__init__(id, encoding)
        self._peer: InMemoryChannel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._on_frame: OnFrame | None = None
        self._on_close: OnClose | None = None
        self._backlog: deque[bytes] = deque()
        self._closed = False
        self._close_reported = False

    @classmethod
    def pair(
        cls, a_id: str, b_id: str, *, encoding: Encoding = "msgpack"
    ) -> tuple[InMemoryChannel, InMemoryChannel]:
        """Creates two connected ends.

        Args:
            a_id: Id of the first end: register it in the registry that calls its peer
                ``a_id``.
            b_id: Id of the second end, registered in the peer.
            encoding: Frame encoding, ``"msgpack"`` (default) or ``"json"``.

        Returns:
            ``(a, b)`` with ``a.id == a_id`` and ``b.id == b_id``.
        """
        a, b = cls(a_id, encoding), cls(b_id, encoding)
        a._peer, b._peer = b, a
        return a, b

    @property
    def closed(self) -> bool:
        """True once either end has closed."""
        return self._closed

    async def start(self, on_frame: OnFrame, on_close: OnClose) -> None:
        if self._on_frame is not None:
            raise RuntimeError(f"channel {self.id!r} was already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._on_frame, self._on_close = on_frame, on_close
        if self._closed:
            self._report_close("peer closed before this end started")
            return
        while self._backlog:
            on_frame(self._backlog.popleft())

    def send(self, frame: bytes) -> None:
        peer = self._peer
        if self._closed or peer is None or peer._closed:
            return
        peer._post(peer._receive, frame)

    def _post(self, fn: object, *args: object) -> None:
        loop = self._loop
        if loop is None:
            # Not started yet: keep frames in order until it is.
            if args:
                self._backlog.append(args[0])  # type: ignore[arg-type]
            return
        if threading.get_ident() == self._thread:
            loop.call_soon(fn, *args)  # type: ignore[arg-type]
        elif not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)  # type: ignore[arg-type]

    def _receive(self, frame: bytes) -> None:
        if not self._closed and self._on_frame is not None:
            self._on_frame(frame)

    def _peer_closed(self) -> None:
        self._closed = True
        self._report_close("peer closed the channel")

    async def close(self) -> None:
        if self._closed:
            self._report_close(None)
            return
        self._closed = True
        peer = self._peer
        if peer is not None and not peer._closed:
            if peer._loop is None:
                peer._closed = True
            else:
                peer._post(peer._peer_closed)
        self._report_close(None)
