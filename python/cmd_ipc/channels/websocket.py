"""WebSocket channels: a remote registry as a full member of a cmd-ipc tree.

Each spec-v1 message travels as JSON in one WebSocket *text* message, in both directions at
once. A registry behind a :class:`WebSocketChannel` is a real member of the tree: its commands
register up the tree, it receives events, it calls anything, and the channel can be its
``router_channel``. On the server (:mod:`cmd_ipc.server.websocket`), every accepted connection
becomes a :class:`WebSocketServerChannel` of the server's registry, named after the client's
``X-Cmd-Ipc-Id`` handshake header. Frames go to and from the registry as they are: nothing
here decodes them.

* **Limits**: a message larger than ``max_size`` (or a binary message) closes the
  connection, with the reason logged; frames queued for a peer that does not read are
  bounded by ``send_limit``.
* **Liveness**: WebSocket pings every ``ping_interval`` seconds; a peer that does not answer
  within ``ping_timeout`` (plus ``close_timeout`` for the closing handshake) is dropped.
* **Reconnect**: a client whose connection is lost reconnects with bounded exponential
  backoff; its registry then attaches it again and re-registers its commands. Calls that
  waited on the lost connection fail with ``channel_disconnected`` at once.

Logging goes to the ``cmd_ipc.websocket`` logger.

Example:
    On a remote machine, a registry joins the tree of a hub served with
    :func:`cmd_ipc.server.websocket.serve_websocket`::

        edge = CommandRegistry("edge", router_channel="hub")
        await edge.register_channel(
            WebSocketChannel("hub", "ws://hub.example:8765", token="s3cret", client_id="edge")
        )
        await edge.register_command("edge.read", read)  # the hub can call it now
        total = await edge.execute_command("calc.add", {"a": 1, "b": 2})  # anywhere in the tree
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import ssl as _ssl
from collections.abc import Mapping
from typing import Any

from cmd_ipc._expose import Exposure, PeerFilter
from cmd_ipc._optional import require
from cmd_ipc.channels.base import Channel, OnClose, OnFrame
from cmd_ipc.errors import ChannelDisconnectedError

require("websockets", "ws", "WebSocketChannel")

from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.asyncio.connection import Connection  # noqa: E402
from websockets.asyncio.server import ServerConnection  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidURI  # noqa: E402
from websockets.frames import CloseCode, Frame, Opcode  # noqa: E402
from websockets.protocol import State  # noqa: E402
from websockets.uri import parse_uri  # noqa: E402

__all__ = [
    "CLOSE_REPLACED",
    "DEFAULT_MAX_SIZE",
    "DEFAULT_SEND_LIMIT",
    "ID_HEADER",
    "WebSocketChannel",
    "WebSocketServerChannel",
]

logger = logging.getLogger("cmd_ipc.websocket")

#: Handshake header with which a client names itself; the server registry's channel to the
#: client gets this id.
ID_HEADER = "X-Cmd-Ipc-Id"
#: Default maximum size of one incoming message, in bytes (16 MiB).
DEFAULT_MAX_SIZE = 16 * 1024 * 1024
#: Default maximum of bytes queued for a peer that does not read (64 MiB).
DEFAULT_SEND_LIMIT = 64 * 1024 * 1024
#: Close code (private range) a server sends on a connection replaced by a newer connection
#: with the same id; a client closed with it does not reconnect.
CLOSE_REPLACED = 4000

#: Close codes after which a client does not reconnect: the server refused it for good.
_FINAL_CODES = frozenset({int(CloseCode.POLICY_VIOLATION), CLOSE_REPLACED})
#: What a channel id sent in the handshake may look like: visible ASCII, bounded.
_ID = re.compile(r"[\x21-\x7e]{1,256}")


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{what} must be 1 to 256 visible ASCII characters, got {value!r}")
    return value


def _check_positive(value: float | None, what: str) -> float | None:
    if value is not None and not value > 0:
        raise ValueError(f"{what} must be a positive number of seconds or None, got {value!r}")
    return value


def _describe_closed(e: ConnectionClosed) -> str:
    if e.rcvd is not None:
        return f"the peer closed the connection: {e.rcvd}"
    if e.sent is not None:
        return f"the connection was closed: {e.sent}"
    cause = e.__cause__
    return f"the connection was lost: {cause or 'no close frame'}"


def _describe_error(e: BaseException) -> str:
    return str(e) or type(e).__name__


#: Bytes already buffered in the socket's transport under which a frame is written at once
#: rather than queued for the writer task (which waits for the buffer to drain).
_DIRECT_WRITE_LIMIT = 64 * 1024
#: Why a connection that sent a binary message is closed.
_BINARY_REASON = "the peer sent a binary message: spec-v1 JSON travels in text messages"


class _Sink:
    """Takes the data frames of a connection as the protocol parses them, in the event
    loop's data callback, instead of letting websockets queue them for ``recv()``: a text
    message reaches the registry without waking a reader task. Frames that arrive before a
    channel takes the connection are kept, in order, and handed over when it does.

    Binary messages (not spec-v1) are reported as an error; ``recv()`` is then only used to
    learn that the connection closed.
    """

    __slots__ = ("backlog", "deliver", "error", "fragments")

    def __init__(self) -> None:
        self.backlog: list[bytes] = []
        self.deliver: OnFrame | None = None
        self.error: str | None = None
        self.fragments: list[bytes] | None = None

    def take(self, event: Frame) -> bool:
        """Handles a data frame; False for anything else (left to websockets)."""
        op = event.opcode
        if op is Opcode.TEXT:
            if event.fin:
                self._message(bytes(event.data))
            else:
                self.fragments = [bytes(event.data)]
            return True
        if op is Opcode.CONT:
            if self.fragments is None:  # the continuation of a binary message
                return True
            self.fragments.append(bytes(event.data))
            if event.fin:
                data, self.fragments = b"".join(self.fragments), None
                self._message(data)
            return True
        if op is Opcode.BINARY:
            if self.error is None:
                self.error = _BINARY_REASON
                if self.deliver is not None:
                    self.deliver(b"")  # the channel sees the error at once
            return True
        return False

    def _message(self, data: bytes) -> None:
        if self.error is not None:
            return
        if self.deliver is None:
            self.backlog.append(data)
        else:
            self.deliver(data)


#: Seconds a connection may stay unable to write, its socket's buffer not draining at all,
#: before it is closed; see :class:`_SinkConnection`.
STALL_TIMEOUT = 30.0

#: Bytes that may wait in a connection's socket buffer, control frames included (the pongs
#: to a ping flood that is never read, say); beyond them the connection is closed.
MAX_BACKLOG = 2 * DEFAULT_SEND_LIMIT


class _SinkConnection(Connection):
    """Mixed into a client or server connection: its data frames go to a :class:`_Sink`.
    (The handshake's request or response is not a :class:`Frame`: it goes on as before.)

    Its outgoing bytes are bounded, control frames included: data frames wait in the
    channel's queue (``send_limit``) while the socket is full, but websockets answers each
    ping with a pong written at once; a connection with more than :attr:`max_backlog`
    bytes waiting in its socket buffer is closed, and so is one whose buffer has not
    drained at all for :attr:`stall_timeout` seconds while full (its peer reads nothing).
    Either sets ``stalled``. Reading is never paused for it: two peers sending each other
    large messages at once would then wait for each other for ever."""

    #: Bytes that may wait in the socket buffer (see the class doc).
    max_backlog: int = MAX_BACKLOG
    #: Seconds the socket may stay full without draining (see the class doc).
    stall_timeout: float = STALL_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sink = _Sink()
        #: Set when it was closed for its backlog (see the class doc).
        self.stalled = False
        self._stall: asyncio.TimerHandle | None = None
        self._stall_size = 0

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        transport = self.transport
        if transport.is_closing():
            return
        waiting = transport.get_write_buffer_size()
        if waiting > self.max_backlog:
            self._drop(f"{waiting} bytes wait to be sent (max_backlog {self.max_backlog})")

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall_size = self.transport.get_write_buffer_size()
            self._stall = asyncio.get_running_loop().call_later(
                self.stall_timeout, self._check_stall
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _check_stall(self) -> None:
        self._stall = None
        if not self.paused or self.transport.is_closing():
            return
        waiting = self.transport.get_write_buffer_size()
        if waiting < self._stall_size:
            # It drained some (a slow reader, not a dead one): watch on.
            self._stall_size = waiting
            self._stall = asyncio.get_running_loop().call_later(
                self.stall_timeout, self._check_stall
            )
            return
        self._drop(f"nothing was read for {self.stall_timeout:g} s ({waiting} bytes wait)")

    def _drop(self, why: str) -> None:
        self.stalled = True
        logger.warning("WebSocket peer %s disconnected (1008): %s", self.remote_address, why)
        # A close frame would wait behind what the peer does not read: end the connection.
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        super().connection_lost(exc)

    def process_event(self, event: Any) -> None:
        if not isinstance(event, Frame) or not self.sink.take(event):
            super().process_event(event)


class _SinkClientConnection(_SinkConnection, ClientConnection):
    """A client connection whose data frames go to a :class:`_Sink`."""


class _SinkServerConnection(_SinkConnection, ServerConnection):
    """A server connection whose data frames go to a :class:`_Sink`."""


class _Link:
    """One WebSocket connection carried by a channel: its reader and writer tasks."""

    __slots__ = (
        "closer",
        "ended",
        "opened_at",
        "queue",
        "queued",
        "reader",
        "reported",
        "writer",
        "ws",
    )

    def __init__(self, ws: Connection) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.queued = 0
        self.reader: asyncio.Task[None] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.closer: asyncio.Future[None] | None = None
        self.reported = False
        self.ended = asyncio.Event()
        self.opened_at = asyncio.get_running_loop().time()


class _WebSocketBase(Channel):
    """What both ends share: frames as text messages, ordering, close and loss reporting."""

    def __init__(self, id: str, *, close_timeout: float | None, send_limit: int) -> None:
        super().__init__(id, "json")
        if not isinstance(send_limit, int) or send_limit <= 0:
            raise ValueError(f"send_limit must be a positive number of bytes, got {send_limit!r}")
        self.close_timeout = _check_positive(close_timeout, "close_timeout")
        self.send_limit = send_limit
        self._link: _Link | None = None
        self._on_frame: OnFrame | None = None
        self._on_close: OnClose | None = None
        self._closed = False
        self._closing: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ state

    @property
    def connection(self) -> Connection | None:
        """The current ``websockets`` connection (for ``remote_address``, ``latency``,
        ``request`` headers...), or ``None`` between connections and after close."""
        link = self._link
        return None if link is None else link.ws

    @property
    def connected(self) -> bool:
        """True while a connection is open."""
        link = self._link
        return link is not None and link.ws.state is State.OPEN

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    # ------------------------------------------------------------------ one connection

    def _attach(self, ws: Connection, on_frame: OnFrame, on_close: OnClose) -> None:
        self._on_frame, self._on_close = on_frame, on_close
        link = _Link(ws)
        self._link = link
        link.reader = asyncio.ensure_future(self._read(link))
        link.writer = asyncio.ensure_future(self._write(link))
        sink: _Sink | None = getattr(ws, "sink", None)
        if sink is not None:
            # Frames that came before this channel took the connection first, in order.
            backlog, sink.backlog = sink.backlog, []
            sink.deliver = lambda frame: self._sunk(link, sink, frame)
            for frame in backlog:
                self._sunk(link, sink, frame)
            if sink.error is not None:
                self._sunk(link, sink, b"")

    def _sunk(self, link: _Link, sink: _Sink, frame: bytes) -> None:
        """A text message from the connection's sink (or its error, with ``b""``)."""
        if self._closed or link.reported:
            return
        if sink.error is None:
            self._deliver(frame)
            return
        # The close handshake starts first: once the loss is reported, the server's
        # connection handler returns, which would close with 1000.
        link.closer = asyncio.ensure_future(
            link.ws.close(CloseCode.UNSUPPORTED_DATA, "binary messages are not supported")
        )
        self._lost(link, sink.error)

    def send(self, frame: bytes) -> None:
        link = self._link
        if self._closed or link is None or link.reported:
            return
        link.queued += len(frame)
        if link.queued > self.send_limit:
            self._abort(
                link,
                f"more than {self.send_limit} bytes are queued for sending: the peer does not "
                "read (send_limit)",
            )
            return
        ws = link.ws
        if (
            link.queue.empty()
            and ws.send_in_progress is None
            and ws.protocol.state is State.OPEN
            and ws.transport.get_write_buffer_size() < _DIRECT_WRITE_LIMIT
        ):
            # Nothing is waiting to be written: write now, as websockets' own send() does,
            # without a round through the writer task (which would only add a loop turn per
            # message). The writer takes over whenever frames pile up or the socket is full,
            # and then keeps their order: it writes everything it dequeues before this
            # path can run again.
            try:
                ws.protocol.send_text(frame)
                ws.send_data()
            except Exception as e:
                self._abort(link, f"sending failed: {_describe_error(e)}")
            link.queued -= len(frame)
            return
        link.queue.put_nowait(frame)

    async def _write(self, link: _Link) -> None:
        try:
            while True:
                frame = await link.queue.get()
                if frame is None:
                    return
                link.queued -= len(frame)
                # Our frames are UTF-8 JSON: sent as text without decoding them first.
                await link.ws.send(frame, text=True)
        except ConnectionClosed:
            pass  # the reader reports the close
        except Exception as e:
            logger.exception("channel %r: sending failed", self.id)
            self._abort(link, f"sending failed: {_describe_error(e)}")

    async def _read(self, link: _Link) -> None:
        reason: str | None = None
        ws = link.ws
        try:
            while True:
                message = await ws.recv()
                if self._closed or link.reported:
                    continue  # closing: drain until the close handshake ends
                if isinstance(message, str):
                    self._deliver(message.encode())
                    continue
                reason = _BINARY_REASON
                self._lost(link, reason)
                await ws.close(CloseCode.UNSUPPORTED_DATA, "binary messages are not supported")
                return
        except ConnectionClosed as e:
            reason = _describe_closed(e)
        except asyncio.CancelledError:
            reason = "reading was cancelled"
            raise
        except Exception as e:
            logger.exception("channel %r: reading failed", self.id)
            reason = f"reading failed: {_describe_error(e)}"
            ws.transport.abort()
        finally:
            self._lost(link, reason)

    def _deliver(self, frame: bytes) -> None:
        on_frame = self._on_frame
        if on_frame is None:
            return
        try:
            on_frame(frame)
        except Exception:
            logger.exception("channel %r: the registry failed on a frame", self.id)

    def _abort(self, link: _Link, reason: str) -> None:
        """Drops a connection that cannot go on (no closing handshake: it would stall)."""
        self._lost(link, reason)
        link.ws.transport.abort()

    def _lost(self, link: _Link, reason: str | None) -> None:
        """Reports the end of ``link`` once: the registry fails calls waiting on it."""
        if link.reported:
            return
        link.reported = True
        link.ended.set()
        writer = link.writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()
        if self._link is link:
            self._link = None
        if self._closed:
            reason = None
        self._connection_ended(link, reason)
        on_close = self._on_close
        if on_close is not None:
            on_close(reason)

    def _connection_ended(self, link: _Link, reason: str | None) -> None:
        """Hook: a subclass logs the loss and prepares for what comes next."""

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Closes the channel: flushes what was sent, then the closing handshake (each
        bounded by ``close_timeout``). Idempotent; ``on_close(None)`` has run when this
        returns."""
        await self._close(CloseCode.NORMAL_CLOSURE, "")

    async def _close(self, code: int, reason: str) -> None:
        await asyncio.shield(self._close_soon(code, reason))

    def _close_soon(self, code: int, reason: str, *, detach: bool = False) -> asyncio.Future[None]:
        """Starts closing (once); with ``detach``, reports the close at once instead of after
        the closing handshake, which a half-dead peer would make last ``close_timeout``."""
        if self._closing is None:
            self._closed = True
            link = self._link
            if detach and link is not None:
                self._lost(link, None)
            self._closing = asyncio.ensure_future(self._shutdown(link, code, reason))
        return self._closing

    async def _shutdown(self, link: _Link | None, code: int, reason: str) -> None:
        if link is None:
            return
        writer, reader = link.writer, link.reader
        if writer is not None and not link.reported:
            link.queue.put_nowait(None)  # the writer stops once what was queued is sent
            try:
                await asyncio.wait_for(asyncio.shield(writer), self.close_timeout)
            except asyncio.TimeoutError:
                writer.cancel()
        await link.ws.close(code, reason)  # bounded by close_timeout, then aborted
        self._lost(link, None)
        tasks = [t for t in (writer, reader) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self.connected else "disconnected"
        return f"<{type(self).__name__} id={self.id!r} {state}>"


class WebSocketChannel(_WebSocketBase):
    """The client end: connects a registry to a registry served over WebSocket.

    Register it in the client's registry; typically it is that registry's
    ``router_channel``, which makes the client a member of the server's tree.
    :meth:`CommandRegistry.register_channel` connects and returns once the server listed its
    commands. When the connection is lost, calls waiting on it fail with
    ``channel_disconnected`` at once; the channel reconnects with bounded exponential
    backoff and its registry attaches it again, registering the client's commands again.

    Args:
        id: The name under which the client's registry knows the server (the client
            registry's ``router_channel`` when the server is its parent).
        url: ``ws://`` or ``wss://`` URL of the server.
        token: Bearer token sent as ``Authorization: Bearer <token>`` on the handshake.
        client_id: The id the server registry gives its channel to this client (sent in the
            ``X-Cmd-Ipc-Id`` header); default a random ``ws-…`` id, kept across reconnects.
            Passing the client registry's id keeps names readable in logs.
        headers: Extra handshake headers.
        max_size: Maximum size of one incoming message, in bytes; a larger one closes the
            connection.
        ping_interval: Seconds between keepalive pings (``None`` disables them).
        ping_timeout: Seconds to wait for a pong before dropping the connection (``None``
            waits forever).
        open_timeout: Seconds allowed for connecting, handshake included.
        close_timeout: Seconds allowed for the closing handshake (and for flushing on
            :meth:`close`); a dead peer is noticed within ``ping_interval + ping_timeout +
            close_timeout``.
        reconnect: Reconnect after a lost connection (sets :attr:`reconnects`).
        max_retries: Failed connection attempts after which reconnecting gives up (``None``:
            never give up).
        backoff: ``(initial, maximum)`` delay in seconds before a reconnection attempt; the
            delay doubles after each attempt, up to the maximum, with random jitter.
        send_limit: Maximum bytes queued for a server that does not read; beyond it the
            connection is dropped.
        ssl: TLS context for ``wss://`` URLs (default: the system's trust store).
        connect_options: Further keyword arguments for ``websockets.asyncio.client.connect``
            (``proxy``, ``origin``, ``compression="deflate"`` to offer permessage-deflate,
            which is off by default: small messages cost more to compress than they save).

    Raises:
        ValueError: An invalid URL, id or option.

    Example:
        >>> ch = WebSocketChannel("hub", "ws://127.0.0.1:8765", client_id="edge")
        >>> (ch.id, ch.client_id, ch.encoding, ch.reconnects)
        ('hub', 'edge', 'json', True)
    """

    wait_for_commands = True

    def __init__(
        self,
        id: str,
        url: str,
        *,
        token: str | None = None,
        client_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_size: int | None = DEFAULT_MAX_SIZE,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        open_timeout: float | None = 10.0,
        close_timeout: float | None = 5.0,
        reconnect: bool = True,
        max_retries: int | None = 20,
        backoff: tuple[float, float] = (0.1, 5.0),
        send_limit: int = DEFAULT_SEND_LIMIT,
        ssl: _ssl.SSLContext | None = None,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(id, close_timeout=close_timeout, send_limit=send_limit)
        try:
            parse_uri(url)
        except InvalidURI as e:
            raise ValueError(str(e)) from None
        if max_retries is not None and (not isinstance(max_retries, int) or max_retries < 0):
            raise ValueError(f"max_retries must be a non-negative int or None, got {max_retries}")
        initial, maximum = backoff
        if not 0 < initial <= maximum:
            raise ValueError("backoff must be (initial, maximum) with 0 < initial <= maximum")
        if max_size is not None and max_size <= 0:
            raise ValueError("max_size must be a positive number of bytes or None")
        self.url = url
        self.client_id = _check_id(
            client_id if client_id is not None else f"ws-{random.getrandbits(48):012x}",
            "client_id",
        )
        self.reconnects = bool(reconnect)
        self.max_retries = max_retries
        self.backoff = (float(initial), float(maximum))
        self.max_size = max_size
        self.ping_interval = _check_positive(ping_interval, "ping_interval")
        self.ping_timeout = _check_positive(ping_timeout, "ping_timeout")
        self.open_timeout = _check_positive(open_timeout, "open_timeout")
        hdrs: dict[str, str] = dict(headers or {})
        hdrs[ID_HEADER] = self.client_id
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        self._headers = hdrs
        self._options: dict[str, Any] = {"compression": None, **(connect_options or {})}
        if ssl is not None:
            self._options["ssl"] = ssl
        #: A connection made by :meth:`reconnect`, taken by the next :meth:`start`.
        self._pending: ClientConnection | None = None
        #: Set by :meth:`close` to cut a backoff sleep short.
        self._wakeup: asyncio.Event | None = None
        #: Consecutive short-lived connections: the next backoff delay grows with it.
        self._delay_step = 0
        #: The server refused this client for good (bad token, replaced): no reconnect.
        self._final = False

    async def start(self, on_frame: OnFrame, on_close: OnClose) -> None:
        """Connects (or takes the connection :meth:`reconnect` made) and starts reading.

        Raises:
            ChannelDisconnectedError: The connection failed (refused, HTTP 401, timeout...);
                the cause is chained.
            RuntimeError: The channel is already running.
        """
        if self._closed:
            raise ChannelDisconnectedError(f"channel {self.id!r} was closed")
        if self._link is not None:
            raise RuntimeError(f"channel {self.id!r} was already started")
        ws, self._pending = self._pending, None
        if ws is None:
            self._final = False
            ws = await self._connect()
            if self._closed:
                await ws.close()
                raise ChannelDisconnectedError(f"channel {self.id!r} was closed")
        logger.info("channel %r connected to %s as %r", self.id, self.url, self.client_id)
        self._attach(ws, on_frame, on_close)

    async def _connect(self) -> ClientConnection:
        try:
            return await connect(
                self.url,
                create_connection=_SinkClientConnection,
                additional_headers=self._headers,
                max_size=self.max_size,
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_timeout,
                open_timeout=self.open_timeout,
                close_timeout=self.close_timeout,
                **self._options,
            )
        except Exception as e:
            raise ChannelDisconnectedError(
                f"channel {self.id!r} could not connect to {self.url}: {_describe_error(e)}"
            ) from e

    def _connection_ended(self, link: _Link, reason: str | None) -> None:
        if reason is None:
            logger.info("channel %r to %s closed", self.id, self.url)
            return
        code = link.ws.close_code
        if code in _FINAL_CODES:
            self._final = True
        # A connection that did not last resets nothing: a flapping server gets slower
        # retries rather than a tight loop.
        if asyncio.get_running_loop().time() - link.opened_at >= self.backoff[1]:
            self._delay_step = 0
        logger.warning("channel %r to %s lost: %s", self.id, self.url, reason)

    def _next_delay(self) -> float:
        initial, maximum = self.backoff
        delay = min(maximum, initial * 2.0 ** min(self._delay_step, 32))
        self._delay_step += 1
        return delay * (0.5 + random.random() / 2)

    async def reconnect(self) -> bool:
        """Connects again after a lost connection, with bounded exponential backoff.

        Returns:
            True once connected (the registry then calls :meth:`start`, which takes this
            connection); False when :attr:`max_retries` attempts failed, the channel was
            closed, reconnecting is disabled, or the server refused this client for good
            (close code 1008 or :data:`CLOSE_REPLACED`).
        """
        if not self.reconnects or self._closed:
            return False
        if self._final:
            logger.warning("channel %r: the server refused this client; not reconnecting", self.id)
            return False
        if self._pending is not None:
            return True
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        failures = 0
        while self.max_retries is None or failures < self.max_retries:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._next_delay())
            if self._closed:
                return False
            try:
                ws = await self._connect()
            except ChannelDisconnectedError as e:
                failures += 1
                logger.info("channel %r: reconnection attempt %d failed: %s", self.id, failures, e)
                continue
            if self._closed:
                await ws.close()
                return False
            self._pending = ws
            logger.info("channel %r reconnected to %s", self.id, self.url)
            return True
        logger.warning(
            "channel %r gave up reconnecting to %s after %d failed attempts",
            self.id,
            self.url,
            failures,
        )
        return False

    async def _shutdown(self, link: _Link | None, code: int, reason: str) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending.close()
        await super()._shutdown(link, code, reason)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]} url={self.url!r}>"


class WebSocketServerChannel(_WebSocketBase):
    """The server end of one accepted connection, made by :class:`WebSocketHandler`.

    Its id is the client's ``X-Cmd-Ipc-Id`` header (or ``ws-<n>``). It does not reconnect:
    the client does, and arrives as a new connection.

    With an ``exposure`` that restricts what the server shows (the ``expose=`` of
    :func:`~cmd_ipc.server.websocket.serve_websocket`), the command lists sent to the
    client leave out the hidden commands, a call of one from the client is answered
    ``not_found`` here (it never reaches the registry), and ``not_found`` answers carry no
    "did you mean" hint. The client's registration of a hidden id is answered ``ok`` as
    for a free one (not ``duplicate_command``, which would tell it the id exists), though
    it stays refused. The frames of such a channel go through a
    :class:`~cmd_ipc._expose.PeerFilter`, which decodes every one to do so (a type spelled
    with JSON escapes is the same type); without it, nothing here decodes them.
    """

    def __init__(
        self,
        id: str,
        connection: ServerConnection,
        *,
        close_timeout: float | None = 5.0,
        send_limit: int = DEFAULT_SEND_LIMIT,
        exposure: Exposure | None = None,
    ) -> None:
        super().__init__(id, close_timeout=close_timeout, send_limit=send_limit)
        self._connection = connection
        self._started = False
        self._filter = (
            PeerFilter(exposure) if exposure is not None and exposure.restricted else None
        )

    async def start(self, on_frame: OnFrame, on_close: OnClose) -> None:
        if self._started:
            raise RuntimeError(f"channel {self.id!r} was already started")
        self._started = True
        self._attach(self._connection, on_frame, on_close)

    async def close(self) -> None:
        """Closes the connection with close code 1001 (going away): the client reconnects
        later, if it does. Idempotent; ``on_close(None)`` has run when this returns."""
        await self._close(CloseCode.GOING_AWAY, "closed by the server")

    def send_with_head(
        self, frame: bytes, kind: str, message_id: str, reference: str | None
    ) -> None:
        peer_filter = self._filter
        if peer_filter is not None:
            frame = peer_filter.outgoing(frame, kind, reference)
        self.send(frame)

    def _deliver(self, frame: bytes) -> None:
        peer_filter = self._filter
        if peer_filter is not None:
            # Always decoded there: a type or id spelled with JSON escapes is the same
            # message to the registry, so nothing is skipped on what the raw bytes say.
            answer = peer_filter.incoming(frame)
            if answer is not None:
                # Answered here, as the registry answers a command it does not know.
                self.send(answer)
                return
        super()._deliver(frame)

    async def wait_closed(self) -> None:
        """Returns once the connection ended (it must have been started)."""
        link = self._link
        if link is not None:
            await link.ended.wait()

    def _connection_ended(self, link: _Link, reason: str | None) -> None:
        level = logging.INFO if reason is None or "1000 (OK)" in reason else logging.WARNING
        logger.log(
            level,
            "connection %r from %s ended: %s",
            self.id,
            link.ws.remote_address,
            reason or "closed locally",
        )
