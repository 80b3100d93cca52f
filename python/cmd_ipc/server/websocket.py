"""The WebSocket server of cmd-ipc: every accepted connection becomes a channel of a registry.

:func:`serve_websocket` (or :class:`WebSocketHandler` inside your own ``websockets`` server)
turns every accepted connection into a :class:`~cmd_ipc.channels.websocket.WebSocketServerChannel`
of the server's registry, named after the client's ``X-Cmd-Ipc-Id`` handshake header; the
client side is :class:`~cmd_ipc.WebSocketChannel` (see :mod:`cmd_ipc.channels.websocket` for
the wire, the limits and liveness).

* **Auth**: with ``token`` set, the server requires ``Authorization: Bearer <token>`` on the
  opening handshake and answers HTTP 401 otherwise; the connection never becomes a channel.
* **Exposure**: ``expose`` narrows the commands clients may list and call (by default every
  public command the registry can reach); a hidden command is never listed and a call of it
  is answered ``not_found``, as for a command that does not exist.

Logging goes to the ``cmd_ipc.websocket`` logger.

Example:
    On the hub::

        hub = CommandRegistry("hub")
        async with await serve_websocket(hub, "0.0.0.0", 8765, token="s3cret") as server:
            ...  # serve until told to stop
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import ssl as _ssl
from collections.abc import Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cmd_ipc._expose import Expose, Exposure
from cmd_ipc._optional import require
from cmd_ipc.server._endpoint import check_token_ascii, reserved_channel_id

require("websockets", "ws", "the WebSocket server (cmd_ipc.server.websocket)")

from websockets.asyncio.server import Server, ServerConnection, serve  # noqa: E402
from websockets.datastructures import Headers  # noqa: E402
from websockets.frames import CloseCode  # noqa: E402
from websockets.http11 import Request, Response  # noqa: E402

from cmd_ipc.channels.websocket import (  # noqa: E402
    _ID,
    CLOSE_REPLACED,
    DEFAULT_MAX_SIZE,
    DEFAULT_SEND_LIMIT,
    ID_HEADER,
    WebSocketServerChannel,
    _check_positive,
    _SinkServerConnection,
)

if TYPE_CHECKING:
    from cmd_ipc.registry import CommandRegistry

__all__ = ["WebSocketHandler", "WebSocketServer", "serve_websocket"]

logger = logging.getLogger("cmd_ipc.websocket")

_anonymous = itertools.count(1)


def _single(headers: Headers, name: str) -> str | None:
    """The header's value; ``""`` (never valid) when it is repeated."""
    values = headers.get_all(name)
    if not values:
        return None
    return values[0] if len(values) == 1 else ""


class WebSocketHandler:
    """Accepts WebSocket connections into a registry, inside any ``websockets`` server.

    Pass the handler and its :meth:`process_request` to ``websockets.asyncio.server.serve``
    (or use :func:`serve_websocket`, which does). :meth:`process_request` checks the path,
    the bearer token (HTTP 401) and the client id (HTTP 400, or 409 when a channel of
    another kind has it or the registry keeps it for a channel of its own: its router
    channel's, a worker's) during the handshake; the handler checks them again, so a
    server that forgot the hook still refuses strangers and those ids (close code 1008).

    A connection whose id is still attached (the previous connection of a reconnecting
    client, not yet noticed dead) replaces it: the old one is closed with
    :data:`CLOSE_REPLACED` first.

    Args:
        registry: The registry the connections join.
        token: Bearer token required from clients, ASCII (``None``: no authentication).
        path: Accept only this URL path (``None``: any).
        close_timeout: Seconds allowed for flushing and the closing handshake on close.
        send_limit: Maximum bytes queued for a client that does not read.
        expose: The commands clients may list and call: ``None`` (every public command the
            registry can reach), a glob pattern such as ``"api.*"`` (``*`` matches dots
            too), a list of them, or a predicate ``fn(command_id) -> bool``.

    Raises:
        ValueError: ``token`` is empty or not ASCII (HTTP headers carry ASCII).
        TypeError: ``expose`` is not a pattern, patterns or a predicate.

    Example:
        Inside your own server::

            handler = WebSocketHandler(registry, token="s3cret")
            async with websockets.asyncio.server.serve(
                handler, "0.0.0.0", 8765, process_request=handler.process_request
            ):
                ...
            await handler.close()
    """

    def __init__(
        self,
        registry: CommandRegistry,
        *,
        token: str | None = None,
        path: str | None = None,
        close_timeout: float | None = 5.0,
        send_limit: int = DEFAULT_SEND_LIMIT,
        expose: Expose = None,
    ) -> None:
        if token is not None and not token:
            raise ValueError("token must be a non-empty string or None")
        check_token_ascii(token)
        self.registry = registry
        self.exposure = Exposure(expose, registry.id)
        self.path = path
        self.close_timeout = _check_positive(close_timeout, "close_timeout")
        self.send_limit = send_limit
        self._token = None if token is None else token.encode()
        self._channels: set[WebSocketServerChannel] = set()
        #: Connections dropped for what waited to be sent to them: over
        #: ``channels.websocket.MAX_BACKLOG`` bytes (a ping flood whose pongs the client
        #: never reads, say), or a full socket that did not drain for ``STALL_TIMEOUT`` s.
        self.stalled = 0
        self._lock: asyncio.Lock | None = None
        self._closed = False

    @property
    def channels(self) -> list[WebSocketServerChannel]:
        """The channels of the connections currently served."""
        return list(self._channels)

    def _authorized(self, headers: Headers) -> bool:
        if self._token is None:
            return True
        value = _single(headers, "Authorization")
        if not value:
            return False
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode(), self._token)

    def _path_ok(self, request: Request) -> bool:
        return self.path is None or urlsplit(request.path).path == self.path

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """The ``process_request`` hook: refuses a bad handshake with an HTTP error."""
        if self._closed or self.registry.closed:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server closing\n")
        if not self._path_ok(request):
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if not self._authorized(request.headers):
            # INFO, as the HTTP server's refusals: a client's mistake, not the server's.
            logger.info(
                "refused a connection from %s: missing or invalid bearer token",
                connection.remote_address,
            )
            response = connection.respond(
                HTTPStatus.UNAUTHORIZED, "missing or invalid bearer token\n"
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="cmd-ipc"'
            return response
        client_id = _single(request.headers, ID_HEADER)
        if client_id is not None and not _ID.fullmatch(client_id):
            return connection.respond(HTTPStatus.BAD_REQUEST, f"invalid {ID_HEADER} header\n")
        if client_id is not None:
            refusal = reserved_channel_id(self.registry, client_id)
            other = self.registry.channels.get(client_id)
            if (
                refusal is None
                and other is not None
                and not isinstance(other, WebSocketServerChannel)
            ):
                refusal = f"channel id {client_id!r} is in use"
            if refusal is not None:
                logger.info("refused a connection from %s: %s", connection.remote_address, refusal)
                return connection.respond(HTTPStatus.CONFLICT, f"{refusal}\n")
        return None

    async def __call__(self, connection: ServerConnection) -> None:
        """Serves one connection as a channel of the registry until it ends."""
        request = connection.request
        if request is None or not self._authorized(request.headers):
            await connection.close(CloseCode.POLICY_VIOLATION, "missing or invalid bearer token")
            return
        if not self._path_ok(request):
            await connection.close(CloseCode.POLICY_VIOLATION, "not found")
            return
        client_id = _single(request.headers, ID_HEADER)
        if client_id is not None and not _ID.fullmatch(client_id):
            await connection.close(CloseCode.POLICY_VIOLATION, f"invalid {ID_HEADER} header")
            return
        channel_id = client_id or f"ws-{next(_anonymous)}"
        channel = WebSocketServerChannel(
            channel_id,
            connection,
            close_timeout=self.close_timeout,
            send_limit=self.send_limit,
            exposure=self.exposure,
        )
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            refusal = await self._make_room(channel_id)
            if refusal is None:
                try:
                    await self.registry.register_channel(channel)
                except Exception as e:
                    logger.warning("could not attach connection %r: %s", channel_id, e)
                    refusal = CloseCode.TRY_AGAIN_LATER, "could not attach the connection"
            if refusal is not None:
                code, reason = refusal
                await connection.close(code, reason)
                return
            self._channels.add(channel)
        logger.info("connection %r from %s attached", channel_id, connection.remote_address)
        try:
            await channel.wait_closed()
        finally:
            if getattr(connection, "stalled", False):
                self.stalled += 1
            self._channels.discard(channel)
            closing = channel._closing
            if closing is not None:  # replaced: its closing handshake ends here
                await asyncio.shield(closing)

    async def _make_room(self, channel_id: str) -> tuple[CloseCode, str] | None:
        """Closes a previous connection with the same id; says why not, if it cannot: the
        close code and reason to close this connection with."""
        if self._closed or self.registry.closed:
            return CloseCode.TRY_AGAIN_LATER, "server closing"
        reserved = reserved_channel_id(self.registry, channel_id)
        if reserved is not None:
            # For good (1008: the client does not reconnect), as the 409 of the handshake.
            return CloseCode.POLICY_VIOLATION, reserved
        old = self.registry.channels.get(channel_id)
        if old is None:
            return None
        if not isinstance(old, WebSocketServerChannel):
            return CloseCode.POLICY_VIOLATION, f"channel id {channel_id!r} is in use"
        logger.info("connection %r replaces the previous one with that id", channel_id)
        # Detached at once: the old connection is often half dead (its client reconnected
        # before the server noticed), and its closing handshake would only time out.
        old._close_soon(
            CLOSE_REPLACED, "replaced by a newer connection with the same id", detach=True
        )
        if channel_id in self.registry.channels:
            return CloseCode.TRY_AGAIN_LATER, f"channel id {channel_id!r} is still in use"
        return None

    async def close(self) -> None:
        """Closes every connection this handler attached (their calls fail with
        ``channel_disconnected``) and refuses new ones."""
        self._closed = True
        channels = list(self._channels)
        if channels:
            await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


class WebSocketServer:
    """A running server made by :func:`serve_websocket`.

    Attributes:
        handler: The :class:`WebSocketHandler` serving its connections.
        server: The underlying ``websockets`` server.
    """

    def __init__(self, server: Server, handler: WebSocketHandler, *, secure: bool) -> None:
        self.server = server
        self.handler = handler
        self._secure = secure
        address = server.sockets[0].getsockname()
        self._host: str = address[0]
        self._port: int = address[1]

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The port the server listens on (the one chosen when ``port=0``)."""
        return self._port

    @property
    def url(self) -> str:
        """The URL clients connect to (``ws://host:port/path``)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        scheme = "wss" if self._secure else "ws"
        return f"{scheme}://{host}:{self._port}{self.handler.path or '/'}"

    async def close(self) -> None:
        """Stops listening and closes every connection's channel. Idempotent."""
        await self.handler.close()
        self.server.close()
        await self.server.wait_closed()

    async def __aenter__(self) -> WebSocketServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<WebSocketServer {self.url} connections={len(self.handler.channels)}>"


async def serve_websocket(
    registry: CommandRegistry,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    path: str | None = None,
    max_size: int | None = DEFAULT_MAX_SIZE,
    ping_interval: float | None = 20.0,
    ping_timeout: float | None = 20.0,
    open_timeout: float | None = 10.0,
    close_timeout: float | None = 5.0,
    send_limit: int = DEFAULT_SEND_LIMIT,
    ssl: _ssl.SSLContext | None = None,
    serve_options: Mapping[str, Any] | None = None,
    expose: Expose = None,
) -> WebSocketServer:
    """Serves ``registry`` over WebSocket: each connection becomes one of its channels.

    Args:
        registry: The registry clients join (call this on its event loop).
        host: Interface to listen on.
        port: Port to listen on; ``0`` picks a free one (see :attr:`WebSocketServer.port`).
        token: Bearer token required on the handshake, ASCII (``None``: none).
        path: Accept only this URL path (``None``: any).
        max_size: Maximum size of one incoming message, in bytes.
        ping_interval: Seconds between keepalive pings (``None`` disables them).
        ping_timeout: Seconds to wait for a pong before dropping a connection.
        open_timeout: Seconds allowed for a client's handshake.
        close_timeout: Seconds allowed for flushing and the closing handshake.
        send_limit: Maximum bytes queued for a client that does not read.
        ssl: TLS context: serve ``wss://``.
        serve_options: Further keyword arguments for ``websockets.asyncio.server.serve``
            (``compression="deflate"`` turns on permessage-deflate, off by default).
        expose: The commands clients may list and call (see :class:`WebSocketHandler`):
            ``None`` (every public command), a glob pattern, a list of them, or a predicate.

    Returns:
        The running :class:`WebSocketServer`; close it with ``await server.close()`` or use
        it as an async context manager.

    Example:
        ::

            async with await serve_websocket(registry, port=8765, token="s3cret") as server:
                print(server.url)  # ws://127.0.0.1:8765/
    """
    handler = WebSocketHandler(
        registry,
        token=token,
        path=path,
        close_timeout=close_timeout,
        send_limit=send_limit,
        expose=expose,
    )
    # No permessage-deflate unless asked: spec-v1 messages are small and compressing each one
    # costs more CPU than the bytes it saves on a LAN (pass compression="deflate" to use it).
    options: dict[str, Any] = {"compression": None, **(serve_options or {})}
    if ssl is not None:
        options["ssl"] = ssl
    server = await serve(
        handler,
        host,
        port,
        create_connection=_SinkServerConnection,
        process_request=handler.process_request,
        max_size=max_size,
        ping_interval=_check_positive(ping_interval, "ping_interval"),
        ping_timeout=_check_positive(ping_timeout, "ping_timeout"),
        open_timeout=_check_positive(open_timeout, "open_timeout"),
        close_timeout=close_timeout,
        **options,
    )
    ws_server = WebSocketServer(server, handler, secure=ssl is not None)
    logger.info("registry %r serves WebSocket connections on %s", registry.id, ws_server.url)
    return ws_server
