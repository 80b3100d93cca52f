"""The gRPC server of cmd-ipc: every accepted stream becomes a channel of a registry.

:func:`serve_grpc` (or :class:`GrpcHandler` inside your own ``grpc.aio`` server) turns every
``/cmdipc.v1.Mesh/Connect`` stream into a
:class:`~cmd_ipc.channels.grpc.GrpcServerChannel` of the server's registry, named after the
client's ``x-cmd-ipc-id`` metadata; the client side is
:class:`~cmd_ipc.channels.grpc.GrpcChannel` (see :mod:`cmd_ipc.channels.grpc` for the wire,
the status codes, the limits and liveness). The method is served by a generic handler: no
generated code, no protobuf runtime.

* **Auth**: with ``token`` set, the server requires ``authorization: Bearer <token>``
  metadata (compared in constant time) and ends any other stream with
  ``UNAUTHENTICATED`` before it becomes a channel.
* **Exposure**: ``expose`` narrows the commands clients may list and call (by default every
  public command the registry can reach); a hidden command is never listed and a call of it
  is answered ``not_found``, as for a command that does not exist.
* **TLS**: ``certificate_chain`` and ``private_key`` (PEM) serve TLS; ``client_ca`` also
  requires client certificates signed by it (mutual TLS); or pass prepared
  :class:`grpc.ServerCredentials` as ``tls``.

Logging goes to the ``cmd_ipc.grpc`` logger.

Example:
    On the hub::

        hub = CommandRegistry("hub")
        async with await serve_grpc(hub, "0.0.0.0", 50051, token="s3cret") as server:
            ...  # serve until told to stop
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cmd_ipc._expose import Expose, Exposure
from cmd_ipc._optional import require
from cmd_ipc.server._endpoint import check_token_ascii, reserved_channel_id

require("grpc", "grpc", "the gRPC server (cmd_ipc.server.grpc)")

import grpc  # noqa: E402
from grpc import aio  # noqa: E402

from cmd_ipc.channels.grpc import (  # noqa: E402
    _ID,
    DEFAULT_MAX_SIZE,
    DEFAULT_SEND_LIMIT,
    ID_METADATA,
    METHOD,
    SERVER_METADATA,
    SERVICE,
    GrpcServerChannel,
    _check_positive,
    _check_size,
    _ms,
)

if TYPE_CHECKING:
    from cmd_ipc.registry import CommandRegistry

__all__ = ["GrpcHandler", "GrpcServer", "serve_grpc", "server_options"]

logger = logging.getLogger("cmd_ipc.grpc")

_anonymous = itertools.count(1)


def _single(metadata: aio.Metadata | Sequence[tuple[str, Any]] | None, key: str) -> str | None:
    """The metadata value of ``key``; ``""`` (never valid) when it is repeated or binary."""
    values = [v for k, v in (metadata or ()) if k == key]
    if not values:
        return None
    value = values[0]
    return value if len(values) == 1 and isinstance(value, str) else ""


def server_options(
    *,
    max_size: int | None = DEFAULT_MAX_SIZE,
    keepalive_time: float | None = 30.0,
    keepalive_timeout: float = 20.0,
    min_ping_interval: float = 10.0,
) -> list[tuple[str, Any]]:
    """The ``grpc.aio.server(options=...)`` that :func:`serve_grpc` uses, for a server of
    your own that serves a :class:`GrpcHandler`.

    Args:
        max_size: Maximum size of one incoming gRPC message, in bytes (``None``: no limit).
        keepalive_time: Seconds between the server's keepalive pings to each client
            (``None``: the server does not ping).
        keepalive_timeout: Seconds to wait for a ping's answer before dropping a client.
        min_ping_interval: The shortest interval between a client's pings that the server
            accepts on an idle stream (gRPC's default, 5 minutes, would make the server
            drop a :class:`~cmd_ipc.channels.grpc.GrpcChannel` pinging every 30 s).

    Example:
        >>> dict(server_options(max_size=1024))["grpc.max_receive_message_length"]
        1024
    """
    _check_size(max_size, "max_size")
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", -1 if max_size is None else max_size),
        ("grpc.max_send_message_length", -1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", _ms(min_ping_interval)),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(min_ping_interval)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # A second server on a port in use fails to bind rather than sharing the port.
        ("grpc.so_reuseport", 0),
    ]
    if keepalive_time is not None:
        _check_positive(keepalive_time, "keepalive_time")
        options += [
            ("grpc.keepalive_time_ms", _ms(keepalive_time)),
            ("grpc.keepalive_timeout_ms", _ms(keepalive_timeout)),
        ]
    return options


class GrpcHandler:
    """Accepts ``/cmdipc.v1.Mesh/Connect`` streams into a registry, inside any ``grpc.aio``
    server.

    Add it to a server with :meth:`add_to_server` (or ``server.add_generic_rpc_handlers(
    [handler.rpc_handler])``), or use :func:`serve_grpc`, which does. For keepalive pings
    and message sizes as :func:`serve_grpc` sets them, make the server with
    ``grpc.aio.server(options=server_options(), maximum_concurrent_rpcs=1024)`` (the
    second bounds the streams served at once, as ``max_streams`` does).

    A stream whose id is still attached (the previous stream of a reconnecting client, not
    yet noticed dead) replaces it: the old one is ended with ``ABORTED`` first.

    Args:
        registry: The registry the streams join.
        token: Bearer token required from clients, ASCII (``None``: no authentication).
        close_timeout: Seconds allowed for flushing a stream on close.
        send_limit: Maximum bytes queued for a client that does not read.
        expose: The commands clients may list and call: ``None`` (every public command the
            registry can reach), a glob pattern such as ``"api.*"`` (``*`` matches dots
            too), a list of them, or a predicate ``fn(command_id) -> bool``.

    Raises:
        ValueError: ``token`` is empty or not ASCII (gRPC metadata carries ASCII).
        TypeError: ``expose`` is not a pattern, patterns or a predicate.

    Example:
        Inside your own server::

            server = grpc.aio.server(options=server_options(), maximum_concurrent_rpcs=1024)
            handler = GrpcHandler(registry, token="s3cret")
            handler.add_to_server(server)
            server.add_insecure_port("0.0.0.0:50051")
            await server.start()
            ...
            await handler.close()
            await server.stop(1.0)
    """

    def __init__(
        self,
        registry: CommandRegistry,
        *,
        token: str | None = None,
        close_timeout: float | None = 5.0,
        send_limit: int = DEFAULT_SEND_LIMIT,
        expose: Expose = None,
    ) -> None:
        if token is not None and not token:
            raise ValueError("token must be a non-empty string or None")
        check_token_ascii(token)
        self.registry = registry
        self.exposure = Exposure(expose, registry.id)
        self.close_timeout = _check_positive(close_timeout, "close_timeout")
        self.send_limit = send_limit
        self._token = None if token is None else token.encode()
        self._channels: set[GrpcServerChannel] = set()
        self._lock: asyncio.Lock | None = None
        self._closed = False
        self.rpc_handler: grpc.GenericRpcHandler = grpc.method_handlers_generic_handler(
            SERVICE,
            # No serializers: messages cross as bytes, read and written by hand.
            {METHOD: grpc.stream_stream_rpc_method_handler(self.connect)},
        )

    @property
    def channels(self) -> list[GrpcServerChannel]:
        """The channels of the streams currently served."""
        return list(self._channels)

    def add_to_server(self, server: aio.Server) -> None:
        """Serves the ``cmdipc.v1.Mesh`` service on ``server`` (before it starts)."""
        server.add_generic_rpc_handlers((self.rpc_handler,))

    def _authorized(self, metadata: aio.Metadata | None) -> bool:
        if self._token is None:
            return True
        value = _single(metadata, "authorization")
        if not value:
            return False
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode(), self._token)

    async def connect(self, requests: Any, context: aio.ServicerContext[bytes, bytes]) -> None:
        """Serves one stream as a channel of the registry until it ends (the method's
        behaviour: messages are read and written through ``context``)."""
        if self._closed or self.registry.closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server closing")
        metadata = context.invocation_metadata()
        if not self._authorized(metadata):
            # INFO, as the HTTP server's refusals: a client's mistake, not the server's.
            logger.info("refused a stream from %s: missing or invalid bearer token", context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        client_id = _single(metadata, ID_METADATA)
        if client_id is not None and not _ID.fullmatch(client_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid {ID_METADATA}")
        channel_id = client_id or f"grpc-{next(_anonymous)}"
        channel = GrpcServerChannel(
            channel_id,
            context,
            close_timeout=self.close_timeout,
            send_limit=self.send_limit,
            exposure=self.exposure,
        )
        if self._lock is None:
            self._lock = asyncio.Lock()
        # One try from the registration on: a stream cancelled while its channel attaches
        # (inside the lock) is reported lost like one cancelled later, never left attached.
        try:
            async with self._lock:
                refusal = self._make_room(channel_id)
                if refusal is None:
                    self._channels.add(channel)
                    # Before the channel writes anything: the headers say "accepted".
                    await context.send_initial_metadata(((SERVER_METADATA, self.registry.id),))
                    try:
                        await self.registry.register_channel(channel)
                    except Exception as e:
                        logger.warning("could not attach stream %r: %s", channel_id, e)
                        refusal = grpc.StatusCode.UNAVAILABLE, "could not attach the stream"
                if refusal is not None:
                    code, details = refusal
                    if code is not grpc.StatusCode.UNAVAILABLE:
                        logger.info("refused a stream from %s: %s", context.peer(), details)
                    await context.abort(code, details)
            logger.info("stream %r from %s attached", channel_id, context.peer())
            await channel.wait_closed()
        except asyncio.CancelledError:
            # The RPC was cancelled (the client went away, the server stops).
            channel._lost_now("the stream was cancelled")
            raise
        finally:
            self._channels.discard(channel)

    def _make_room(self, channel_id: str) -> tuple[grpc.StatusCode, str] | None:
        """Ends a previous stream with the same id; says why not, if it cannot: the status
        and details to end this stream with."""
        if self._closed or self.registry.closed:
            return grpc.StatusCode.UNAVAILABLE, "server closing"
        reserved = reserved_channel_id(self.registry, channel_id)
        if reserved is not None:
            return grpc.StatusCode.FAILED_PRECONDITION, reserved
        old = self.registry.channels.get(channel_id)
        if old is None:
            return None
        if not isinstance(old, GrpcServerChannel):
            # For good: the client would only be refused again (see FINAL_CODES).
            return grpc.StatusCode.ALREADY_EXISTS, f"channel id {channel_id!r} is in use"
        logger.info("stream %r replaces the previous one with that id", channel_id)
        # Detached at once: the old stream is often half dead (its client reconnected before
        # the server noticed), and flushing it would only time out.
        old._close_soon(
            grpc.StatusCode.ABORTED, "replaced by a newer stream with the same id", detach=True
        )
        if channel_id in self.registry.channels:
            return grpc.StatusCode.UNAVAILABLE, f"channel id {channel_id!r} is still in use"
        return None

    async def close(self) -> None:
        """Closes every stream this handler attached (their calls fail with
        ``channel_disconnected``; the clients see ``UNAVAILABLE`` and reconnect later) and
        refuses new ones."""
        self._closed = True
        channels = list(self._channels)
        if channels:
            await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


class GrpcServer:
    """A running server made by :func:`serve_grpc`.

    Attributes:
        handler: The :class:`GrpcHandler` serving its streams.
        server: The underlying ``grpc.aio.Server``.
    """

    def __init__(
        self, server: aio.Server, handler: GrpcHandler, host: str, port: int, *, secure: bool
    ) -> None:
        self.server = server
        self.handler = handler
        self.secure = secure
        self._host = host
        self._port = port
        self._closed = False

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The port the server listens on (the one chosen when ``port=0``)."""
        return self._port

    @property
    def target(self) -> str:
        """The target clients connect to (``host:port``)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self._port}"

    async def close(self, grace: float | None = 1.0) -> None:
        """Closes every stream's channel, then stops the server (RPCs still running after
        ``grace`` seconds are cancelled). Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.handler.close()
        await self.server.stop(grace)

    async def __aenter__(self) -> GrpcServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<GrpcServer {self.target} streams={len(self.handler.channels)}>"


async def serve_grpc(
    registry: CommandRegistry,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    expose: Expose = None,
    tls: grpc.ServerCredentials | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    client_ca: bytes | None = None,
    max_size: int | None = DEFAULT_MAX_SIZE,
    keepalive_time: float | None = 30.0,
    keepalive_timeout: float = 20.0,
    close_timeout: float | None = 5.0,
    send_limit: int = DEFAULT_SEND_LIMIT,
    max_streams: int | None = 1024,
    options: Sequence[tuple[str, Any]] | None = None,
) -> GrpcServer:
    """Serves ``registry`` over gRPC: each ``Connect`` stream becomes one of its channels.

    Args:
        registry: The registry clients join (call this on its event loop).
        host: Interface to listen on.
        port: Port to listen on; ``0`` picks a free one (see :attr:`GrpcServer.port`).
        token: Bearer token required in the metadata, ASCII (``None``: none).
        expose: The commands clients may list and call (see :class:`GrpcHandler`):
            ``None`` (every public command), a glob pattern, a list of them, or a predicate.
        tls: Prepared server credentials (instead of the PEM arguments).
        certificate_chain: PEM certificate chain: serve TLS (with ``private_key``).
        private_key: PEM private key of ``certificate_chain``.
        client_ca: PEM roots client certificates must chain to: requires one from every
            client (mutual TLS).
        max_size: Maximum size of one incoming gRPC message, in bytes (``None``: no limit).
        keepalive_time: Seconds between keepalive pings to each client (``None``: none).
        keepalive_timeout: Seconds to wait for a ping's answer before dropping a client.
        close_timeout: Seconds allowed for flushing a stream on close.
        send_limit: Maximum bytes queued for a client that does not read.
        max_streams: Most streams served at once (gRPC's ``maximum_concurrent_rpcs``):
            one more is refused with ``RESOURCE_EXHAUSTED``, and its client tries again
            later (``None``: no limit; each stream holds a channel of the registry).
        options: Further gRPC server arguments, applied after :func:`server_options`.

    Returns:
        The running :class:`GrpcServer`; close it with ``await server.close()`` or use it
        as an async context manager.

    Raises:
        ValueError: An invalid option or TLS combination.
        RuntimeError: The address could not be bound.

    Example:
        ::

            async with await serve_grpc(registry, port=50051, token="s3cret") as server:
                print(server.target)  # 127.0.0.1:50051
    """
    if max_streams is not None and (isinstance(max_streams, bool) or max_streams < 1):
        raise ValueError("max_streams must be a positive number of streams or None")
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("TLS needs both certificate_chain and private_key")
    if tls is not None and certificate_chain is not None:
        raise ValueError("pass a certificate or ServerCredentials as tls=, not both")
    if client_ca is not None and certificate_chain is None:
        raise ValueError("client_ca needs a server certificate (certificate_chain, private_key)")
    if certificate_chain is not None and private_key is not None:
        tls = grpc.ssl_server_credentials(
            [(private_key, certificate_chain)],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
    handler = GrpcHandler(
        registry,
        token=token,
        close_timeout=close_timeout,
        send_limit=send_limit,
        expose=expose,
    )
    opts = server_options(
        max_size=max_size, keepalive_time=keepalive_time, keepalive_timeout=keepalive_timeout
    ) + list(options or ())
    server = aio.server(options=opts, maximum_concurrent_rpcs=max_streams)
    handler.add_to_server(server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, tls)
    if not bound:
        raise RuntimeError(f"could not bind {address}")
    await server.start()
    grpc_server = GrpcServer(server, handler, host, bound, secure=tls is not None)
    logger.info("registry %r serves gRPC streams on %s", registry.id, grpc_server.target)
    return grpc_server
