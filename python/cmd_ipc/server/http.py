"""The HTTP server of cmd-ipc: an aiohttp endpoint that answers for a registry.

:func:`create_app` / :func:`add_routes` / :func:`serve` answer ``POST /cmd`` by routing each
message through a registry, so a client (:class:`~cmd_ipc.HTTPChannel`, or the TypeScript
HTTPChannel) can call any command of the server's tree, and publish ``GET /cmds.json``.
Bearer-token auth, a body size limit and a body read timeout are checked before anything
reaches the registry. The wire is described in :mod:`cmd_ipc.channels.http`; what the
endpoint answers is decided in :mod:`cmd_ipc.server._endpoint`, which the ASGI application
(:mod:`cmd_ipc.asgi`) shares, so both servers answer alike.

An example of both ends is in :mod:`cmd_ipc.channels.http`.

Logging goes to the ``cmd_ipc.http`` logger.
"""

from __future__ import annotations

import logging
from typing import Any

from cmd_ipc._optional import require

require("aiohttp", "http", "the HTTP server (cmd_ipc.server.http)")

from aiohttp import web  # noqa: E402

from cmd_ipc._expose import Expose  # noqa: E402
from cmd_ipc.registry import CommandRegistry  # noqa: E402
from cmd_ipc.server._endpoint import (  # noqa: E402
    DEFAULT_MAX_BODY,
    ClientGone,
    Endpoint,
    Options,
    Refused,
    Reply,
)

__all__ = ["DEFAULT_MAX_BODY", "HTTPServer", "add_routes", "create_app", "serve"]

logger = logging.getLogger("cmd_ipc.http")


def _response(reply: Reply) -> web.Response:
    return web.Response(
        status=reply.status,
        body=reply.body,
        headers={"Content-Type": reply.content_type, **reply.headers},
    )


class _Handlers:
    """The aiohttp handlers of one mounted endpoint (the answers are the endpoint's)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def _refuse(self, request: web.BaseRequest, refused: Refused) -> web.StreamResponse:
        """Answers and drops the connection, so a body that was not read never is."""
        resp = _response(
            self.endpoint.refusal(request.method, request.path, request.remote, refused)
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
            self.endpoint.check_auth(request.headers.get("Authorization"))
            self.endpoint.check_length(request.content_length)
        except Refused as refused:
            return await self._refuse(request, refused)
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text=f"unknown Expect: {request.headers['Expect']}")
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the interim answer is not the body
        return None

    async def handle_cmd(self, request: web.Request) -> web.StreamResponse:
        endpoint = self.endpoint
        try:
            endpoint.check_auth(request.headers.get("Authorization"))
            endpoint.check_length(request.content_length)
            # A body that came whole with the headers (the usual small request) is not timed.
            body = await endpoint.read_body(
                request.content.readany, timed=not request.content.is_eof()
            )
        except Refused as refused:
            return await self._refuse(request, refused)

        def gone() -> bool:
            # aiohttp does not cancel handlers when the client goes away unless the runner
            # was made with handler_cancellation=True (serve() does): look for ourselves.
            transport = request.transport
            return transport is None or transport.is_closing()

        try:
            reply = await endpoint.post(body, remote=request.remote, gone=gone)
        except ClientGone:
            logger.debug("HTTP client %s went away before its answer", request.remote)
            return web.Response(status=499)
        return _response(reply)

    async def handle_schema(self, request: web.Request) -> web.StreamResponse:
        try:
            self.endpoint.check_schema_auth(request.headers.get("Authorization"))
        except Refused as refused:
            return await self._refuse(request, refused)
        return _response(await self.endpoint.schema())


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
        token: The bearer token clients must send (ASCII); ``None`` disables auth.
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
        ValueError: An invalid option (``schema_auth=True`` without a ``token``, a
            ``token`` that is not ASCII...).
        TypeError: ``expose`` is not a pattern, patterns or a predicate.

    Example::

        app = web.Application()
        add_routes(app, registry, token=secret, expose=["api.*", "health"])
    """
    opts = Options.make(
        registry.id,
        token=token,
        max_body=max_body,
        read_timeout=read_timeout,
        answer_timeout=answer_timeout,
        path=path,
        schema_path=schema_path,
        schema_auth=schema_auth,
        expose=expose,
    )
    endpoint = Endpoint(registry, opts)
    handlers = _Handlers(endpoint)
    app.on_cleanup.append(endpoint.aclose)
    app.router.add_post(opts.path, handlers.handle_cmd, expect_handler=handlers.expect)
    if opts.schema_path is not None:
        app.router.add_get(opts.schema_path, handlers.handle_schema)


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
