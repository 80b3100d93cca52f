"""HTTP for cmd-ipc: a client channel to a remote registry, and an aiohttp server for one.

The wire is the TypeScript implementation's HTTPChannel: every message is one
``POST {base_url}/cmd`` whose body is the JSON message (``Content-Type: application/json``,
``Accept: application/x-ndjson``); the answer is NDJSON whose first line is the response
message. Only ``list.commands.request`` and ``execute.command.request`` cross: HTTP carries
calls from a client to a server, never registrations or events.

* :class:`HTTPChannel` (client): registered in a registry, it lists the server's commands and
  makes them callable (optionally under a ``command_prefix``), then POSTs every call.
* :func:`create_app` / :func:`add_routes` / :func:`serve` (server): answer ``POST /cmd`` by
  routing each message through a registry, so a client can call any command of the server's
  tree, and publish ``GET /cmds.json``. Bearer-token auth, a body size limit and a body read
  timeout are checked before anything reaches the registry.

Example::

    import asyncio
    from cmd_ipc import CommandRegistry, HTTPChannel
    from cmd_ipc.http import serve

    async def main() -> None:
        async with CommandRegistry("api") as api, CommandRegistry("app") as app:
            await api.register_command("calc.add", lambda a, b: a + b)
            async with await serve(api, token="s3cret") as server:
                channel = HTTPChannel("api", server.url, token="s3cret", command_prefix="api")
                await app.register_channel(channel)
                print(await app.execute_command("api.calc.add", {"a": 1, "b": 2}))  # 3

    asyncio.run(main())

Logging goes to the ``cmd_ipc.http`` logger.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cmd_ipc._optional import require

require("aiohttp", "http", "HTTPChannel")

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from cmd_ipc import _core  # noqa: E402
from cmd_ipc.channels.base import Channel, OnClose, OnFrame  # noqa: E402
from cmd_ipc.errors import ChannelDisconnectedError, ProtocolError  # noqa: E402
from cmd_ipc.registry import CommandRegistry  # noqa: E402

__all__ = [
    "DEFAULT_MAX_BODY",
    "HTTPChannel",
    "HTTPServer",
    "HeadersSource",
    "add_routes",
    "create_app",
    "serve",
]

logger = logging.getLogger("cmd_ipc.http")

#: Default largest request body the server reads, in bytes (1 MiB).
DEFAULT_MAX_BODY = 1024 * 1024
#: Default largest answer the client reads, in bytes (the registry's default message limit).
DEFAULT_MAX_RESPONSE = 64 * 1024 * 1024

#: Extra headers for each request: a mapping, or a callable (sync or async) returning one,
#: called for every request (to refresh an access token, for instance).
HeadersSource = Mapping[str, str] | Callable[[], Mapping[str, str] | Awaitable[Mapping[str, str]]]

_LIST_REQUEST = "list.commands.request"
_LIST_RESPONSE = "list.commands.response"
_EXECUTE_REQUEST = "execute.command.request"
_EXECUTE_RESPONSE = "execute.command.response"
#: The answer each message type that may cross HTTP gets.
_ANSWER_TYPE = {_LIST_REQUEST: _LIST_RESPONSE, _EXECUTE_REQUEST: _EXECUTE_RESPONSE}
_NDJSON = "application/x-ndjson"
#: Seconds between two checks that the client of a waiting request is still connected.
_DISCONNECT_POLL = 0.5


#: Depth allowed when reading the header of a frame the registry itself encoded.
_TRUSTED_DEPTH = 1 << 16


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _error_response(thid: str, code: str, message: str) -> dict[str, Any]:
    """An ``execute.command.response`` failing the request ``thid`` (valid per spec-v1)."""
    return {
        "id": _core.new_id(),
        "type": _EXECUTE_RESPONSE,
        "thid": thid,
        "response": {"ok": False, "error": {"code": code, "message": message}},
    }


# ---------------------------------------------------------------------------------- client


class _Failure(Exception):
    """One POST failed; ``code`` is the spec error code its call fails with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class HTTPChannel(Channel):
    """A channel to a remote registry served over HTTP (:func:`serve`, or the TypeScript
    HTTPChannel in server mode).

    Registering it lists the server's commands and makes them routable through this channel:
    ``await registry.register_channel(HTTPChannel(...))`` returns once they are callable, and
    raises :class:`~cmd_ipc.ChannelDisconnectedError` (with the cause) if the server cannot be
    reached or refuses the request. Each call is then one ``POST {base_url}/cmd``, sent
    concurrently with the others over one keep-alive connection pool.

    HTTP only carries calls from this side to the server: command lists and executes. Events
    and registrations are not sent (a registry cannot use an HTTPChannel as its
    ``router_channel``), and the server never calls this side.

    A call fails at once, not at the request TTL, when its POST does: a connection failure
    with ``channel_disconnected``, an answer that is not 2xx or has no valid first NDJSON
    line with ``internal_error`` (naming the HTTP status), no answer within ``timeout`` with
    ``timeout``. The channel stays registered: the next call tries the server again. Only a
    failed command listing (at registration) closes it.

    Args:
        id: The channel id (the name of the remote service in the registry).
        base_url: The server's base URL, ``http(s)://host:port[/prefix]``.
        command_prefix: Makes the server's ``cmd`` callable here as ``"<prefix>.cmd"``
            (the prefix is removed again on the wire).
        token: Sent as ``Authorization: Bearer <token>``.
        headers: Extra request headers: a mapping, or a callable (sync or async) returning
            one, called for every request.
        timeout: Seconds each POST may take, from connecting to reading the answer.
        session: An ``aiohttp.ClientSession`` to share (it stays open when the channel
            closes); by default the channel opens its own and closes it on :meth:`close`.
        middlewares: aiohttp client middlewares (``async def mw(request, handler)``) run
            around every POST of this channel, in order (retries, signing, logging...);
            when given, they replace those of a shared ``session`` for this channel.
        path: The path of the endpoint under ``base_url``.
        max_response_size: Largest answer line read, in bytes.

    Example::

        channel = HTTPChannel("billing", "https://billing.internal", token=token,
                              command_prefix="billing", timeout=10)
        await registry.register_channel(channel)
        await registry.execute_command("billing.invoice.create", {"amount": 12})
    """

    wait_for_commands = True

    def __init__(
        self,
        id: str,
        base_url: str,
        *,
        command_prefix: str | None = None,
        token: str | None = None,
        headers: HeadersSource | None = None,
        timeout: float = 30.0,
        session: aiohttp.ClientSession | None = None,
        middlewares: Sequence[aiohttp.ClientMiddlewareType] = (),
        path: str = "/cmd",
        max_response_size: int = DEFAULT_MAX_RESPONSE,
    ) -> None:
        super().__init__(id, "json")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http:// or https:// URL, not {base_url!r}")
        if command_prefix is not None and (
            not isinstance(command_prefix, str) or not command_prefix.strip(".")
        ):
            raise ValueError("command_prefix must be a non-empty string")
        if not timeout > 0:
            raise ValueError("timeout must be a positive number of seconds")
        if max_response_size <= 0:
            raise ValueError("max_response_size must be positive")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/" + path.lstrip("/")
        self.command_prefix = command_prefix.strip(".") if command_prefix else None
        self.timeout = float(timeout)
        self._client_timeout = aiohttp.ClientTimeout(total=self.timeout)
        self.max_response_size = max_response_size
        self._token = token
        self._headers = headers
        self._middlewares = tuple(middlewares)
        self._session = session
        self._owns_session = session is None
        self._on_frame: OnFrame | None = None
        self._on_close: OnClose | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._close_reported = False

    def __repr__(self) -> str:
        return f"<HTTPChannel id={self.id!r} url={self.url!r}>"

    # ----------------------------------------------------------------- Channel contract

    async def start(self, on_frame: OnFrame, on_close: OnClose) -> None:
        """Checks that the server answers a command listing, then accepts frames.

        Raises:
            ChannelDisconnectedError: The server could not be reached, refused the request
                (401, 403...) or gave an invalid answer; the cause is chained.
        """
        if self._closed:
            raise ChannelDisconnectedError(f"HTTPChannel {self.id!r} is closed")
        if self._on_frame is not None:
            raise RuntimeError(f"channel {self.id!r} was already started")
        if self._session is None:
            # One keep-alive connection pool for all of this channel's requests.
            self._session = aiohttp.ClientSession()
        try:
            await self._post({"id": _core.new_id(), "type": _LIST_REQUEST})
        except _Failure as e:
            await self._drop_session()
            raise ChannelDisconnectedError(
                f"HTTPChannel {self.id!r} could not list the commands of {self.url}: {e.message}"
            ) from e.__cause__
        except BaseException:
            await self._drop_session()
            raise
        self._on_frame, self._on_close = on_frame, on_close
        logger.debug("HTTPChannel %r connected to %s", self.id, self.url)

    def send(self, frame: bytes) -> None:
        """POSTs a command listing or execute request; drops every other message."""
        if self._closed or self._on_frame is None:
            return
        raw: bytes | None = frame
        try:
            # The registry encoded it (within its own limits): only its header is needed.
            kind, message_id, _ = _core.inspect_message(
                frame, "json", max_message_size=len(frame), max_depth=_TRUSTED_DEPTH
            )
            msg: dict[str, Any] = {"id": message_id, "type": kind}
            prefix = self.command_prefix
            if prefix and kind == _EXECUTE_REQUEST:
                # `prefix.cmd` here is `cmd` on the wire: parsed in full, encoded again.
                msg, raw = json.loads(frame), None
                command_id = str(msg.get("commandId", ""))
                if command_id.startswith(prefix + "."):
                    msg["commandId"] = command_id[len(prefix) + 1 :]
        except ValueError:  # _core.ProtocolError included
            logger.debug("HTTPChannel %r dropped an undecodable frame", self.id)
            return
        if kind in _ANSWER_TYPE:
            task = asyncio.get_running_loop().create_task(self._exchange(msg, raw))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif kind == "register.command.request":
            logger.warning(
                "HTTPChannel %r cannot carry the registration of %r: an HTTPChannel cannot be "
                "a registry's router_channel (HTTP only carries calls to the server)",
                self.id,
                (json.loads(frame).get("command") or {}).get("id"),
            )
        else:
            logger.debug("HTTPChannel %r does not carry %s messages: dropped", self.id, kind)

    async def close(self) -> None:
        """Cancels the POSTs in flight (their calls fail with ``channel_disconnected``) and
        closes the channel's own session. Idempotent."""
        await self._shutdown(None)

    async def _shutdown(self, reason: str | None) -> None:
        """Ends the channel: cancels the other POSTs in flight, closes the channel's own
        session and reports the close (once)."""
        if not self._closed:
            self._closed = True
            current = asyncio.current_task()
            tasks = [t for t in self._tasks if t is not current]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await self._drop_session()
        self._report_close(reason)

    # ----------------------------------------------------------------- internals

    async def _drop_session(self) -> None:
        """Closes the session if the channel opened it (a shared one is left alone)."""
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _deliver(self, frame: bytes) -> None:
        if not self._closed and self._on_frame is not None:
            self._on_frame(frame)

    async def _exchange(self, msg: dict[str, Any], raw: bytes | None = None) -> None:
        """POSTs one request (as on the wire; ``raw``: its JSON as the registry encoded it,
        when it goes unchanged) and hands its answer (or a failure) to the registry."""
        kind = msg["type"]
        prefix = self.command_prefix
        try:
            line = await self._post(msg, raw)
        except _Failure as e:
            if kind == _EXECUTE_REQUEST:
                logger.debug("HTTPChannel %r: call %s failed: %s", self.id, msg["id"], e.message)
                self._deliver(_dumps(_error_response(msg["id"], e.code, e.message)))
            else:
                # The registry lists a channel's commands once, when it attaches it: without
                # them the channel is useless, so it ends (register_channel then raises).
                reason = f"listing the commands of {self.url} failed: {e.message}"
                logger.warning("HTTPChannel %r: %s", self.id, reason)
                await self._shutdown(reason)
            return
        if kind == _LIST_REQUEST and prefix:
            answer = json.loads(line)
            answer["commands"] = [
                {**c, "id": f"{prefix}.{c['id']}"} for c in answer.get("commands", [])
            ]
            line = _dumps(answer)
        self._deliver(line)

    async def _request_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        source = self._headers
        extra: Mapping[str, str] | None
        if callable(source):
            made = source()
            extra = await made if inspect.isawaitable(made) else made
        else:
            extra = source
        if extra:
            headers.update(extra)
        # The wire format is fixed: these two cannot be changed by the hook.
        headers["Content-Type"] = "application/json"
        headers["Accept"] = _NDJSON
        return headers

    async def _post(self, msg: dict[str, Any], raw: bytes | None = None) -> bytes:
        """POSTs ``msg`` (``raw`` if given: its encoding); returns the answer's JSON line,
        checked.

        Raises:
            _Failure: With the spec code the call should fail with.
        """
        session = self._session
        if self._closed or session is None or session.closed:
            raise _Failure("channel_disconnected", f"HTTPChannel {self.id!r} is closed")
        body = raw if raw is not None else _dumps(msg)
        try:
            headers = await self._request_headers()
        except Exception as e:
            raise _Failure("internal_error", f"the headers hook failed: {e!r}") from e
        try:
            async with session.post(
                self.url,
                data=body,
                headers=headers,
                timeout=self._client_timeout,
                middlewares=self._middlewares or None,
            ) as resp:
                if not 200 <= resp.status < 300:
                    detail = await _snippet(resp)
                    message = f"HTTP {resp.status} {resp.reason or ''}".rstrip()
                    # The cause lets a caller of register_channel see the status (401...).
                    cause = aiohttp.ClientResponseError(
                        resp.request_info,
                        resp.history,
                        status=resp.status,
                        message=resp.reason or "",
                        headers=resp.headers,
                    )
                    raise _Failure(
                        "internal_error",
                        f"{message} from POST {self.url}" + (f": {detail}" if detail else ""),
                    ) from cause
                line = await self._first_line(resp)
        except _Failure:
            raise
        except aiohttp.ConnectionTimeoutError as e:
            raise _Failure("channel_disconnected", f"could not connect to {self.url}: {e!r}") from e
        except asyncio.TimeoutError as e:
            raise _Failure(
                "timeout", f"no answer from POST {self.url} within {self.timeout}s"
            ) from e
        except aiohttp.ClientResponseError as e:  # a middleware's raise_for_status()
            raise _Failure("internal_error", f"HTTP {e.status} from POST {self.url}") from e
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as e:
            raise _Failure("channel_disconnected", f"connection to {self.url} failed: {e!r}") from e
        except Exception as e:  # a middleware raised
            raise _Failure("internal_error", f"POST {self.url} failed: {e!r}") from e
        self._check_answer(msg, line, resp.status)
        return line

    async def _first_line(self, resp: aiohttp.ClientResponse) -> bytes:
        """Reads the answer up to its first newline (the rest is drained, so the connection
        can be reused)."""
        buf = bytearray()
        found = False
        while not found:
            chunk = await resp.content.readany()
            if not chunk:
                break
            nl = chunk.find(b"\n")
            if nl >= 0:
                chunk, found = chunk[:nl], True
            buf += chunk
            if len(buf) > self.max_response_size:
                raise _Failure(
                    "internal_error",
                    f"the answer of {self.url} exceeds {self.max_response_size} bytes",
                )
        if found:
            # Drain a bounded tail (a conforming server sends nothing more).
            budget = 64 * 1024
            while budget > 0:
                chunk = await resp.content.readany()
                if not chunk:
                    break
                budget -= len(chunk)
        return bytes(buf).strip()

    def _check_answer(self, msg: dict[str, Any], line: bytes, status: int) -> None:
        """Checks that ``line`` is a valid answer to ``msg``."""

        def failure(what: str) -> _Failure:
            return _Failure("internal_error", f"HTTP {status} from POST {self.url}: {what}")

        if not line:
            raise failure("empty answer (expected an NDJSON line)")
        try:
            kind, _, thid = _core.inspect_message(
                line, "json", max_message_size=self.max_response_size
            )
        except ValueError as e:  # _core.ProtocolError included
            raise failure(f"invalid answer: {e}") from e
        want = _ANSWER_TYPE[msg["type"]]
        if kind != want or thid != msg["id"]:
            raise failure(f"expected a {want} to {msg['id']!r}, got a {kind} to {thid!r}")


async def _snippet(resp: aiohttp.ClientResponse, limit: int = 200) -> str:
    """The start of an error answer's body, for the error message."""
    try:
        data = await resp.content.read(limit)
    except Exception:
        return ""
    return data.decode("utf-8", "replace").strip()


# ---------------------------------------------------------------------------------- server


class _EndpointChannel(Channel):
    """The channel through which an HTTP endpoint hands POSTed messages to its registry.

    One per endpoint, attached on the first request. Each POSTed message is delivered as if
    a peer had sent it; the router's answer (whose ``thid`` is the message's id) settles the
    waiting request. Two messages with the same id cannot be in flight at once (the second
    is refused with 409), so answers never cross. Everything else the router sends here
    (the list request every new channel gets, events) does not cross HTTP and is dropped.
    """

    def __init__(self, id: str) -> None:
        super().__init__(id, "json")
        self.pending: dict[str, asyncio.Future[bytes]] = {}
        self._on_frame: OnFrame | None = None
        self._on_close: OnClose | None = None
        self.closed = False

    async def start(self, on_frame: OnFrame, on_close: OnClose) -> None:
        self._on_frame, self._on_close = on_frame, on_close

    def deliver(self, frame: bytes) -> None:
        if not self.closed and self._on_frame is not None:
            self._on_frame(frame)

    def send(self, frame: bytes) -> None:
        try:
            # The registry encoded it (within its own limits): only its header is needed.
            kind, _, thid = _core.inspect_message(
                frame, "json", max_message_size=len(frame), max_depth=_TRUSTED_DEPTH
            )
        except ProtocolError:  # never raised for the registry's own frames; send never raises
            return
        if kind not in (_EXECUTE_RESPONSE, _LIST_RESPONSE) or thid is None:
            return  # the list request every new channel gets, events: they do not cross
        waiter = self.pending.pop(thid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            for waiter in self.pending.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("the registry closed the channel"))
            self.pending.clear()
            if self._on_close is not None:
                self._on_close(None)


@dataclass(frozen=True)
class _Options:
    token: bytes | None
    max_body: int
    read_timeout: float
    answer_timeout: float | None
    path: str
    schema_path: str | None
    schema_auth: bool


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
        commands = [c for c in json.loads(answer)["commands"] if not c["id"].startswith("_")]
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
    schema_auth: bool = False,
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
    application's cleanup): a client can call any command the registry can reach (its own,
    its children's, its router's), never a private ``_`` one (answered ``not_found``). Two
    messages with the same id may not be in flight at once: the second is answered ``409``.
    An execute that gets no answer within ``answer_timeout`` is answered with a ``timeout``
    error response.

    ``GET {schema_path}`` (unless ``None``) answers ``{"cmdschema": "1.0.0", "commands":
    [...]}``: the public commands a client can call, with their descriptions and schemas
    (the set a ``list.commands.request`` returns). It needs the token only with
    ``schema_auth``.

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
        schema_auth: Require the token for the schema document too.
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
    opts = _Options(
        token=None if token is None else token.encode(),
        max_body=max_body,
        read_timeout=float(read_timeout),
        answer_timeout=answer_timeout,
        path=path,
        schema_path=schema_path,
        schema_auth=schema_auth,
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
    schema_auth: bool = False,
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
    )
    return app


class HTTPServer:
    """A running server made by :func:`serve`.

    Attributes:
        host: The address it listens on.
        port: The port it listens on (the one chosen when ``port=0`` was asked).
        url: Its base URL, for :class:`HTTPChannel`.
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
        **options: The options of :func:`create_app` (``token``, ``max_body``,
            ``read_timeout``...).

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
