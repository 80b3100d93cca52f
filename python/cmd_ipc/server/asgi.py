"""The cmd-ipc HTTP endpoint as an ASGI application (uvicorn, hypercorn, Starlette, FastAPI).

:func:`app` answers what the aiohttp server (:mod:`cmd_ipc.server.http`) answers, the same
way: ``POST /cmd`` (one spec-v1 message; its answer as one NDJSON line), ``GET /cmds.json``,
the bearer token (``/cmds.json`` needs it too unless ``schema_auth=False``), ``expose=``,
the body size limit and read timeout, private ``_`` commands never exposed, and the same
status codes and bodies, because both servers share one endpoint
(:mod:`cmd_ipc.server._endpoint`). It is plain ASGI 3: nothing beyond cmd-ipc is needed to
run it.

Paths are relative to the ASGI ``root_path``, so the application can be mounted:
``starlette_app.mount("/cmd-ipc", app(registry))`` answers ``POST /cmd-ipc/cmd``, and an
:class:`~cmd_ipc.HTTPChannel` reaches it at ``base_url + "/cmd-ipc"``.

The endpoint's channel in the registry is attached at the ASGI ``lifespan`` startup when the
server sends one (uvicorn does), else on the first request, and detached at the lifespan
shutdown or by :meth:`ASGIApp.aclose` (a framework does not pass the lifespan on to the
applications mounted in it: call ``aclose`` from the host application's own lifespan if it
outlives the registry). The application must run on the registry's event loop.

Differences that come from ASGI itself: a refused request (401, 413, 408) is answered with
``connection: close``, and the server (not the application) closes the connection; the
server handles ``Expect: 100-continue`` (uvicorn sends its ``100 Continue`` when the
application first reads the body, so a request refused by its headers never gets one); and
when the server cancels a request still waiting for its answer (uvicorn does at shutdown,
after ``timeout_graceful_shutdown``), an execute is answered ``channel_disconnected``, as
the client of the aiohttp server sees its connection dropped.

Example::

    import cmd_ipc.asgi
    from starlette.applications import Starlette

    web = Starlette()
    web.mount("/cmd-ipc", cmd_ipc.asgi.app(registry, token=secret, expose="api.*"))
    # uvicorn.run(web) -- then HTTPChannel("api", "http://host:8000/cmd-ipc", token=secret)

Logging goes to the ``cmd_ipc.http`` logger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from cmd_ipc import _core
from cmd_ipc._expose import Expose
from cmd_ipc._http_wire import _EXECUTE_REQUEST, _NDJSON, _dumps, _error_response
from cmd_ipc.server._endpoint import (
    DEFAULT_MAX_BODY,
    ClientGone,
    Endpoint,
    Options,
    Refused,
    Reply,
    text_reply,
)

if TYPE_CHECKING:
    from cmd_ipc.registry import CommandRegistry

__all__ = ["DEFAULT_MAX_BODY", "ASGIApp", "Message", "Receive", "Scope", "Send", "app"]

logger = logging.getLogger("cmd_ipc.http")

#: An ASGI connection scope.
Scope = MutableMapping[str, Any]
#: An ASGI event.
Message = MutableMapping[str, Any]
#: The ASGI ``receive`` callable.
Receive = Callable[[], Awaitable[Message]]
#: The ASGI ``send`` callable.
Send = Callable[[Message], Awaitable[None]]


class ASGIApp:
    """An ASGI 3 application serving one registry's endpoint (made by :func:`app`).

    Attributes:
        registry: The registry that answers.
        path: Path of the message endpoint, below the ``root_path``.
        schema_path: Path of the schema document, or ``None``.
    """

    def __init__(self, registry: CommandRegistry, options: Options) -> None:
        self.registry = registry
        self.path = options.path
        self.schema_path = options.schema_path
        self._endpoint = Endpoint(registry, options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1000})  # refused: HTTP 403

    async def aclose(self) -> None:
        """Detaches the endpoint's channel from the registry (a later request attaches it
        again). Idempotent."""
        await self._endpoint.aclose()

    def __repr__(self) -> str:
        return f"<ASGIApp registry={self.registry.id!r} path={self.path!r}>"

    # ------------------------------------------------------------------ lifespan

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if not self.registry.closed:
                        await self._endpoint.attached()
                except Exception as e:
                    logger.exception("the cmd-ipc endpoint could not attach to its registry")
                    await send({"type": "lifespan.startup.failed", "message": repr(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._endpoint.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ------------------------------------------------------------------ http

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _route_path(scope)
        method = scope["method"]
        endpoint = self._endpoint
        if path == self.path:
            if method != "POST":
                await _send(send, _not_allowed("POST"))
            else:
                await self._post(scope, receive, send)
        elif self.schema_path is not None and path == self.schema_path:
            if method not in ("GET", "HEAD"):
                await _send(send, _not_allowed("GET,HEAD"))
                return
            try:
                endpoint.check_schema_auth(_header(scope, b"authorization"))
            except Refused as refused:
                await _send(send, endpoint.refusal(method, path, _remote(scope), refused))
                return
            await _send(send, await endpoint.schema())
        else:
            await _send(send, text_reply(404, "404: Not Found"))

    async def _post(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._endpoint
        remote = _remote(scope)
        try:
            endpoint.check_auth(_header(scope, b"authorization"))
            endpoint.check_length(_content_length(scope))
            body = await endpoint.read_body(_BodyReader(receive).read)
        except Refused as refused:
            await _send(send, endpoint.refusal("POST", scope["path"], remote, refused))
            return
        except ClientGone:
            return
        except ValueError:  # an unreadable Content-Length
            await _send(send, Refused(400, "invalid Content-Length").reply())
            return
        # The body is in: the next event is the client's disconnect (or the server's, once
        # the answer is out). Watch for it, so a client that goes away stops the wait.
        disconnected = asyncio.ensure_future(_disconnect(receive))
        try:
            reply = await endpoint.post(
                body, remote=remote, gone=disconnected.done, wakeup=disconnected
            )
        except ClientGone:
            logger.debug("HTTP client %s went away before its answer", remote)
            return
        except asyncio.CancelledError:
            # The server stopped the request (uvicorn at shutdown): answer as a dropped
            # connection would fail the call, then let the cancellation go on.
            await _send(send, _stopped(body))
            raise
        finally:
            if not disconnected.cancel() and not disconnected.cancelled():
                disconnected.exception()  # a receive() that failed: seen, nothing to do
        await _send(send, reply)


def app(
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
) -> ASGIApp:
    """An ASGI application serving ``registry``: the endpoint of
    :func:`cmd_ipc.server.http.add_routes`, with the same options and the same answers.

    ``POST {path}`` takes one spec-v1 message (``list.commands.request`` or
    ``execute.command.request``) and answers ``200`` with the response as one NDJSON line;
    ``400`` for a body that is not a valid message, ``403`` for one that may not cross HTTP,
    ``401`` without the right bearer token, ``413`` over ``max_body``, ``408`` when the body
    takes longer than ``read_timeout``, ``409`` for a second message with the id of one in
    flight, ``503`` once the registry is closed. ``GET {schema_path}`` answers the exposed
    commands (``{"cmdschema": "1.0.0", "commands": [...]}``). Paths are relative to the
    ASGI ``root_path`` (where the application is mounted).

    Args:
        registry: The registry that answers (the application runs on its event loop).
        token: The bearer token clients must send (ASCII); ``None`` disables auth.
        max_body: Largest request body, in bytes.
        read_timeout: Seconds a client has to send the whole body.
        answer_timeout: Seconds to wait for the registry's answer (default: its
            ``request_ttl``).
        path: Path of the message endpoint.
        schema_path: Path of the schema document, or ``None`` for none.
        schema_auth: Whether the schema document needs the token: ``None`` (the default)
            when a ``token`` is set; ``False`` serves it to anyone (an explicit opt-out);
            ``True`` needs a ``token``.
        expose: The commands clients may list and call: ``None`` (every public command),
            a glob pattern such as ``"api.*"``, a list of them, or a predicate
            ``fn(command_id) -> bool``.

    Returns:
        The application, an ASGI 3 callable.

    Raises:
        ValueError: An invalid option (``schema_auth=True`` without a ``token``, a
            ``token`` that is not ASCII...).
        TypeError: ``expose`` is not a pattern, patterns or a predicate.

    Example::

        fastapi_app.mount("/cmd-ipc", cmd_ipc.asgi.app(registry, expose=["api.*"]))
    """
    options = Options.make(
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
    return ASGIApp(registry, options)


# ---------------------------------------------------------------------------------- internals


class _BodyReader:
    """``read()`` gives the next bytes of a request body, ``b""`` at its end."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._more = True

    async def read(self) -> bytes:
        while self._more:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            if message["type"] != "http.request":
                continue
            self._more = bool(message.get("more_body", False))
            chunk = message.get("body", b"")
            if chunk:
                return bytes(chunk)
        return b""


async def _disconnect(receive: Receive) -> None:
    """Returns when the client disconnects."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _stopped(body: bytes) -> Reply:
    """The answer to a request the server stopped before its answer came."""
    try:
        kind, message_id, _ = _core.inspect_message(body, "json", max_message_size=len(body) + 1)
    except ValueError:
        kind = message_id = ""
    if kind != _EXECUTE_REQUEST:
        return Refused(503, "the server stopped before the answer").reply()
    answer = _error_response(
        message_id, "channel_disconnected", "the server stopped before the answer"
    )
    return Reply(200, _dumps(answer) + b"\n", _NDJSON, close=True)


def _not_allowed(allow: str) -> Reply:
    return text_reply(405, "405: Method Not Allowed", {"Allow": allow})


async def _send(send: Send, reply: Reply) -> None:
    headers = [
        (b"content-type", reply.content_type.encode("latin-1")),
        (b"content-length", str(len(reply.body)).encode()),
    ]
    headers += [
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()
    ]
    if reply.close:
        headers.append((b"connection", b"close"))
    with contextlib.suppress(OSError):  # the client is gone: nobody to answer
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})


def _route_path(scope: Scope) -> str:
    """The request's path below the ``root_path`` (a mounted application's prefix)."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :]
    return path


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _content_length(scope: Scope) -> int | None:
    """The declared ``Content-Length``, or ``None``.

    Raises:
        ValueError: It is not a number.
    """
    value = _header(scope, b"content-length")
    return None if value is None else int(value.strip())


def _remote(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None
