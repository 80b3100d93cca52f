"""The cmd-ipc HTTP endpoint without an HTTP framework: what every server does per request.

:mod:`cmd_ipc.server.http` (aiohttp) and :mod:`cmd_ipc.server.asgi` (ASGI) read requests
and write answers; everything in between is here, once: the options and their checks, the
bearer token, the body limits, decoding the message once, ``expose=`` (decided on the type
the decoder read, never on the raw bytes), routing through the registry on the endpoint's
channel, and every answer (status, headers, body), so that both servers answer alike, byte
for byte.

An answer is a :class:`Reply`; a request refused before its body is read raises
:class:`Refused`, whose reply asks the server to drop the connection (the body is never
read). The servers turn replies into their own responses and nothing more.

Two checks here serve the WebSocket and gRPC servers too: :func:`check_token_ascii` (every
server's token) and :func:`reserved_channel_id` (the ids a client may not take).

Logging goes to the ``cmd_ipc.http`` logger.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cmd_ipc import _core
from cmd_ipc._expose import Expose, Exposure
from cmd_ipc._http_wire import (
    _ANSWER_TYPE,
    _EXECUTE_REQUEST,
    _EXECUTE_RESPONSE,
    _LIST_REQUEST,
    _LIST_RESPONSE,
    _NDJSON,
    _dumps,
    _error_response,
    _head,
)
from cmd_ipc.channels.base import Channel, OnClose, OnFrame
from cmd_ipc.errors import ProtocolError

if TYPE_CHECKING:
    from cmd_ipc.registry import CommandRegistry

__all__ = [
    "DEFAULT_MAX_BODY",
    "ClientGone",
    "Endpoint",
    "EndpointChannel",
    "Options",
    "Refused",
    "Reply",
    "check_token_ascii",
    "reserved_channel_id",
]

logger = logging.getLogger("cmd_ipc.http")

#: Default largest request body the server reads, in bytes (1 MiB).
DEFAULT_MAX_BODY = 1024 * 1024
#: Seconds between two checks that the client of a waiting request is still connected,
#: for a server that cannot tell at once.
_DISCONNECT_POLL = 0.5
#: What ``aiohttp.web.json_response`` sends, so every server sends the same.
_JSON = "application/json; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Reply:
    """An answer to one HTTP request, for the server to send as it is.

    Attributes:
        status: The HTTP status.
        body: The body.
        content_type: The ``Content-Type`` header.
        headers: Further headers.
        close: Drop the connection once the answer is out, without reading the rest of the
            request body.
    """

    status: int
    body: bytes
    content_type: str = _JSON
    headers: Mapping[str, str] = field(default_factory=dict)
    close: bool = False


def json_reply(
    value: Any, status: int, headers: Mapping[str, str] | None = None, *, close: bool = False
) -> Reply:
    """A JSON answer, encoded as ``aiohttp.web.json_response`` encodes it."""
    return Reply(status, json.dumps(value).encode(), _JSON, dict(headers or {}), close)


def text_reply(status: int, text: str, headers: Mapping[str, str] | None = None) -> Reply:
    """A plain-text answer (what aiohttp sends for an unknown path or method)."""
    return Reply(status, text.encode(), _TEXT, dict(headers or {}))


class Refused(Exception):
    """The request is answered with ``status``; before its body was read, the connection is
    dropped unread.

    Attributes:
        status: The HTTP status.
        error: What the answer's ``{"error": ...}`` says.
        headers: Further headers of the answer.
    """

    def __init__(self, status: int, error: str, headers: Mapping[str, str] | None = None):
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = dict(headers or {})

    def reply(self, *, close: bool = True) -> Reply:
        """The answer to send."""
        return json_reply({"error": self.error}, self.status, self.headers, close=close)


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class _Unavailable(Exception):
    """The registry closed the endpoint's channel while a request waited."""


def check_token_ascii(token: str | None) -> None:
    """Refuses a bearer token that is not ASCII, for every server (HTTP, ASGI, WebSocket,
    gRPC): HTTP headers carry no agreed encoding beyond ASCII (ASGI servers hand them over
    as latin-1, aiohttp as UTF-8, so such a token could never match on one of them), and
    gRPC metadata carries ASCII only.

    Raises:
        ValueError: ``token`` has a character outside ASCII.
    """
    if token is not None and not token.isascii():
        raise ValueError(
            "token must be ASCII: HTTP headers and gRPC metadata cannot carry other characters"
        )


def reserved_channel_id(registry: CommandRegistry, channel_id: str) -> str | None:
    """Why a client of a server that names its own channel (WebSocket, gRPC) may not name
    it ``channel_id`` (``None``: it may).

    The ids of the registry's router channel, of its workers and of its pools' members are
    its own, attached or not: a client that took the router's id while that channel is
    detached would become the router (every escalated call and every command would go to
    it, whatever ``expose`` says), and one that took a worker's would stand in for it while
    the worker restarts.
    """
    if channel_id == registry.router_channel:
        return f"channel id {channel_id!r} is reserved for the registry's router channel"
    if channel_id in registry.workers or any(
        member.id == channel_id for pool in registry.pools.values() for member in pool.workers
    ):
        return f"channel id {channel_id!r} is reserved for a worker of the registry"
    return None


@dataclass(frozen=True)
class Options:
    """The checked options of one endpoint (see :func:`cmd_ipc.server.http.add_routes`).

    Attributes:
        token: The bearer token as bytes, or ``None`` for no auth.
        max_body: Largest request body, in bytes.
        read_timeout: Seconds a client has to send the whole body.
        answer_timeout: Seconds to wait for the registry's answer (``None``: its
            ``request_ttl``).
        path: Path of the message endpoint.
        schema_path: Path of the schema document, or ``None``.
        schema_auth: Whether the schema document needs the token.
        exposure: The compiled ``expose=``.
    """

    token: bytes | None
    max_body: int
    read_timeout: float
    answer_timeout: float | None
    path: str
    schema_path: str | None
    schema_auth: bool
    exposure: Exposure

    @classmethod
    def make(
        cls,
        registry_id: str,
        *,
        token: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        read_timeout: float = 10.0,
        answer_timeout: float | None = None,
        path: str = "/cmd",
        schema_path: str | None = "/cmds.json",
        schema_auth: bool | None = None,
        expose: Expose = None,
    ) -> Options:
        """Checks the options a server was given.

        Args:
            registry_id: The id of the serving registry (named in ``not_found`` answers).
            token: The bearer token clients must send (ASCII); ``None`` disables auth.
            max_body: Largest request body, in bytes.
            read_timeout: Seconds a client has to send the whole body.
            answer_timeout: Seconds to wait for the registry's answer.
            path: Path of the message endpoint.
            schema_path: Path of the schema document, or ``None`` for none.
            schema_auth: Whether the schema document needs the token (``None``: when a
                ``token`` is set).
            expose: The commands clients may list and call.

        Raises:
            ValueError: An invalid option (``schema_auth=True`` without a ``token``, a
                ``token`` that is not ASCII...).
            TypeError: ``expose`` is not a pattern, patterns or a predicate.
        """
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("token must be a non-empty string (or None for no auth)")
        check_token_ascii(token)
        if max_body <= 0:
            raise ValueError("max_body must be positive")
        if not read_timeout > 0:
            raise ValueError("read_timeout must be a positive number of seconds")
        if answer_timeout is not None and not answer_timeout > 0:
            raise ValueError("answer_timeout must be a positive number of seconds")
        if not path.startswith("/") or (
            schema_path is not None and not schema_path.startswith("/")
        ):
            raise ValueError("paths must start with '/'")
        if schema_auth and token is None:
            raise ValueError("schema_auth=True needs a token")
        return cls(
            token=None if token is None else token.encode(),
            max_body=max_body,
            read_timeout=float(read_timeout),
            answer_timeout=answer_timeout,
            path=path,
            schema_path=schema_path,
            schema_auth=token is not None if schema_auth is None else schema_auth,
            exposure=Exposure(expose, registry_id),
        )


class Endpoint:
    """One endpoint of a registry: the channel its messages go through and the answers.

    Args:
        registry: The registry that answers.
        options: The checked options.
    """

    def __init__(self, registry: CommandRegistry, options: Options) -> None:
        self.registry = registry
        self.options = options
        self.channel: EndpointChannel | None = None
        self._attaching: asyncio.Lock | None = None

    async def attached(self) -> EndpointChannel:
        """The endpoint's channel in the registry, attached on first use (and again after
        the registry closed it).

        Raises:
            _Unavailable: The registry would not attach it (it closed).
        """
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
                channel = EndpointChannel(name)
                try:
                    await self.registry.register_channel(channel)
                except Exception as e:
                    # The registry closed since the caller looked (or refuses channels):
                    # the request is answered 503, as for a closed registry.
                    logger.info("HTTP endpoint %r could not attach: %s", name, e)
                    raise _Unavailable from e
                self.channel = channel
            return channel

    async def aclose(self, _app: object = None) -> None:
        """Detaches the endpoint's channel (when its server stops). Idempotent."""
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close()

    # ------------------------------------------------------------------ before the body

    def check_auth(self, authorization: str | None) -> None:
        """Checks the ``Authorization`` header, in constant time.

        Raises:
            Refused: 401, with the ``WWW-Authenticate`` header to send.
        """
        token = self.options.token
        if token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Refused(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), token):
            raise Refused(
                401, "invalid bearer token", {"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )

    def check_length(self, length: int | None) -> None:
        """Checks a declared ``Content-Length``.

        Raises:
            Refused: 413.
        """
        if length is not None and length > self.options.max_body:
            raise Refused(
                413, f"request body of {length} bytes exceeds {self.options.max_body} bytes"
            )

    def check_schema_auth(self, authorization: str | None) -> None:
        """Checks the token of a ``GET`` of the schema document, when it needs one.

        Raises:
            Refused: 401.
        """
        if self.options.schema_auth:
            self.check_auth(authorization)

    def refusal(self, method: str, path: str, remote: str | None, refused: Refused) -> Reply:
        """Logs a refused request and gives its answer (which drops the connection)."""
        logger.info(
            "HTTP %s %s from %s refused: %d %s",
            method,
            path,
            remote,
            refused.status,
            refused.error,
        )
        return refused.reply()

    async def read_body(self, read: Callable[[], Awaitable[bytes]], *, timed: bool = True) -> bytes:
        """Reads a request body with ``read()`` (the next bytes, ``b""`` at its end), within
        ``max_body`` bytes and, when ``timed``, ``read_timeout`` seconds.

        Raises:
            Refused: 413 as soon as the body exceeds ``max_body``; 408 when it took longer
                than ``read_timeout``.
        """
        if not timed:
            return await self._read(read)
        try:
            return await asyncio.wait_for(self._read(read), self.options.read_timeout)
        except asyncio.TimeoutError:
            raise Refused(
                408, f"request body not received within {self.options.read_timeout}s"
            ) from None

    async def _read(self, read: Callable[[], Awaitable[bytes]]) -> bytes:
        buf = bytearray()
        limit = self.options.max_body
        while True:
            chunk = await read()
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > limit:
                raise Refused(413, f"request body exceeds {limit} bytes")

    # ------------------------------------------------------------------ POST {path}

    async def post(
        self,
        body: bytes,
        *,
        remote: str | None = None,
        gone: Callable[[], bool] | None = None,
        wakeup: asyncio.Future[Any] | None = None,
    ) -> Reply:
        """The answer to a ``POST`` of ``body``, a whole request body.

        Args:
            body: The body.
            remote: The client's address, for the log.
            gone: Whether the client went away (checked while the answer is awaited).
            wakeup: A future done when the client goes away, for a server that learns it at
                once (without it, ``gone`` is polled).

        Raises:
            ClientGone: ``gone()`` became true first.
        """
        limits = self.registry.limits
        try:
            # The registry's own limits, so that what it would take is not refused here.
            kind, message_id, _ = _core.inspect_message(
                body,
                "json",
                max_message_size=min(self.options.max_body, limits["max_message_size"]),
                max_depth=limits["max_depth"],
            )
        except (ProtocolError, ValueError) as e:
            issue = e.args[1] if isinstance(e, ProtocolError) and len(e.args) > 1 else str(e)
            logger.debug("HTTP POST from %s: invalid message: %s", remote, issue)
            return json_reply({"error": "Invalid message format", "issues": [str(issue)]}, 400)
        if kind not in _ANSWER_TYPE:
            logger.info("HTTP POST from %s refused: a %s may not cross HTTP", remote, kind)
            return json_reply({"error": f"Message type {kind} is not allowed"}, 403)
        exposure = self.options.exposure
        # `kind` is what the decoder read, escapes and all: the check keys on it, never on
        # the raw bytes.
        hidden = exposure.hidden_call(body, kind)
        if hidden is not None:
            # Answered as the registry answers a command it does not know.
            logger.debug("HTTP POST from %s: %r is not exposed", remote, hidden)
            return Reply(200, exposure.not_found(message_id, hidden) + b"\n", _NDJSON)
        if self.registry.closed:
            return self._unavailable()
        try:
            answer = await self.route(body, message_id, gone=gone, wakeup=wakeup)
        except Refused as refused:
            return refused.reply(close=False)
        except _Unavailable:
            return self._unavailable()
        except asyncio.TimeoutError:
            limit = self._answer_timeout()
            if kind != _EXECUTE_REQUEST:
                return json_reply({"error": f"no answer within {limit}s"}, 504)
            answer = _dumps(_error_response(message_id, "timeout", f"no answer within {limit}s"))
        if exposure.restricted:
            if kind == _LIST_REQUEST:
                answer = exposure.list_answer(answer)
            else:
                answer = exposure.answer(answer)
        return Reply(200, answer + b"\n", _NDJSON)

    # ------------------------------------------------------------------ GET {schema_path}

    async def schema(self) -> Reply:
        """The schema document: ``{"cmdschema": "1.0.0", "commands": [...]}``, the exposed
        commands (call :meth:`check_schema_auth` first)."""
        if self.registry.closed:
            return self._unavailable()
        list_id = _core.new_id()
        try:
            answer = await self.route(_dumps({"id": list_id, "type": _LIST_REQUEST}), list_id)
        except _Unavailable:
            return self._unavailable()
        except asyncio.TimeoutError:
            return json_reply({"error": f"no answer within {self._answer_timeout()}s"}, 504)
        commands = self.options.exposure.commands(json.loads(answer)["commands"])
        return json_reply({"cmdschema": "1.0.0", "commands": commands}, 200)

    # ------------------------------------------------------------------ routing

    def _unavailable(self) -> Reply:
        return json_reply({"error": f"registry {self.registry.id!r} is closed"}, 503)

    def _answer_timeout(self) -> float:
        t = self.options.answer_timeout
        return self.registry.request_ttl if t is None else t

    async def route(
        self,
        body: bytes,
        message_id: str,
        *,
        gone: Callable[[], bool] | None = None,
        wakeup: asyncio.Future[Any] | None = None,
    ) -> bytes:
        """Routes one message through the registry and returns the router's answer.

        Raises:
            asyncio.TimeoutError: No answer within the answer timeout.
            ClientGone: ``gone()`` became true first.
            Refused: 409, a message with the same id is in flight (or was, and the router
                has not answered it yet).
        """
        channel = await self.attached()
        loop = asyncio.get_running_loop()
        if message_id in channel.pending or channel.reserved(message_id, loop.time()):
            raise Refused(409, f"a message with id {message_id!r} is already in flight")
        answer: asyncio.Future[bytes] = loop.create_future()
        channel.pending[message_id] = answer
        try:
            channel.deliver(body)
            return await self._wait(answer, gone, wakeup)
        except BaseException:
            if channel.pending.get(message_id) is answer and not channel.closed:
                # Given up on (the client went away, no answer in time) while the router
                # still runs it: its answer, when it comes, must not settle a new request
                # with the same id.
                channel.abandon(
                    message_id,
                    loop.time() + self.registry.request_ttl,
                    _per_channel(self.registry.limits),
                )
            raise
        finally:
            if channel.pending.get(message_id) is answer:
                del channel.pending[message_id]

    async def _wait(
        self,
        answer: asyncio.Future[bytes],
        gone: Callable[[], bool] | None,
        wakeup: asyncio.Future[Any] | None,
    ) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._answer_timeout()
        waiting: set[asyncio.Future[Any]] = {answer} if wakeup is None else {answer, wakeup}
        # Without a wakeup, look at the client now and then.
        poll = _DISCONNECT_POLL if wakeup is None and gone is not None else None
        while not answer.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError
            await asyncio.wait(
                waiting,
                timeout=remaining if poll is None else min(remaining, poll),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if answer.done():
                break
            if gone is not None and gone():
                raise ClientGone
        try:
            return answer.result()
        except ConnectionError:
            raise _Unavailable from None


def _per_channel(limits: Mapping[str, Any]) -> int:
    """The most requests of one channel the registry runs at once (``max_pending_per_channel``,
    by default half of ``max_pending``)."""
    per_channel = limits.get("max_pending_per_channel")
    if per_channel is None:
        per_channel = max(int(limits.get("max_pending", 100_000)) // 2, 1)
    return int(per_channel)


class EndpointChannel(Channel):
    """The channel through which an endpoint hands POSTed messages to its registry.

    One per endpoint, attached on the first request (or when its ASGI server starts). Each
    POSTed message is delivered as if a peer had sent it; the router's answer (whose
    ``thid`` is the message's id) settles the waiting request. Two messages with the same
    id cannot be in flight at once (the second is refused with 409), so answers never
    cross. An id given up on before its answer came (its client went away, or the answer
    timeout passed) stays taken until the router answers it (that answer is dropped) or
    the registry's ``request_ttl`` passed. Everything else the router sends here (the list
    request every new channel gets, events) does not cross HTTP and is dropped.
    """

    def __init__(self, id: str) -> None:
        super().__init__(id, "json")
        self.pending: dict[str, asyncio.Future[bytes]] = {}
        #: Ids given up on, still run by the router -> when they are free again (loop time),
        #: in that order (every entry gets the same TTL).
        self.abandoned: dict[str, float] = {}
        self._on_frame: OnFrame | None = None
        self._on_close: OnClose | None = None
        self.closed = False

    async def start(self, on_frame: OnFrame, on_close: OnClose) -> None:
        self._on_frame, self._on_close = on_frame, on_close

    def deliver(self, frame: bytes) -> None:
        """Hands ``frame`` to the registry, as if a peer had sent it."""
        if not self.closed and self._on_frame is not None:
            self._on_frame(frame)

    def send(self, frame: bytes) -> None:
        try:
            head = _head(frame)
        except ValueError:  # never raised for the registry's own frames; send never raises
            return
        self.send_with_head(frame, *head)

    def send_with_head(self, frame: bytes, kind: str, message_id: str, thid: str | None) -> None:
        if kind not in (_EXECUTE_RESPONSE, _LIST_RESPONSE) or thid is None:
            return  # the list request every new channel gets, events: they do not cross
        waiter = self.pending.pop(thid, None)
        if waiter is None:
            self.abandoned.pop(thid, None)  # the answer to a request given up on
        elif not waiter.done():
            waiter.set_result(frame)

    def reserved(self, message_id: str, now: float) -> bool:
        """Whether ``message_id`` was given up on and is not free yet (at ``now``)."""
        abandoned = self.abandoned
        while abandoned:  # the expired ones first (they are in order)
            oldest = next(iter(abandoned))
            if abandoned[oldest] > now:
                break
            del abandoned[oldest]
        return message_id in abandoned

    def abandon(self, message_id: str, until: float, limit: int) -> None:
        """Keeps ``message_id`` taken until its answer comes or ``until``; at most
        ``limit`` ids (the requests the router runs at once for this channel: beyond them
        it answers at once), the oldest forgotten first."""
        abandoned = self.abandoned
        abandoned.pop(message_id, None)
        while abandoned and len(abandoned) >= limit:
            del abandoned[next(iter(abandoned))]
        abandoned[message_id] = until

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            for waiter in self.pending.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("the registry closed the channel"))
            self.pending.clear()
            self.abandoned.clear()
            if self._on_close is not None:
                self._on_close(None)
