"""The HTTP client channel: a registry served over HTTP, as a channel of this one.

The wire is the TypeScript implementation's HTTPChannel: every message is one
``POST {base_url}/cmd`` whose body is the JSON message (``Content-Type: application/json``,
``Accept: application/x-ndjson``); the answer is NDJSON whose first line is the response
message. Only ``list.commands.request`` and ``execute.command.request`` cross: HTTP carries
calls from a client to a server, never registrations or events.

* :class:`HTTPChannel` (client): registered in a registry, it lists the server's commands and
  makes them callable (optionally under a ``command_prefix``), then POSTs every call.
* The servers live in :mod:`cmd_ipc.server.http` (aiohttp: ``create_app`` / ``add_routes`` /
  ``serve``) and :mod:`cmd_ipc.asgi` (an ASGI application for uvicorn, Starlette, FastAPI...);
  they share one endpoint (:mod:`cmd_ipc.server._endpoint`), so they answer alike.

A frame the registry encoded is not parsed here: the registry gives its type, id and
reference with it (:meth:`Channel.send_with_head`); with a ``command_prefix``, an execute
request is decoded and encoded once more to take the prefix off its command id. An answer
from the network is validated once here, then read by the registry.

Example::

    import asyncio
    from cmd_ipc import CommandRegistry, HTTPChannel
    from cmd_ipc.server.http import serve

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
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from cmd_ipc._optional import require

require("aiohttp", "http", "HTTPChannel")

import aiohttp  # noqa: E402

from cmd_ipc import _core  # noqa: E402
from cmd_ipc._http_wire import (  # noqa: E402
    _ANSWER_TYPE,
    _EXECUTE_REQUEST,
    _LIST_REQUEST,
    _NDJSON,
    _dumps,
    _error_response,
    _head,
)
from cmd_ipc.channels.base import Channel, OnClose, OnFrame  # noqa: E402
from cmd_ipc.errors import ChannelDisconnectedError  # noqa: E402

__all__ = ["DEFAULT_MAX_RESPONSE", "HTTPChannel", "HeadersSource"]

logger = logging.getLogger("cmd_ipc.http")

#: Default largest answer the client reads, in bytes (the registry's default message limit).
DEFAULT_MAX_RESPONSE = 64 * 1024 * 1024

#: Extra headers for each request: a mapping, or a callable (sync or async) returning one,
#: called for every request (to refresh an access token, for instance).
HeadersSource = Mapping[str, str] | Callable[[], Mapping[str, str] | Awaitable[Mapping[str, str]]]

#: Depth allowed when reading a frame the registry itself encoded.
_TRUSTED_DEPTH = 1 << 16


# ---------------------------------------------------------------------------------- client


class _Failure(Exception):
    """One POST failed; ``code`` is the spec error code its call fails with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class HTTPChannel(Channel):
    """A channel to a remote registry served over HTTP (:func:`cmd_ipc.server.http.serve`, or
    the TypeScript HTTPChannel in server mode).

    Registering it lists the server's commands and makes them routable through this channel:
    ``await registry.register_channel(HTTPChannel(...))`` returns once they are callable, and
    raises :class:`~cmd_ipc.ChannelDisconnectedError` (with the cause) if the server cannot be
    reached or refuses the request. Each call is then one ``POST {base_url}/cmd``, sent
    concurrently with the others over one keep-alive connection pool.

    HTTP only carries calls from this side to the server: command lists and executes. Events
    and registrations are not sent (a registry cannot use an HTTPChannel as its
    ``router_channel``), and the server never calls this side. The registry says so once,
    at INFO: when the channel is attached to a registry with event listeners, or at the
    first event emitted while it is attached (a WebSocketChannel carries events).

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
    #: Events do not cross HTTP (the registry tells of it once, see above).
    carries_events = False

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
        try:
            head = _head(frame)
        except ValueError:
            logger.debug("HTTPChannel %r dropped an undecodable frame", self.id)
            return
        self.send_with_head(frame, *head)

    def send_with_head(
        self, frame: bytes, kind: str, message_id: str, reference: str | None
    ) -> None:
        """:meth:`send` of a frame whose head the registry gives (it is not parsed here)."""
        if self._closed or self._on_frame is None:
            return
        raw = frame
        msg: dict[str, Any] = {"id": message_id, "type": kind}
        prefix = self.command_prefix
        if prefix and kind == _EXECUTE_REQUEST and (reference or "").startswith(prefix + "."):
            # `prefix.cmd` here is `cmd` on the wire.
            try:
                raw = _core.with_command_id(
                    frame,
                    "json",
                    (reference or "")[len(prefix) + 1 :],
                    max_message_size=len(frame),
                    max_depth=_TRUSTED_DEPTH,
                )
            except ValueError:  # never for the registry's own frames; send never raises
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
                reference,
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
