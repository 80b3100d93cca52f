"""The contract every channel follows, written once.

A *channel* is one end of a connection between two registries. Its ``id`` is the name under
which the registry holding it knows the peer (as in the TypeScript implementation): register
``InMemoryChannel.pair("worker", "main")[0]`` in ``main`` and the other end in ``worker``.

Frames are opaque ``bytes``, each one complete spec-v1 message encoded with the channel's
``encoding`` (``"json"`` for peers in other languages and text transports, ``"msgpack"``
between our own processes). The registry's Rust router decodes and encodes them; a channel
never looks inside.

Contract:

* **start** -- :meth:`Channel.start` is awaited once, by
  :meth:`CommandRegistry.register_channel`, with two callbacks (again after each successful
  :meth:`Channel.reconnect` for a reconnecting channel). From then on the channel calls
  ``on_frame(frame)`` for every frame from the peer and ``on_close(reason)`` exactly once when
  the connection ends for any reason (local close, peer close, transport failure). Both
  callbacks are called on the registry's event loop thread, never concurrently.
* **ordering** -- frames are delivered to the peer in the order :meth:`Channel.send` was called,
  each exactly once or not at all (never duplicated, never reordered, never split or merged).
* **send** -- :meth:`Channel.send` never blocks and never raises for transport reasons: it
  queues the frame. The registry calls it through :meth:`Channel.send_with_head`, which also
  gives the frame's type, id and reference, read by Rust before encoding. A frame sent
  after the channel closed is dropped silently; the registry learns of the close through
  ``on_close``.
* **close** -- :meth:`Channel.close` is idempotent. After it returns no more ``on_frame``
  calls are made and ``on_close`` has been called. The peer's channel reports ``on_close``
  too, promptly.
* **reconnecting** -- a channel with ``reconnects`` set still reports every lost connection
  with ``on_close`` (so waiting calls fail at once); its registry then awaits
  :meth:`Channel.reconnect` and, when it returns True, starts the same object again.
* **in-flight messages** -- frames queued but not yet delivered when the channel closes may be
  lost. Nothing waits on them forever: each registry fails every call that waited on the
  closed channel with ``channel_disconnected`` as soon as ``on_close`` runs.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Literal

__all__ = ["Channel", "Encoding", "OnClose", "OnFrame"]

#: Encodings a channel may carry.
Encoding = Literal["json", "msgpack"]
#: Called with each frame received from the peer.
OnFrame = Callable[[bytes], None]
#: Called once when the channel ends, with a reason (``None`` for an orderly close).
OnClose = Callable[[str | None], None]


class Channel(abc.ABC):
    """Base class for channels written in Python (in-memory, HTTP, WebSocket...).

    Subclasses set :attr:`id` and :attr:`encoding` and implement :meth:`start`,
    :meth:`send` and :meth:`close` following the module's contract.

    Attributes:
        id: The name under which the registry holding this channel knows the peer.
        encoding: ``"json"`` or ``"msgpack"``: how frames on this channel are encoded.
    """

    id: str
    encoding: Encoding
    #: When true, :meth:`CommandRegistry.register_channel` returns only once the peer has
    #: answered the command list request, so its commands are callable at once (channels to
    #: remote services set it).
    wait_for_commands: bool = False
    #: When true, a channel that ended for a reason other than a local close is given back
    #: to its registry after :meth:`reconnect` succeeds: the registry calls :meth:`start`
    #: again (and, for its router channel, registers its subtree's commands again). Calls
    #: that waited on the lost connection still fail with ``channel_disconnected`` at once.
    reconnects: bool = False

    def __init__(self, id: str, encoding: Encoding = "json") -> None:
        if not isinstance(id, str) or not id:
            raise ValueError("a channel id must be a non-empty string")
        if encoding not in ("json", "msgpack"):
            raise ValueError(f"unknown encoding {encoding!r}: expected 'json' or 'msgpack'")
        self.id = id
        self.encoding = encoding

    @abc.abstractmethod
    async def start(self, on_frame: OnFrame, on_close: OnClose) -> None:
        """Starts delivering the peer's frames to ``on_frame``.

        Args:
            on_frame: Called with each frame from the peer, in order, on the loop thread.
            on_close: Called exactly once when the channel ends, with a reason or ``None``.
        """

    @abc.abstractmethod
    def send(self, frame: bytes) -> None:
        """Queues one encoded frame for the peer; never blocks, never raises once closed."""

    def send_with_head(
        self, frame: bytes, kind: str, message_id: str, reference: str | None
    ) -> None:
        """:meth:`send` with what the registry knows of the frame without decoding it: its
        spec ``type`` (``kind``), its ``id``, and ``reference`` (a response's ``thid``, the
        command of an execute or register request, the event id of an event; ``None`` for
        a list request). The registry always sends through this method; the default calls
        :meth:`send`. A channel that routes by these (HTTP) overrides it instead of parsing
        the frame again."""
        self.send(frame)

    @abc.abstractmethod
    async def close(self) -> None:
        """Closes the channel (idempotent); ``on_close`` has run when this returns."""

    #: The close callback given to :meth:`start`, and whether it was called.
    _on_close: OnClose | None = None
    _close_reported: bool = False

    def _report_close(self, reason: str | None) -> None:
        """Calls the close callback once (no-op before :meth:`start`)."""
        if not self._close_reported and self._on_close is not None:
            self._close_reported = True
            self._on_close(reason)

    async def reconnect(self) -> bool:
        """Only for channels with :attr:`reconnects` set: after the connection was lost, tries
        to connect again (with the channel's own bounded backoff) and returns True once
        :meth:`start` may be called again, False when it gave up or was closed locally."""
        return False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.id!r} encoding={self.encoding!r}>"
