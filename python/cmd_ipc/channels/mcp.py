"""MCPClientChannel: an MCP server's tools as commands of a registry.

The channel is an MCP client (the official ``mcp`` SDK) of one server, started as a child
process that speaks MCP over its stdin and stdout (an argv), or reached over streamable HTTP
(a URL, with extra headers). Registered in a registry, the server's tools become commands
(under ``command_prefix`` when given) of the registry and of its tree: the channel answers the
registry's command listing with them and registers each one, as a child registry would, so
they escalate to the root like any command.

* Schemas: a tool's ``inputSchema`` is the command's ``schema.request``, its
  ``outputSchema`` the ``schema.response``; an output schema of the form ``{"type":
  "object", "properties": {"result": S}, "required": ["result"]}`` (how the SDK's servers,
  and :mod:`cmd_ipc.server.mcp`, describe a result that is not an object) becomes ``S``
  (no response schema when ``S`` is ``{}``, any value).
* Results: ``structuredContent`` is preferred (``{"result": value}`` under such a wrapping
  output schema is ``value``); without it, a single text content that is JSON is decoded,
  other text is returned as a string (several as a list), no content is ``None``.
* Errors: ``isError`` results fail the call with the code their ``structuredContent``
  carries (``{"code", "message"}``, as :mod:`cmd_ipc.server.mcp` sends) when it is a
  cmd-ipc code, else ``internal_error`` with the text content as the message. An MCP
  "unknown tool" error is ``not_found``, another invalid-params error
  ``invalid_request``, the SDK's request timeout ``timeout``, a closed connection
  ``channel_disconnected``.
* Changes: on ``notifications/tools/list_changed`` (handshake-era servers) or a
  ``toolsListChanged`` event of a ``subscriptions/listen`` stream (2026-07-28 servers) the
  channel lists the tools again and registers the new and changed ones. A listen stream
  that ends while the session goes on is opened again (after a back-off: 0.1 s, doubling
  up to 30 s; a warning is logged); the tools are listed again each time a stream is
  acknowledged, since changes made before (after the first listing, or while a lost stream
  was down) were not heard. The spec has no
  message to unregister a command: a removed tool is answered ``not_found`` by the channel
  at once, and leaves the registry when the channel re-attaches itself (which it does as
  soon as no call is in flight on it: the registry lists it again, as after a reconnect).
* Exit: when the server process exits (end of its stdout) or the HTTP transport ends, the
  channel closes at once, so every call waiting on it fails with ``channel_disconnected``.
  An HTTP server that went away is noticed by the next request to it: a tool call whose
  connection fails, whose response stream ends without a response, or whose session the
  server no longer knows (``Session terminated``, ``Session not found``) fails with
  ``channel_disconnected`` and closes the channel. An idle channel to a vanished HTTP
  server notices nothing until its next call (MCP has no heartbeat).

Example::

    import asyncio, sys
    from cmd_ipc import CommandRegistry
    from cmd_ipc.channels.mcp import MCPClientChannel

    async def main() -> None:
        async with CommandRegistry("app") as app:
            argv = ["npx", "-y", "@modelcontextprotocol/server-filesystem", "."]
            await app.register_channel(MCPClientChannel("files", argv, command_prefix="fs"))
            print(await app.execute_command("fs.list_directory", {"path": "."}))

    asyncio.run(main())

Logging goes to the ``cmd_ipc.mcp`` logger.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, TextIO

from cmd_ipc._optional import require

require("mcp", "mcp", "MCPClientChannel")

import httpx2  # noqa: E402
import mcp_types as types  # noqa: E402
from mcp import Client, StdioServerParameters, stdio_client  # noqa: E402
from mcp.client.streamable_http import (  # noqa: E402
    StreamableHTTPError,
    streamable_http_client,
)
from mcp.client.subscriptions import ListenNotSupportedError  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402
from mcp.shared.message import SessionMessage  # noqa: E402
from mcp_types.version import MODERN_PROTOCOL_VERSIONS  # noqa: E402

from cmd_ipc import _core  # noqa: E402
from cmd_ipc.channels.base import Channel, OnClose, OnFrame  # noqa: E402
from cmd_ipc.errors import ChannelDisconnectedError  # noqa: E402

__all__ = ["MCPClientChannel"]

logger = logging.getLogger("cmd_ipc.mcp")

#: The error codes a result's ``structuredContent`` may carry through to the caller.
_CODES = frozenset(
    {"not_found", "invalid_request", "internal_error", "timeout", "channel_disconnected"}
)
_RESULT = "result"
#: The back-off of reopening a lost ``subscriptions/listen`` stream: first, and at most.
_LISTEN_DELAY = 0.1
_LISTEN_DELAY_MAX = 30.0
#: The messages of the SDK's JSON-RPC errors that say an HTTP session is gone (a 404 of
#: the SDK's client, the body of a 404 of the SDK's server).
_SESSION_GONE = ("session terminated", "session not found")
_LIST_CHANGED = "notifications/tools/list_changed"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _unwrap_schema(schema: Mapping[str, Any] | None) -> tuple[dict[str, Any] | None, bool]:
    """``(response schema, wrapped)`` of an ``outputSchema``: the inner schema of a
    ``{"result": S}`` wrapper (with the wrapper's ``$defs`` back in it), else as is."""
    if schema is None:
        return None, False
    props = schema.get("properties")
    if (
        schema.get("type") == "object"
        and isinstance(props, Mapping)
        and set(props) == {_RESULT}
        and list(schema.get("required") or ()) == [_RESULT]
        and isinstance(props[_RESULT], Mapping)
    ):
        inner = dict(props[_RESULT])
        if not inner:
            return None, True  # any value: no response schema to give
        for key in ("$defs", "definitions"):
            if key in schema:
                inner[key] = schema[key]
        return inner, True
    return dict(schema), False


class _WatchedRead:
    """The transport's read stream, telling the channel when it ends (the server exited, or
    the connection is gone)."""

    def __init__(self, inner: Any, on_end: Any) -> None:
        self._inner = inner
        self._on_end = on_end

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        try:
            item: SessionMessage | Exception = await self._inner.receive()
        except BaseException:
            self._on_end()
            raise
        return item

    async def aclose(self) -> None:
        await self._inner.aclose()

    def __aiter__(self) -> _WatchedRead:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            item: SessionMessage | Exception = await self._inner.__anext__()
        except BaseException:
            self._on_end()
            raise
        return item

    async def __aenter__(self) -> _WatchedRead:
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        result: bool | None = await self._inner.__aexit__(exc_type, exc_val, exc_tb)
        return result


class _WatchedTransport:
    """An SDK transport whose read stream reports its end."""

    def __init__(self, inner: Any, on_end: Any) -> None:
        self._inner = inner
        self._on_end = on_end

    async def __aenter__(self) -> tuple[Any, Any]:
        read, write = await self._inner.__aenter__()
        return _WatchedRead(read, self._on_end), write

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        result: bool | None = await self._inner.__aexit__(exc_type, exc_val, exc_tb)
        return result


class MCPClientChannel(Channel):
    """A channel to an MCP server whose tools become commands (see the module docstring).

    Args:
        id: The channel id.
        server: An ``http(s)://`` URL of a streamable HTTP endpoint, or the argv of a
            server that speaks MCP over stdio (``["python", "-m", "my_server"]``).
        command_prefix: Makes the tool ``t`` the command ``"<prefix>.t"``.
        headers: Extra HTTP headers for every request (a URL server only): an
            ``Authorization`` header, say.
        env: Environment variables of a stdio server, over the SDK's safe defaults (``HOME``,
            ``PATH``, ``USER``...; the rest of this process's environment is not passed).
        cwd: Working directory of a stdio server.
        timeout: Seconds each tool call (and connecting: starting the server, the
            handshake and the first listing) may take; a slower call fails with
            ``timeout``.
        mode: The SDK's protocol negotiation: ``"auto"`` (2026-07-28 when the server speaks
            it, else the ``initialize`` handshake), ``"legacy"`` (always the handshake), or a
            protocol version.
        stderr: Where a stdio server's stderr goes (default: this process's).

    Raises:
        ValueError: ``server`` is neither a URL nor a non-empty argv, or an option is bad.
    """

    wait_for_commands = True
    #: Re-attached by its registry after a removed tool: see the module docstring.
    reconnects = True
    #: Events do not cross MCP.
    carries_events = False

    def __init__(
        self,
        id: str,
        server: str | Sequence[str],
        *,
        command_prefix: str | None = None,
        headers: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float = 30.0,
        mode: str = "auto",
        stderr: TextIO | None = None,
    ) -> None:
        super().__init__(id, "json")
        if isinstance(server, str):
            if not server.startswith(("http://", "https://")):
                raise ValueError(
                    f"server must be an http(s):// URL or an argv list, not {server!r} "
                    "(a command line is a list: ['python', '-m', 'my_server'])"
                )
            self.url: str | None = server
            self.argv: list[str] | None = None
        else:
            argv = [str(a) for a in server]
            if not argv:
                raise ValueError("the argv of a stdio MCP server cannot be empty")
            self.url, self.argv = None, argv
        if headers and self.url is None:
            raise ValueError("headers are for an HTTP server; a stdio server takes env=")
        if self.url is not None and (env is not None or cwd is not None):
            raise ValueError("env= and cwd= are for a stdio server; an HTTP server takes headers=")
        if command_prefix is not None and (
            not isinstance(command_prefix, str) or not command_prefix.strip(".")
        ):
            raise ValueError("command_prefix must be a non-empty string")
        if not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        self.command_prefix = command_prefix.strip(".") if command_prefix else None
        self.timeout = float(timeout)
        self.mode = mode
        self._headers = dict(headers or {})
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._stderr = stderr
        self._on_frame: OnFrame | None = None
        self._on_close: OnClose | None = None
        self._client: Client | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        #: The tools by command id (prefixed), and the command ids whose outputSchema wraps.
        self._tools: dict[str, types.Tool] = {}
        self._wrapped: set[str] = set()
        self._inflight = 0
        self._swap = False
        self._relisting: asyncio.Task[None] | None = None
        self._relist_again = False
        self._closed = False
        self._ended: str | None = None

    def __repr__(self) -> str:
        return f"<MCPClientChannel id={self.id!r} server={self.url or self.argv!r}>"

    @property
    def client(self) -> Client | None:
        """The SDK's ``mcp.Client`` while connected (for resources, prompts...)."""
        return self._client

    @property
    def tools(self) -> dict[str, types.Tool]:
        """The server's tools by command id (a copy)."""
        return dict(self._tools)

    # ----------------------------------------------------------------- Channel contract

    async def start(self, on_frame: OnFrame, on_close: OnClose) -> None:
        """Connects to the server and lists its tools (once; a re-attach only takes the
        new callbacks).

        Raises:
            ChannelDisconnectedError: The server could not be started or reached, or did
                not answer within ``timeout`` (the cause is chained).
        """
        if self._closed or self._ended is not None:
            raise ChannelDisconnectedError(f"MCPClientChannel {self.id!r} is closed")
        self._on_frame, self._on_close = on_frame, on_close
        self._close_reported = False
        if self._runner is not None:
            return  # re-attached after a removed tool: the session is still there
        loop = asyncio.get_running_loop()
        connected: asyncio.Future[None] = loop.create_future()
        self._runner = loop.create_task(self._run(connected))
        try:
            await asyncio.wait_for(asyncio.shield(connected), self.timeout)
        except BaseException as e:
            self._closed = True
            self._stop.set()
            # Given up: the runner may be stuck in the handshake (a server that never
            # answers), so it is cancelled, and its outcome is no one's to retrieve.
            if not connected.done():
                connected.cancel()
            elif not connected.cancelled():
                connected.exception()
            self._runner.cancel()
            with contextlib.suppress(BaseException):
                await self._runner
            what = self.url or " ".join(self.argv or [])
            if isinstance(e, asyncio.TimeoutError):
                raise ChannelDisconnectedError(
                    f"MCP server {what} did not answer within {self.timeout}s"
                ) from e
            if isinstance(e, Exception):
                raise ChannelDisconnectedError(
                    f"MCPClientChannel {self.id!r} could not connect to {what}: {_leaf(e)!r}"
                ) from e
            raise

    def send(self, frame: bytes) -> None:
        """Answers a command listing, runs an execute request; drops the rest."""
        try:
            msg = json.loads(frame)
        except ValueError:
            return
        if isinstance(msg, dict):
            self._handle(msg)

    def send_with_head(
        self, frame: bytes, kind: str, message_id: str, reference: str | None
    ) -> None:
        """:meth:`send` (the frame is read only for an execute request's ``request``)."""
        if self._closed or self._on_frame is None:
            return
        if kind == "list.commands.request":
            self._answer_list(message_id)
        elif kind in ("execute.command.request", "register.command.response"):
            self.send(frame)
        # Events and everything else do not cross MCP.

    async def close(self) -> None:
        """Ends the MCP session (a stdio server is stopped: stdin closed, then the SDK's
        termination escalation) and reports the close. Idempotent."""
        self._closed = True
        self._stop.set()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        runner = self._runner
        if runner is not None and runner is not asyncio.current_task():
            with contextlib.suppress(BaseException):
                await runner
        self._report_close(None)

    async def reconnect(self) -> bool:
        """True when the close was this channel's own re-attach after a removed tool."""
        if self._swap and not self._closed and self._ended is None:
            self._swap = False
            return True
        return False

    # ----------------------------------------------------------------- the session

    def _transport(self) -> tuple[Any, httpx2.AsyncClient | None]:
        if self.url is not None:
            http = httpx2.AsyncClient(
                headers=self._headers, timeout=httpx2.Timeout(self.timeout, read=300.0)
            )
            return streamable_http_client(self.url, http_client=http), http
        assert self.argv is not None
        params = StdioServerParameters(
            command=self.argv[0], args=self.argv[1:], env=self._env, cwd=self._cwd
        )
        return stdio_client(params, errlog=self._stderr or sys.stderr), None

    async def _run(self, connected: asyncio.Future[None]) -> None:
        """Holds the MCP session (the SDK's contexts are entered and left by this task)."""
        reason = "the MCP session ended"
        try:
            async with AsyncExitStack() as stack:
                inner, http = self._transport()
                if http is not None:
                    stack.push_async_callback(http.aclose)
                client = Client(
                    _WatchedTransport(inner, self._transport_ended),
                    mode=self.mode,
                    message_handler=self._on_message,
                    read_timeout_seconds=self.timeout,
                    cache=None,
                )
                await stack.enter_async_context(client)
                self._client = client
                self._set_tools(await self._list_tools(client))
                if client.protocol_version in MODERN_PROTOCOL_VERSIONS:
                    self._spawn(self._listen(client))
                connected.set_result(None)
                await self._stop.wait()
        except BaseException as e:
            if not connected.done():
                if isinstance(e, Exception):
                    connected.set_exception(e)
                    return
                connected.cancel()
                raise
            reason = f"the MCP session failed: {e!r}"
            if not isinstance(e, Exception):
                raise
        finally:
            self._client = None
            self._end(self._ended or reason)

    def _transport_ended(self) -> None:
        """The read stream ended: the server exited or the connection is gone."""
        if self._ended is None and not self._closed:
            what = "exited" if self.argv is not None else "closed the connection"
            self._end(f"the MCP server {what}")
            self._stop.set()

    def _lost(self, reason: str) -> dict[str, Any]:
        """The HTTP server is gone (or forgot the session): the channel ends (calls waiting
        on it fail at once) and the call is answered ``channel_disconnected``."""
        if self._ended is None and not self._closed:
            logger.warning("MCPClientChannel %r: %s: closing the channel", self.id, reason)
            # After this call's answer is delivered (the close would drop it).
            asyncio.get_running_loop().call_soon(self._end_lost, reason)
        return _error("channel_disconnected", reason)

    def _end_lost(self, reason: str) -> None:
        if self._ended is None and not self._closed:
            self._end(reason)
            self._stop.set()

    def _end(self, reason: str) -> None:
        """Reports the end of the session once (calls waiting on the channel fail at once)."""
        if self._ended is None:
            self._ended = reason
        if not self._closed:
            self._report_close(self._ended)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _list_tools(self, client: Client) -> list[types.Tool]:
        tools: list[types.Tool] = []
        cursor: str | None = None
        for _ in range(1000):  # a server whose cursors never end cannot hang us
            page = await client.list_tools(cursor=cursor)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        return tools

    async def _listen(self, client: Client) -> None:
        """A 2026-07-28 server tells of changes on a ``subscriptions/listen`` stream, which
        is opened again (with back-off) whenever it ends while the session goes on."""
        delay = _LISTEN_DELAY
        while not self._stopping(client):
            why: object = "the server ended it"
            try:
                async with client.listen(tools_list_changed=True) as sub:
                    delay = _LISTEN_DELAY
                    # Changes made before the stream was acknowledged were not heard (since
                    # the first listing, or while a lost stream was down).
                    self._relist()
                    async for _event in sub:
                        self._relist()
            except ListenNotSupportedError:
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                why = _leaf(e)
            if self._stopping(client):
                return
            logger.warning(
                "MCPClientChannel %r: the listen stream ended (%s): opening it again in %gs",
                self.id,
                why,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _LISTEN_DELAY_MAX)

    def _stopping(self, client: Client) -> bool:
        return self._closed or self._ended is not None or self._client is not client

    async def _on_message(self, message: Any) -> None:
        if getattr(message, "method", None) == _LIST_CHANGED:
            self._relist()

    def _relist(self) -> None:
        """Lists the tools again (one listing at a time; a change during one makes another)."""
        if self._relisting is not None and not self._relisting.done():
            self._relist_again = True
            return
        task = asyncio.get_running_loop().create_task(self._relist_now())
        self._relisting = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relist_now(self) -> None:
        while True:
            self._relist_again = False
            client = self._client
            if client is None or self._closed:
                return
            try:
                tools = await self._list_tools(client)
            except Exception as e:
                logger.warning("MCPClientChannel %r could not list the tools again: %r", self.id, e)
                return
            self._apply_tools(tools)
            if not self._relist_again:
                return

    def _command_id(self, name: str) -> str:
        return f"{self.command_prefix}.{name}" if self.command_prefix else name

    def _set_tools(self, tools: list[types.Tool]) -> None:
        self._tools = {self._command_id(t.name): t for t in tools}
        self._wrapped = {
            cid for cid, t in self._tools.items() if _unwrap_schema(t.output_schema)[1]
        }

    def _apply_tools(self, tools: list[types.Tool]) -> None:
        old = self._tools
        self._set_tools(tools)
        new = self._tools
        changed = [cid for cid, t in new.items() if old.get(cid) != t]
        removed = [cid for cid in old if cid not in new]
        if not changed and not removed:
            return
        logger.info(
            "MCPClientChannel %r: tools changed (%d new or changed, %d removed)",
            self.id,
            len(changed),
            len(removed),
        )
        for cid in changed:
            self._deliver(self._register_request(cid, new[cid]))
        if removed:
            self._swap = True
            self._maybe_swap()

    def _maybe_swap(self) -> None:
        """Re-attaches the channel (so removed tools leave the registry) once idle."""
        if self._swap and self._inflight == 0 and not self._closed and self._ended is None:
            self._report_close("the MCP server removed tools: listing them again")

    # ----------------------------------------------------------------- messages

    def _deliver(self, msg: dict[str, Any]) -> None:
        if not self._closed and not self._close_reported and self._on_frame is not None:
            self._on_frame(_dumps(msg))

    def _definition(self, command_id: str, tool: types.Tool) -> dict[str, Any]:
        definition: dict[str, Any] = {"id": command_id}
        if tool.description:
            definition["description"] = tool.description
        schema: dict[str, Any] = {}
        if tool.input_schema:
            schema["request"] = tool.input_schema
        response, _ = _unwrap_schema(tool.output_schema)
        if response is not None:
            schema["response"] = response
        if schema:
            definition["schema"] = schema
        return definition

    def _register_request(self, command_id: str, tool: types.Tool) -> dict[str, Any]:
        return {
            "id": _core.new_id(),
            "type": "register.command.request",
            "command": self._definition(command_id, tool),
        }

    def _answer_list(self, thid: str) -> None:
        # Registered (so they escalate to the root, like a child's commands), and listed
        # (so they are callable here before the tree's acknowledgement).
        for cid, tool in self._tools.items():
            self._deliver(self._register_request(cid, tool))
        self._deliver(
            {
                "id": _core.new_id(),
                "type": "list.commands.response",
                "thid": thid,
                "commands": [self._definition(cid, t) for cid, t in self._tools.items()],
            }
        )

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "register.command.response":
            response = msg.get("response") or {}
            if not response.get("ok", False):
                error = response.get("error")
                logger.warning("MCPClientChannel %r: a tool was not registered: %s", self.id, error)
            return
        if kind != "execute.command.request":
            return
        thid = str(msg.get("id"))
        command_id = str(msg.get("commandId"))
        tool = self._tools.get(command_id)
        if tool is None:
            self._respond_error(
                thid,
                "not_found",
                f"the MCP server of channel {self.id!r} has no tool for {command_id!r}",
            )
            return
        request = msg.get("request")
        self._inflight += 1
        self._spawn(
            self._call(thid, command_id, tool, request if isinstance(request, dict) else None)
        )

    def _respond(self, thid: str, response: dict[str, Any]) -> None:
        self._deliver(
            {
                "id": _core.new_id(),
                "type": "execute.command.response",
                "thid": thid,
                "response": response,
            }
        )

    def _respond_error(self, thid: str, code: str, message: str) -> None:
        self._respond(thid, {"ok": False, "error": {"code": code, "message": message}})

    async def _call(
        self, thid: str, command_id: str, tool: types.Tool, request: dict[str, Any] | None
    ) -> None:
        try:
            outcome = await self._call_tool(command_id, tool, request)
        finally:
            self._inflight -= 1
        self._respond(thid, outcome)
        self._maybe_swap()

    async def _call_tool(
        self, command_id: str, tool: types.Tool, request: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The spec response (``{"ok": ...}``) of one tool call."""
        client = self._client
        if client is None:
            return _error("channel_disconnected", f"MCPClientChannel {self.id!r} is not connected")
        try:
            result = await client.call_tool(
                tool.name, request or {}, read_timeout_seconds=self.timeout
            )
        except MCPError as e:
            if self.url is not None and _session_lost(e):
                return self._lost(f"the MCP server went away during {tool.name!r}: {e}")
            return _error(*_mcp_error(e, tool.name))
        except (TimeoutError, asyncio.TimeoutError):
            return _error("timeout", f"tool {tool.name!r} did not answer within {self.timeout}s")
        except asyncio.CancelledError:
            raise
        except (httpx2.TransportError, httpx2.HTTPStatusError, StreamableHTTPError) as e:
            return self._lost(f"the MCP server could not be reached for {tool.name!r}: {e!r}")
        except Exception as e:  # the SDK's output-schema check...
            return _error("internal_error", f"tool {tool.name!r} failed: {e}")
        if not isinstance(result, types.CallToolResult):
            return _error("internal_error", f"tool {tool.name!r} gave a {type(result).__name__}")
        if result.is_error:
            return _error(*_tool_error(result))
        value = _result_value(result, command_id in self._wrapped)
        out: dict[str, Any] = {"ok": True}
        if value is not None:
            out["result"] = value
        return out


def _leaf(e: BaseException) -> BaseException:
    """The first error inside nested exception groups (what the SDK's task groups raise)."""
    inner = getattr(e, "exceptions", None)  # an exception group (builtin from 3.11)
    while isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
        e = inner[0]
        inner = getattr(e, "exceptions", None)
    return e


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}


def _texts(result: types.CallToolResult) -> list[str]:
    return [c.text for c in result.content if isinstance(c, types.TextContent)]


def _tool_error(result: types.CallToolResult) -> tuple[str, str]:
    """``(code, message)`` of an ``isError`` result."""
    structured = result.structured_content
    text = "\n".join(_texts(result))
    if isinstance(structured, dict) and structured.get("code") in _CODES:
        message = structured.get("message")
        return str(structured["code"]), str(message) if message is not None else text
    return "internal_error", text or "the tool failed"


def _session_lost(e: MCPError) -> bool:
    """Whether a JSON-RPC error of an HTTP request says the server or its session is gone."""
    if e.error.code == types.CONNECTION_CLOSED:
        return True  # the response stream ended without a response (after its retries)
    message = e.error.message.lower()
    return e.error.code == types.INVALID_REQUEST and any(m in message for m in _SESSION_GONE)


def _mcp_error(e: MCPError, name: str) -> tuple[str, str]:
    """``(code, message)`` of a JSON-RPC error of a ``tools/call``."""
    code = e.error.code
    message = e.error.message
    if code == types.CONNECTION_CLOSED:
        return "channel_disconnected", f"the MCP server went away during {name!r}: {message}"
    if code == types.REQUEST_TIMEOUT:
        return "timeout", message
    if code == types.INVALID_PARAMS:
        if "unknown tool" in message.lower() or "not found" in message.lower():
            return "not_found", message
        return "invalid_request", message
    if code == types.METHOD_NOT_FOUND:
        return "not_found", message
    return "internal_error", message


def _result_value(result: types.CallToolResult, wrapped: bool) -> Any:
    """The value of a successful result: ``structuredContent`` first, then the text."""
    structured = result.structured_content
    if structured is not None:
        if wrapped and isinstance(structured, dict) and set(structured) == {_RESULT}:
            return structured[_RESULT]
        return structured
    texts = _texts(result)
    if not result.content:
        return None
    if len(texts) == 1:
        try:
            return json.loads(texts[0])
        except ValueError:
            return texts[0]
    return texts
