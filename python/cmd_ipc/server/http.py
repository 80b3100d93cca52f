"""The HTTP server of cmd-ipc: an aiohttp endpoint that answers for a registry.

:func:`create_app` / :func:`add_routes` / :func:`serve` answer ``POST /cmd`` by routing each
message through a registry, so a client (:class:`~cmd_ipc.HTTPChannel`, or the TypeScript
HTTPChannel) can call any command of the server's tree, and publish ``GET /cmds.json``.
Bearer-token auth, a body size limit and a body read timeout are checked before anything
reaches the registry. The wire is described in :mod:`cmd_ipc.channels.http`.

An example of both ends is in :mod:`cmd_ipc.channels.http`.

Logging goes to the ``cmd_ipc.http`` logger.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cmd_ipc._optional import require

require("aiohttp", "http", "the HTTP server (cmd_ipc.server.http)")

from aiohttp import web  # noqa: E402

from cmd_ipc import _core  # noqa: E402
from cmd_ipc._expose import Expose, Exposure  # noqa: E402
from cmd_ipc.channels.http import (  # noqa: E402
    _ANSWER_TYPE,
    _EXECUTE_REQUEST,
    _LIST_REQUEST,
    _NDJSON,
    _dumps,
    _EndpointChannel,
    _error_response,
)
from cmd_ipc.errors import ProtocolError  # noqa: E402
from cmd_ipc.registry import CommandRegistry  # noqa: E402

__all__ = ["DEFAULT_MAX_BODY", "HTTPServer", "add_routes", "create_app", "serve"]

logger = logging.getLogger("cmd_ipc.http")

#: Default largest request body the server reads, in bytes (1 MiB).
DEFAULT_MAX_BODY = 1024 * 1024
#: Seconds between two checks that the client of a waiting request is still connected.
_DISCONNECT_POLL = 0.5


@dataclass(frozen=True)
class _Options:
    token: bytes | None
    max_body: int
    read_timeout: float
    answer_timeout: float | None
    path: str
    schema_path: str | None
    schema_auth: bool
    exposure: Exposure


class _Refused(Exception):
    """The request is answered with ``status`` and the connection dropped unread."""

    def __init__(self, status: int, error: str, headers: Mapping[str, str] | None = None):
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = dict(headers or {})


class _Endpoint:
    """The handlers of one mounted endpoint."""

    def __init__(self, registry: CommandRegistry, options: _Options) -> None:
        self.registry = registry
        self.options = options
        self.channel: _EndpointChannel | None = None
        self._attaching: asyncio.Lock | None = None

    async def _attached(self) -> _EndpointChannel:
        """The endpoint's channel in the registry, attached on first use."""
        channel = self.channel
        if channel is not None and not channel.closed:
            return channel
        if self._attaching is None:
            self._attaching = asyncio.Lock()
        async with self._attaching:
            channel = self.channel
            if channel is None or channel.closed:
                taken = set(self.registry.channels)
                base = f"http:{self.options.path}"
                name, n = base, 2
                while name in taken:
                    name, n = f"{base}#{n}", n + 1
                channel = _EndpointChannel(name)
                await self.registry.register_channel(channel)
                self.channel = channel
            return channel

    async def aclose(self, _app: object = None) -> None:
        """Detaches the endpoint's channel (on the application's cleanup)."""
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close()

    # ----------------------------------------------------------------- checks

    def _check_auth(self, request: web.BaseRequest) -> None:
        token = self.options.token
        if token is None:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _Refused(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), token):
            raise _Refused(
                401, "invalid bearer token", {"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )

    def _check_length(self, request: web.BaseRequest) -> None:
        length = request.content_length
        if length is not None and length > self.options.max_body:
            raise _Refused(
                413, f"request body of {length} bytes exceeds {self.options.max_body} bytes"
            )

    async def _refuse(self, request: web.BaseRequest, refused: _Refused) -> web.StreamResponse:
        """Answers and drops the connection, so a body that was not read never is."""
        logger.info(
            "HTTP %s %s from %s refused: %d %s",
            request.method,
            request.path,
            request.remote,
            refused.status,
            refused.error,
        )
        resp = web.json_response(
            {"error": refused.error}, status=refused.status, headers=refused.headers
        )
        resp.force_close()
        await resp.prepare(request)
        await resp.write_eof()
        # Skip aiohttp's "lingering" read of the unread body: close once the answer is out.
        request.protocol.force_close()
        return resp

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse before the client sends the body."""
        try:
            self._check_auth(request)
            self._check_length(request)
        except _Refused as refused:
            return await self._refuse(request, refused)
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text=f"unknown Expect: {request.headers['Expect']}")
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the interim answer is not the body
        return None

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        buf = bytearray()
        limit = self.options.max_body
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > limit:
                raise _Refused(413, f"request body exceeds {limit} bytes")

    # ----------------------------------------------------------------- POST /cmd

    async def handle_cmd(self, request: web.Request) -> web.StreamResponse:
        try:
            self._check_auth(request)
            self._check_length(request)
            try:
                if request.content.is_eof():
                    # The whole body came with the headers (the usual small request).
                    body = await self._read_body(request)
                else:
                    body = await asyncio.wait_for(
                        self._read_body(request), self.options.read_timeout
                    )
            except asyncio.TimeoutError:
                raise _Refused(
                    408, f"request body not received within {self.options.read_timeout}s"
                ) from None
        except _Refused as refused:
            return await self._refuse(request, refused)
        try:
            kind, message_id, _ = _core.inspect_message(
                body, "json", max_message_size=self.options.max_body
            )
        except (ProtocolError, ValueError) as e:
            issue = e.args[1] if isinstance(e, ProtocolError) and len(e.args) > 1 else str(e)
            logger.debug("HTTP POST from %s: invalid message: %s", request.remote, issue)
            return web.json_response(
                {"error": "Invalid message format", "issues": [str(issue)]}, status=400
            )
        if kind not in _ANSWER_TYPE:
            logger.info("HTTP POST from %s refused: a %s may not cross HTTP", request.remote, kind)
            return web.json_response({"error": f"Message type {kind} is not allowed"}, status=403)
        exposure = self.options.exposure
        # `kind` is what the decoder read, escapes and all: the check keys on it, never on
        # the raw bytes.
        hidden = exposure.hidden_call(body, kind)
        if hidden is not None:
            # Answered as the registry answers a command it does not know.
            logger.debug("HTTP POST from %s: %r is not exposed", request.remote, hidden)
            answer = exposure.not_found(message_id, hidden)
            return web.Response(body=answer + b"\n", headers={"Content-Type": _NDJSON})
        return await self._answer(request, body, message_id, kind)

    async def _answer(
        self, request: web.Request, body: bytes, message_id: str, kind: str
    ) -> web.StreamResponse:
        if self.registry.closed:
            return _unavailable(self.registry)
        try:
            answer = await self.route(body, message_id, request=request)
        except _Refused as refused:
            return web.json_response({"error": refused.error}, status=refused.status)
        except _Unavailable:
            return _unavailable(self.registry)
        except _ClientGone:
            logger.debug("HTTP client %s went away before its answer", request.remote)
            return web.Response(status=499)
        except asyncio.TimeoutError:
            limit = self._answer_timeout()
            if kind != _EXECUTE_REQUEST:
                return web.json_response({"error": f"no answer within {limit}s"}, status=504)
            answer = _dumps(_error_response(message_id, "timeout", f"no answer within {limit}s"))
        exposure = self.options.exposure
        if exposure.restricted:
            if kind == _LIST_REQUEST:
                answer = exposure.list_answer(answer)
            else:
                answer = exposure.answer(answer)
        return web.Response(body=answer + b"\n", headers={"Content-Type": _NDJSON})

    def _answer_timeout(self) -> float:
        t = self.options.answer_timeout
        return self.registry.request_ttl if t is None else t

    async def route(
        self, body: bytes, message_id: str, *, request: web.BaseRequest | None = None
    ) -> bytes:
        """Routes one message through the registry and returns the router's answer.

        Raises:
            asyncio.TimeoutError: No answer within the answer timeout.
            _ClientGone: ``request``'s client disconnected first.
        """
        channel = await self._attached()
        if message_id in channel.pending:
            raise _Refused(409, f"a message with id {message_id!r} is already in flight")
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        channel.pending[message_id] = answer
        try:
            channel.deliver(body)
            return await self._wait(answer, request)
        finally:
            if channel.pending.get(message_id) is answer:
                del channel.pending[message_id]

    async def _wait(self, answer: asyncio.Future[bytes], request: web.BaseRequest | None) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._answer_timeout()
        while not answer.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError
            await asyncio.wait({answer}, timeout=min(remaining, _DISCONNECT_POLL))
            if answer.done():
                break
            # aiohttp does not cancel handlers when the client goes away unless the runner
            # was made with handler_cancellation=True (serve() does): look for ourselves.
            transport = request.transport if request is not None else None
            if request is not None and (transport is None or transport.is_closing()):
                raise _ClientGone
        try:
            return answer.result()
        except ConnectionError:
            raise _Unavailable from None

    # ----------------------------------------------------------------- GET /cmds.json

    async def handle_schema(self, request: web.Request) -> web.StreamResponse:
        if self.options.schema_auth:
            try:
                self._check_auth(request)
            except _Refused as refused:
                return await self._refuse(request, refused)
        if self.registry.closed:
            return _unavailable(self.registry)
        list_id = _core.new_id()
        answer = await self.route(_dumps({"id": list_id, "type": _LIST_REQUEST}), list_id)
        commands = self.options.exposure.commands(json.loads(answer)["commands"])
        return web.json_response({"cmdschema": "1.0.0", "commands": commands})


def _unavailable(registry: CommandRegistry) -> web.Response:
    return web.json_response({"error": f"registry {registry.id!r} is closed"}, status=503)


class _Unavailable(Exception):
    """The registry closed the endpoint's channel while a request waited."""


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def add_routes(
    app: web.Application,
    registry: CommandRegistry,
    *,
    token: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    read_timeout: float = 10.0,
    answer_timeout: float | None = None,
    path: str = "/cmd",
    schema_path: str | None = "/cmds.json",
    schema_auth: bool | None = None,
    expose: Expose = None,
) -> None:
    """Mounts the cmd-ipc endpoint on an existing aiohttp application.

    ``POST {path}`` takes one spec-v1 message and answers like the TypeScript HTTPChannel
    in server mode: ``200`` with ``Content-Type: application/x-ndjson`` and the response
    message as one line; ``400`` (``{"error": "Invalid message format", "issues": [...]}``)
    for a body that is not a valid message; ``403`` for a valid message that may not cross
    HTTP (registrations, events, responses). Before the body is read: ``401`` (with
    ``WWW-Authenticate: Bearer``) without the right bearer token, compared in constant time;
    ``413`` for a declared length over ``max_body`` (a chunked body is cut off as soon as it
    exceeds it); ``408`` when the body is not received within ``read_timeout``. These three
    close the connection without reading the rest of the body. ``Expect: 100-continue`` is
    honoured, so such clients never send a refused body.

    Each message is routed through ``registry`` as if it came from a peer, on one channel
    of the endpoint (``http:{path}``, attached on the first request and detached on the
    application's cleanup). By default a client can list and call every public command the
    registry can reach (its own, its workers' and children's, its router's); ``expose``
    narrows that set, for listing and calling alike: a command it leaves out is never
    listed, and a call of it is answered ``not_found`` as for a command that does not exist
    (see :mod:`cmd_ipc._expose`). A private ``_`` command is never exposed. Two messages
    with the same id may not be in flight at once: the second is answered ``409``. An
    execute that gets no answer within ``answer_timeout`` is answered with a ``timeout``
    error response.

    ``GET {schema_path}`` (unless ``None``) answers ``{"cmdschema": "1.0.0", "commands":
    [...]}``: the exposed commands, with their descriptions and schemas (the set a
    ``list.commands.request`` returns). When a ``token`` is set it needs the token too,
    unless ``schema_auth=False`` says explicitly that the list is public.

    The handlers must run on the registry's event loop.

    Args:
        app: The application to add the routes to.
        registry: The registry that answers.
        token: The bearer token clients must send; ``None`` disables auth.
        max_body: Largest request body, in bytes.
        read_timeout: Seconds a client has to send the whole body (slow senders get 408).
        answer_timeout: Seconds to wait for the registry's answer (default: its
            ``request_ttl``).
        path: Path of the message endpoint.
        schema_path: Path of the schema document, or ``None`` for none.
        schema_auth: Whether the schema document needs the token: ``None`` (the default)
            when a ``token`` is set; ``False`` serves it to anyone (an explicit opt-out);
            ``True`` needs a ``token``.
        expose: The commands clients may list and call: ``None`` (every public command),
            a glob pattern such as ``"api.*"`` (``*`` matches dots too), a list of them, or
            a predicate ``fn(command_id) -> bool``.

    Raises:
        ValueError: An invalid option (``schema_auth=True`` without a ``token``...).
        TypeError: ``expose`` is not a pattern, patterns or a predicate.

    Example::

        app = web.Application()
        add_routes(app, registry, token=secret, expose=["api.*", "health"])
    """
    if token is not None and (not isinstance(token, str) or not token):
        raise ValueError("token must be a non-empty string (or None for no auth)")
    if max_body <= 0:
        raise ValueError("max_body must be positive")
    if not read_timeout > 0:
        raise ValueError("read_timeout must be a positive number of seconds")
    if answer_timeout is not None and not answer_timeout > 0:
        raise ValueError("answer_timeout must be a positive number of seconds")
    if not path.startswith("/") or (schema_path is not None and not schema_path.startswith("/")):
        raise ValueError("paths must start with '/'")
    if schema_auth and token is None:
        raise ValueError("schema_auth=True needs a token")
    opts = _Options(
        token=None if token is None else token.encode(),
        max_body=max_body,
        read_timeout=float(read_timeout),
        answer_timeout=answer_timeout,
        path=path,
        schema_path=schema_path,
        schema_auth=token is not None if schema_auth is None else schema_auth,
        exposure=Exposure(expose, registry.id),
    )
    endpoint = _Endpoint(registry, opts)
    app.on_cleanup.append(endpoint.aclose)
    app.router.add_post(opts.path, endpoint.handle_cmd, expect_handler=endpoint.expect)
    if opts.schema_path is not None:
        app.router.add_get(opts.schema_path, endpoint.handle_schema)


def create_app(
    registry: CommandRegistry,
    *,
    token: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    read_timeout: float = 10.0,
    answer_timeout: float | None = None,
    path: str = "/cmd",
    schema_path: str | None = "/cmds.json",
    schema_auth: bool | None = None,
    expose: Expose = None,
) -> web.Application:
    """Creates an aiohttp application serving ``registry`` (see :func:`add_routes` for the
    endpoints and options).

    Run it with :func:`serve`, with ``aiohttp.web.run_app``, or add it to another application
    with ``parent.add_subapp("/rpc", create_app(registry))``.

    Returns:
        The new application.
    """
    app = web.Application(client_max_size=max_body)
    add_routes(
        app,
        registry,
        token=token,
        max_body=max_body,
        read_timeout=read_timeout,
        answer_timeout=answer_timeout,
        path=path,
        schema_path=schema_path,
        schema_auth=schema_auth,
        expose=expose,
    )
    return app


class HTTPServer:
    """A running server made by :func:`serve`.

    Attributes:
        host: The address it listens on.
        port: The port it listens on (the one chosen when ``port=0`` was asked).
        url: Its base URL, for :class:`~cmd_ipc.HTTPChannel`.
    """

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        self._closed = False

    @property
    def app(self) -> web.Application:
        """The served application."""
        return self._runner.app

    async def close(self) -> None:
        """Stops listening, cancels the requests in progress after the shutdown timeout and
        closes every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._runner.cleanup()

    async def __aenter__(self) -> HTTPServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<HTTPServer url={self.url!r}>"


async def serve(
    registry: CommandRegistry,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    keepalive_timeout: float = 15.0,
    shutdown_timeout: float = 5.0,
    **options: Any,
) -> HTTPServer:
    """Serves ``registry`` over HTTP until the returned server is closed.

    Args:
        registry: The registry that answers.
        host: The address to listen on.
        port: The port; ``0`` picks a free one (read it from ``server.port``).
        keepalive_timeout: Seconds an idle connection (or one that has not finished sending
            its request headers) is kept.
        shutdown_timeout: Seconds :meth:`HTTPServer.close` lets requests in progress finish
            before cancelling them.
        **options: The options of :func:`add_routes` (``token``, ``expose``,
            ``schema_auth``, ``max_body``, ``read_timeout``...).

    Returns:
        The running :class:`HTTPServer` (also an async context manager).

    Example::

        async with await serve(registry, port=8080, token=secret) as server:
            print("listening on", server.url)
            await stop.wait()
    """
    app = create_app(registry, **options)
    # handler_cancellation: a client that goes away cancels its request at once.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        keepalive_timeout=keepalive_timeout,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        address = runner.addresses[0]
    except BaseException:
        await runner.cleanup()
        raise
    server = HTTPServer(runner, str(address[0]), int(address[1]))
    logger.info("serving registry %r on %s", registry.id, server.url)
    return server
