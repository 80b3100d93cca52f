"""The MCP server of cmd-ipc: every public command a registry can route to, as MCP tools.

:class:`MCPServer` answers the Model Context Protocol (with the official ``mcp`` SDK, so
every protocol revision the SDK speaks is served: the ``initialize`` handshake of 2024-11-05
to 2025-11-25 and the per-request envelopes of 2026-07-28) for one registry:

* ``tools/list``: one tool per public command the registry can route to, local and remote
  (its workers' and children's, its peers', what its router listed), never a private ``_``
  id; ``expose=`` narrows the set as for the HTTP server (:mod:`cmd_ipc._expose`). A tool's
  ``name`` is the command id (ids outside the MCP tool-name pattern ``[A-Za-z0-9._-]{1,128}``
  are served but logged once as a warning), ``description`` the command's, ``inputSchema``
  its request schema (``{"type": "object"}`` when it has none; ``"type": "object"`` added to
  one that names no type, a ``$ref`` or ``anyOf`` schema say). MCP arguments and cmd-ipc
  requests are both objects, so a command whose request schema only admits something else
  (``{"type": "integer"}``) could never be called: it is not served as a tool, and a
  warning is logged once. ``outputSchema`` its
  response schema: as is when it is an object schema, else wrapped as ``{"type": "object",
  "properties": {"result": <schema>}, "required": ["result"]}`` (``<schema>`` is ``{}``,
  any value, for a command without a response schema).
* ``tools/call``: the command runs through the router (wherever it lives); the result comes
  back as text content (a string as is, anything else as JSON) and as ``structuredContent``
  (an object as is when the response schema is an object schema, anything else as
  ``{"result": value}``: what the ``outputSchema`` says; a result that is not an object
  although the response schema is an object schema is ``internal_error``, as it would
  contradict the ``outputSchema``). A failure is ``isError: true``
  with ``structuredContent {"code", "message"}`` keeping the cmd-ipc code
  (``not_found``, ``invalid_request``, ``internal_error``, ``timeout``,
  ``channel_disconnected``); a call that does not finish within ``timeout`` is
  ``timeout``. A name that is not a tool (unknown, private, or not
  exposed) is a JSON-RPC invalid-params error, as the MCP spec asks.
* ``notifications/tools/list_changed`` whenever the set of tools changes (a worker
  registered or died, a channel closed, a command was registered here), found with
  :meth:`CommandRegistry.on_commands_changed`: on the standalone stream of every
  handshake-era connection, and on the ``subscriptions/listen`` streams of 2026-07-28
  clients that asked for ``toolsListChanged``.

Transports: :meth:`MCPServer.run_stdio` (an agent starts the server as a child process),
:meth:`MCPServer.asgi_app` (streamable HTTP, mountable in any ASGI application), and
:func:`serve_http` (a standalone uvicorn server on a port). ``cmd-ipc mcp serve
pkg.mod:setup [--http HOST:PORT] [--token T]`` runs either from the command line.

Example::

    import asyncio
    from cmd_ipc import CommandRegistry
    from cmd_ipc.server.mcp import MCPServer

    async def main() -> None:
        async with CommandRegistry("tools") as registry:
            @registry.command("calc.add", description="Adds two numbers")
            def add(a: int, b: int) -> int:
                return a + b

            await MCPServer(registry).run_stdio()  # until the agent closes stdin

    asyncio.run(main())

Logging goes to the ``cmd_ipc.mcp`` logger.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import socket
from collections.abc import Callable, Mapping
from typing import Any

from cmd_ipc._optional import require

require("mcp", "mcp", "the MCP server (cmd_ipc.server.mcp)")

import mcp_types as types  # noqa: E402
import uvicorn  # noqa: E402
from mcp.server import NotificationOptions, Server, ServerRequestContext  # noqa: E402
from mcp.server.models import InitializationOptions  # noqa: E402
from mcp.server.stdio import stdio_server  # noqa: E402
from mcp.server.subscriptions import (  # noqa: E402
    InMemorySubscriptionBus,
    ListenHandler,
    ToolsListChanged,
)
from mcp.shared.exceptions import MCPError  # noqa: E402
from mcp.shared.tool_name_validation import TOOL_NAME_REGEX  # noqa: E402
from starlette.types import ASGIApp, Receive, Scope, Send  # noqa: E402

from cmd_ipc import __version__  # noqa: E402
from cmd_ipc._expose import Expose, Exposure  # noqa: E402
from cmd_ipc.errors import CommandError  # noqa: E402
from cmd_ipc.registry import CommandRegistry  # noqa: E402

__all__ = ["MCPHTTPServer", "MCPServer", "command_tool", "serve_http", "stdio_streams"]

#: The SDK's stdio transport: ``async with stdio_streams() as (read, write)`` claims this
#: process's stdin and stdout for MCP (file descriptor 1 points at stderr meanwhile, so
#: workers spawned inside inherit stderr as their stdout).
stdio_streams = stdio_server

logger = logging.getLogger("cmd_ipc.mcp")

#: The key under which a non-object result travels in ``structuredContent``.
RESULT_KEY = "result"
#: At most this many command ids are warned about (a bad name, an uncallable schema).
_WARN_MAX = 256


def _is_object_schema(schema: Any) -> bool:
    return isinstance(schema, Mapping) and schema.get("type") == "object"


def _input_schema(schema: Any) -> dict[str, Any] | None:
    """The MCP ``inputSchema`` (an object schema at its root) of a request schema, or
    ``None`` when the schema admits no object (no call could satisfy it)."""
    if not isinstance(schema, Mapping) or not schema:
        return {"type": "object"}
    kind = schema.get("type")
    if kind is None:
        return {**schema, "type": "object"}  # a $ref, anyOf...: only its objects can come
    if kind == "object":
        return dict(schema)
    if isinstance(kind, list) and "object" in kind:
        return {**schema, "type": "object"}
    return None


def _output_schema(schema: Any) -> tuple[dict[str, Any] | None, bool]:
    """``(outputSchema, wrapped)`` for a response schema: an object schema as is, any other
    schema under ``{"result": ...}`` (with its ``$defs`` moved to the root, where the
    references ``#/$defs/...`` of the inner schema point); without one, ``{"result": {}}``
    (any value), so that the structured content of every tool is described."""
    if not isinstance(schema, Mapping):
        schema = {}
    if _is_object_schema(schema):
        return dict(schema), False
    inner = dict(schema)
    out: dict[str, Any] = {"type": "object"}
    for key in ("$defs", "definitions"):
        if key in inner:
            out[key] = inner.pop(key)
    inner.pop("$schema", None)
    out["properties"] = {RESULT_KEY: inner}
    out["required"] = [RESULT_KEY]
    return out, True


def command_tool(command: Mapping[str, Any]) -> types.Tool:
    """The MCP tool of a command definition (as :meth:`CommandRegistry.list_commands`
    gives it).

    Example:
        >>> tool = command_tool({"id": "calc.add", "schema": {"response": {"type": "integer"}}})
        >>> tool.input_schema, tool.output_schema["properties"]
        ({'type': 'object'}, {'result': {'type': 'integer'}})
        >>> command_tool({"id": "untyped"}).output_schema["properties"]
        {'result': {}}

    Raises:
        ValueError: The request schema admits no object (``{"type": "integer"}``): MCP
            arguments are an object, so no call could satisfy it.
    """
    entry = _tool_of(command)
    if entry is None:
        raise ValueError(f"the request schema of {command['id']!r} admits no object")
    return entry.tool


class _Entry:
    """A tool, and whether its results are wrapped under ``"result"``."""

    __slots__ = ("tool", "wrapped")

    def __init__(self, tool: types.Tool, wrapped: bool) -> None:
        self.tool = tool
        self.wrapped = wrapped


def _tool_of(command: Mapping[str, Any]) -> _Entry | None:
    schema = command.get("schema") or {}
    input_schema = _input_schema(schema.get("request"))
    if input_schema is None:
        return None
    output, wrapped = _output_schema(schema.get("response"))
    tool = types.Tool(
        name=str(command["id"]),
        description=command.get("description"),
        input_schema=input_schema,
        output_schema=output,
    )
    return _Entry(tool, wrapped)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return list(bytes(value))  # as bytes travel over JSON channels
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data (bytes become arrays of ints)."""
    return json.loads(json.dumps(value, default=_json_default, ensure_ascii=False))


def _error_result(code: str, message: str) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=f"{code}: {message}")],
        structured_content={"code": code, "message": message},
        is_error=True,
    )


class _Server(Server[Any]):
    """The SDK's low-level server, advertising ``tools.listChanged`` on every transport
    (the streamable HTTP manager asks for the initialization options without any)."""

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        return super().create_initialization_options(
            notification_options or NotificationOptions(tools_changed=True),
            experimental_capabilities,
            extensions,
        )


class MCPServer:
    """Serves a registry's commands as MCP tools (see the module docstring for the rules).

    One instance serves any number of MCP connections at once (stdio, streamable HTTP
    sessions, 2026-07-28 requests). Create it on the registry's event loop.

    Args:
        registry: The registry whose routable commands become tools.
        name: The server's name in the MCP handshake (default: the registry's id).
        version: The server's version in the handshake (default: cmd-ipc's).
        instructions: Instructions for the agent, sent in the handshake.
        expose: The commands served as tools: ``None`` (every public command), a glob
            pattern (``"api.*"``), patterns, or a predicate ``fn(command_id) -> bool``.
        timeout: Seconds a tool call may take (default: the registry's ``request_ttl``);
            a slower one is answered ``isError`` with code ``timeout``.

    Attributes:
        server: The SDK's low-level ``mcp.server.Server`` (to add resources, prompts or
            middleware).
    """

    def __init__(
        self,
        registry: CommandRegistry,
        *,
        name: str | None = None,
        version: str = __version__,
        instructions: str | None = None,
        expose: Expose = None,
        timeout: float | None = None,
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        self.registry = registry
        self.timeout = timeout
        self._exposure = Exposure(expose, registry.id)
        self._bus = InMemorySubscriptionBus()
        # Two listen handlers on one bus: the HTTP one can be ended with the HTTP server
        # (MCPHTTPServer.close) while stdio connections go on.
        self._listen = ListenHandler(self._bus)
        self._http_listen = ListenHandler(self._bus)
        #: One event per handshake-era connection (by its id), set when its client must
        #: hear of a change.
        self._legacy: dict[int, asyncio.Event] = {}
        self._warned: set[str] = set()
        self._warned_all = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Tool calls in flight over HTTP, and those ended by the HTTP server's close.
        self._http_calls: set[asyncio.Future[types.CallToolResult]] = set()
        self._aborted: set[asyncio.Future[types.CallToolResult]] = set()
        #: The tools served now, by name (refreshed by listings, calls and changes).
        self._tools: dict[str, _Entry] = self._scan()
        #: The tools clients were last told of: only the change watch updates it, so a
        #: listing that refreshed ``_tools`` before the watch ran cannot swallow a change.
        self._announced: list[types.Tool] = [e.tool for e in self._tools.values()]
        self._unsubscribe: Callable[[], None] | None = registry.on_commands_changed(
            self._commands_changed
        )
        self.server: Server[Any] = _Server(
            name or registry.id,
            version=version,
            instructions=instructions,
            on_list_tools=self._on_list_tools,
            on_call_tool=self._on_call_tool,
            on_subscriptions_listen=self._on_listen,
        )
        # Each handshake-era connection gets a task (the handler of its `initialized`
        # notification, cancelled with the connection) that tells it of every change.
        self.server.add_notification_handler(
            "notifications/initialized", types.NotificationParams, self._legacy_connection
        )

    def __repr__(self) -> str:
        return f"<MCPServer registry={self.registry.id!r} tools={len(self._tools)}>"

    # ----------------------------------------------------------------- tools

    def tools(self) -> list[types.Tool]:
        """The tools served now: one per exposed public command, sorted by name."""
        return [e.tool for e in self._scan().values()]

    def _scan(self) -> dict[str, _Entry]:
        entries: dict[str, _Entry] = {}
        for command in self.registry.list_commands():
            command_id = str(command["id"])
            if not self._exposure.allows(command_id):
                continue
            entry = _tool_of(command)
            if entry is None:
                self._warn(command_id, "its request schema admits no object: not served as a tool")
                continue
            if not TOOL_NAME_REGEX.fullmatch(command_id):
                self._warn(
                    command_id,
                    "it is outside the MCP tool-name pattern [A-Za-z0-9._-]{1,128}: "
                    "some MCP clients may refuse the tool",
                )
            entries[command_id] = entry
        return entries

    def _warn(self, command_id: str, why: str) -> None:
        """Logs ``why`` once per command id (for at most ``_WARN_MAX`` ids)."""
        if command_id in self._warned or self._warned_all:
            return
        if len(self._warned) >= _WARN_MAX:
            # A registry with endless generated ids must not grow this set forever.
            self._warned_all = True
            logger.warning("more than %d command ids were warned about: no more are", _WARN_MAX)
            return
        self._warned.add(command_id)
        logger.warning("command id %r: %s", command_id, why)

    def _commands_changed(self) -> None:
        self._tools = self._scan()
        tools = [e.tool for e in self._tools.values()]
        if tools == self._announced:
            return  # a private or hidden command changed: nothing an agent sees
        self._announced = tools
        logger.debug("tools of %r changed: %d tools", self.registry.id, len(tools))
        for event in self._legacy.values():
            event.set()
        task = asyncio.ensure_future(self._bus.publish(ToolsListChanged()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _legacy_connection(
        self, ctx: ServerRequestContext[Any, Any], _params: types.NotificationParams
    ) -> None:
        # One loop per connection: the session object is made per message, the SDK's
        # connection behind it is not (and lives, keeping its id, while this runs).
        key = id(getattr(ctx.session, "_connection", ctx.session))
        if key in self._legacy:
            return  # a repeated `initialized`: the connection is told already
        changed = asyncio.Event()
        self._legacy[key] = changed
        try:
            while True:
                await changed.wait()
                changed.clear()
                await ctx.session.send_tool_list_changed()
        finally:
            if self._legacy.get(key) is changed:
                del self._legacy[key]

    # ----------------------------------------------------------------- handlers

    async def _on_listen(
        self, ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        handler = self._listen if ctx.request is None else self._http_listen
        return await handler(ctx, params)

    async def _on_list_tools(
        self, _ctx: ServerRequestContext[Any, Any], _params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        # Fresh at every listing (the change watch may be a turn behind).
        self._tools = self._scan()
        return types.ListToolsResult(tools=[e.tool for e in self._tools.values()])

    async def _on_call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        name = params.name
        if name not in self._tools and self._exposure.allows(name) and self.registry.route_of(name):
            self._tools = self._scan()  # registered since the last listing
        if name not in self._tools:
            raise MCPError(code=types.INVALID_PARAMS, message=f"Unknown tool: {name}")
        if ctx.request is None:
            return await self.call(name, params.arguments)
        # A call over HTTP: when the HTTP server closes, it is answered at once (so that
        # the server does not wait out its graceful timeout for it).
        task = asyncio.ensure_future(self.call(name, params.arguments))
        self._http_calls.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            if task not in self._aborted:
                raise  # this handler was cancelled (the client went away): so was the call
            return _error_result("channel_disconnected", "the MCP server is shutting down")
        finally:
            self._http_calls.discard(task)
            self._aborted.discard(task)

    async def call(self, name: str, arguments: Mapping[str, Any] | None) -> types.CallToolResult:
        """Runs the command ``name`` as the tool call ``tools/call`` would, and returns its
        MCP result (an error as ``isError``).

        Args:
            name: The command id.
            arguments: The request object.
        """
        entry = self._tools.get(name)
        if entry is None:
            self._tools = self._scan()  # registered since the last listing, or not a tool
            entry = self._tools.get(name)
        wrapped = entry.wrapped if entry is not None else True
        try:
            value = await self.registry.execute_command(name, arguments, timeout=self.timeout)
        except CommandError as e:
            return _error_result(e.code, e.message)
        except (TypeError, ValueError) as e:  # arguments that cannot be serialised
            return _error_result("invalid_request", str(e))
        try:
            data = _jsonable(value)
        except (TypeError, ValueError) as e:
            return _error_result("internal_error", f"the result of {name!r} is not JSON: {e}")
        # As the advertised outputSchema says (an object schema: as is; else wrapped).
        if wrapped:
            structured = {RESULT_KEY: data}
        elif isinstance(data, dict):
            structured = data
        else:
            return _error_result(
                "internal_error",
                f"the result of {name!r} does not match the response schema "
                f"(an object schema; the result is {type(data).__name__})",
            )
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=text)],
            structured_content=structured,
        )

    # ----------------------------------------------------------------- transports

    async def run_stdio(self) -> None:
        """Serves one MCP client over this process's stdin and stdout until it closes
        stdin. While serving, the SDK points file descriptor 1 at stderr, so stray output
        (of handlers, or of workers spawned meanwhile) cannot corrupt the stream. To spawn
        workers before serving, claim the streams first: ``async with stdio_streams() as
        (read, write):``, spawn, then ``await server.serve_streams(read, write)``."""
        async with stdio_streams() as (read, write):
            await self.serve_streams(read, write)

    async def serve_streams(self, read: Any, write: Any) -> None:
        """Serves one MCP connection over an SDK stream pair (``stdio_streams()``, or any
        transport of the SDK) until the read side ends."""
        await self.server.run(read, write, self.server.create_initialization_options())

    def asgi_app(
        self,
        *,
        path: str = "/mcp",
        token: str | None = None,
        json_response: bool = False,
        stateless: bool = False,
        host: str = "127.0.0.1",
    ) -> ASGIApp:
        """The streamable HTTP endpoint, as an ASGI application (a Starlette app, wrapped
        in a bearer-token check when ``token`` is set).

        The application's lifespan runs the SDK's session manager: run it with an ASGI
        server (uvicorn, hypercorn) or mount it where lifespans of mounted applications are
        run (Starlette and FastAPI do not run those of ``Mount`` by themselves: enter
        ``server.session_manager.run()`` in the parent's lifespan, see docs/mcp.md). Call
        it once per :class:`MCPServer`.

        Args:
            path: The endpoint's path.
            token: Clients must send ``Authorization: Bearer <token>`` (else 401).
            json_response: Answer with JSON bodies instead of SSE streams.
            stateless: No sessions (every request on its own).
            host: The host the server is reached as: for ``127.0.0.1``, ``localhost`` and
                ``::1`` the SDK refuses other ``Host`` headers (DNS rebinding protection).
        """
        app: ASGIApp = self.server.streamable_http_app(
            streamable_http_path=path,
            json_response=json_response,
            stateless_http=stateless,
            host=host,
        )
        if token is not None:
            if not isinstance(token, str) or not token:
                raise ValueError("token must be a non-empty string (or None for no auth)")
            app = _BearerAuth(app, token)
        return app

    @property
    def session_manager(self) -> Any:
        """The SDK's streamable HTTP session manager (after :meth:`asgi_app`)."""
        return self.server.session_manager

    async def close(self) -> None:
        """Stops following the registry's commands, ends the ``subscriptions/listen``
        streams gracefully and the streamable HTTP sessions. Idempotent."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._listen.close()
        await self._end_http()
        for task in list(self._tasks):
            task.cancel()

    async def _end_http(self) -> None:
        """Ends the streamable HTTP side: its ``subscriptions/listen`` streams (gracefully),
        its tool calls in flight (answered ``channel_disconnected``) and its sessions
        (their open streams end), so that the HTTP server stops at once instead of
        waiting out its graceful timeout."""
        self._http_listen.close()
        for call in list(self._http_calls):
            self._aborted.add(call)
            call.cancel()
        manager = getattr(self.server, "_session_manager", None)
        # The SDK keeps the session transports in a private dict (no public way to end
        # them all; terminating one is what a client's DELETE does).
        sessions = getattr(manager, "_server_instances", None)
        if not isinstance(sessions, dict):
            return
        for transport in list(sessions.values()):
            try:
                await transport.terminate()
            except Exception as e:  # a half-closed transport: nothing more to end
                logger.debug("ending an MCP HTTP session failed: %r", e)

    async def __aenter__(self) -> MCPServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _BearerAuth:
    """An ASGI wrapper refusing HTTP requests without the bearer token (401)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allowed(scope):
            body = b'{"error": "missing or invalid bearer token"}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"www-authenticate", b"Bearer"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        for key, value in scope.get("headers", ()):
            if key.lower() == b"authorization":
                scheme, _, given = bytes(value).partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    given.strip(), self._token
                )
        return False


class MCPHTTPServer:
    """A running streamable HTTP MCP server made by :func:`serve_http`.

    Attributes:
        mcp: The :class:`MCPServer` it serves.
        host: The address it listens on.
        port: The port it listens on (the one chosen when ``port=0`` was asked).
        url: The MCP endpoint's URL, for MCP clients.
    """

    def __init__(
        self,
        mcp: MCPServer,
        server: uvicorn.Server,
        sock: socket.socket,
        host: str,
        port: int,
        path: str,
        *,
        owns_mcp: bool = False,
    ) -> None:
        self.mcp = mcp
        self._owns_mcp = owns_mcp
        self._server = server
        self._sock = sock
        self.host = host
        self.port = port
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{port}"
        self.url = self.base_url + path
        self._closed = False

    async def close(self) -> None:
        """Ends the HTTP listen streams and sessions (a call in flight is cancelled), stops
        listening, closes the connections (what is still open gets the shutdown timeout to
        finish) and stops the session manager. Closes the :class:`MCPServer` when
        :func:`serve_http` made it, not one it was given. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_mcp:
            await self.mcp.close()
        else:
            await self.mcp._end_http()
        self._server.should_exit = True
        await self._server.shutdown(sockets=[self._sock])

    async def __aenter__(self) -> MCPHTTPServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<MCPHTTPServer url={self.url!r}>"


async def serve_http(
    registry: CommandRegistry | MCPServer,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    path: str = "/mcp",
    token: str | None = None,
    json_response: bool = False,
    stateless: bool = False,
    shutdown_timeout: float = 2.0,
    **options: Any,
) -> MCPHTTPServer:
    """Serves ``registry``'s commands as MCP tools over streamable HTTP (uvicorn, on this
    event loop) until the returned server is closed.

    Args:
        registry: The registry (or an :class:`MCPServer` already made for it, which
            :meth:`MCPHTTPServer.close` leaves open).
        host: The address to listen on.
        port: The port; ``0`` picks a free one (read it from ``server.port``).
        path: The MCP endpoint's path.
        token: Clients must send ``Authorization: Bearer <token>``.
        json_response: Answer with JSON bodies instead of SSE streams.
        stateless: No sessions.
        shutdown_timeout: Seconds :meth:`MCPHTTPServer.close` lets open streams finish.
        **options: :class:`MCPServer`'s options (``expose``, ``timeout``, ``name``...),
            when ``registry`` is a registry.

    Raises:
        OSError: The address cannot be bound (a port in use...).
        RuntimeError: The application failed to start.

    Example::

        async with await serve_http(registry, port=8080, token=secret) as server:
            print("MCP endpoint:", server.url)
            await stop.wait()
    """
    owned = not isinstance(registry, MCPServer)
    mcp = registry if isinstance(registry, MCPServer) else MCPServer(registry, **options)
    app = mcp.asgi_app(
        path=path, token=token, json_response=json_response, stateless=stateless, host=host
    )
    # The socket is bound here, so a port in use raises OSError (uvicorn would exit).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            date_header=False,
            timeout_graceful_shutdown=max(1, math.ceil(shutdown_timeout)),
        )
        config.load()
        # uvicorn's serve() is not used: it installs signal handlers (the application's,
        # or the CLI's, business) and wakes ten times a second; startup and shutdown are
        # all a server on this loop needs.
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=[sock])
        except SystemExit:  # uvicorn's answer to a failed lifespan startup
            raise RuntimeError("the MCP application failed to start (see the log)") from None
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()
    out = MCPHTTPServer(mcp, server, sock, host, int(bound[1]), path, owns_mcp=owned)
    logger.info("serving registry %r over MCP at %s", mcp.registry.id, out.url)
    return out
