"""gRPC channels: a remote registry as a full member of a cmd-ipc tree, over one stream.

The wire is one bidirectional streaming RPC per peer, ``/cmdipc.v1.Mesh/Connect``, whose
messages in both directions are ``google.protobuf.StringValue``, each holding one spec-v1
message as JSON text::

    syntax = "proto3";
    package cmdipc.v1;
    import "google/protobuf/wrappers.proto";

    service Mesh {
      rpc Connect(stream google.protobuf.StringValue)
          returns (stream google.protobuf.StringValue);
    }

so a peer written with tonic, grpc-go or any gRPC stack speaks it with the well-known type.
Here the few bytes of that protobuf message (the tag byte ``0x0a`` of field 1, a varint
length, the UTF-8 text) are written and read by hand (:func:`encode_frame`,
:func:`decode_frame`): no generated code, no protobuf runtime. A registry behind a
:class:`GrpcChannel` is a real member of the tree, exactly as over WebSocket: its commands
register up the tree, it receives events, it calls anything, and the channel can be its
``router_channel``. On the server (:mod:`cmd_ipc.server.grpc`), every accepted stream
becomes a :class:`GrpcServerChannel` of the server's registry.

* **Metadata**: the client sends ``authorization: Bearer <token>`` and ``x-cmd-ipc-id``
  (the id the server registry gives its channel); the server answers with its response
  headers at once (``x-cmd-ipc-server``: its registry id) when it accepted the stream. A
  server written in another language must send its headers before its first message too
  (tonic does by itself; grpc-go: ``stream.SendHeader``).
* **Refusals** are gRPC status codes: ``UNAUTHENTICATED`` for a missing or bad token,
  ``INVALID_ARGUMENT`` for a bad id or a message that is not a ``StringValue`` of UTF-8
  text, ``ABORTED`` for a stream replaced by a newer one with the same id,
  ``ALREADY_EXISTS`` for an id a channel of another kind has, ``FAILED_PRECONDITION`` for
  an id the server registry keeps for itself (its router channel's, a worker's),
  ``RESOURCE_EXHAUSTED`` when the server serves its most streams, ``UNAVAILABLE`` when the
  server closes. A client refused with one of :data:`FINAL_CODES` does not reconnect.
* **Limits**: ``max_size`` bounds one incoming gRPC message (``grpc.max_receive_message_length``,
  framing included); a larger one ends the stream with ``RESOURCE_EXHAUSTED``. Bytes
  queued for a peer that does not read are bounded by ``send_limit``; beyond it the stream
  ends with ``RESOURCE_EXHAUSTED`` (the server's status; a client cancels its stream). A
  ``StringValue`` whose text is not a spec-v1 message goes on to the registry, which drops
  it (``stats()["dropped"]``), as it does a WebSocket text message that is not one.
* **Liveness**: HTTP/2 keepalive pings every ``keepalive_time`` seconds; a peer that does
  not answer within ``keepalive_timeout`` is dropped. A stream that breaks (the peer died,
  the connection reset) fails the calls waiting on it with ``channel_disconnected`` at
  once.
* **Reconnect**: a client whose stream is lost opens a new one with bounded exponential
  backoff (on a new HTTP/2 connection each time, so gRPC's own reconnection backoff never
  adds to it); its registry then attaches it again and re-registers its commands.

Logging goes to the ``cmd_ipc.grpc`` logger.

Example:
    On a remote machine, a registry joins the tree of a hub served with
    :func:`cmd_ipc.server.grpc.serve_grpc`::

        edge = CommandRegistry("edge", router_channel="hub")
        await edge.register_channel(
            GrpcChannel("hub", "hub.example:50051", token="s3cret", tls=True, client_id="edge")
        )
        await edge.register_command("edge.read", read)  # the hub can call it now
        total = await edge.execute_command("calc.add", {"a": 1, "b": 2})  # anywhere in the tree
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Sequence
from typing import Any

from cmd_ipc._expose import Exposure, PeerFilter
from cmd_ipc._optional import require
from cmd_ipc.channels.base import Channel, OnClose, OnFrame
from cmd_ipc.errors import ChannelDisconnectedError

require("grpc", "grpc", "GrpcChannel")

import grpc  # noqa: E402
from grpc import aio  # noqa: E402

__all__ = [
    "DEFAULT_MAX_SIZE",
    "DEFAULT_SEND_LIMIT",
    "FINAL_CODES",
    "ID_METADATA",
    "METHOD",
    "PATH",
    "SERVER_METADATA",
    "SERVICE",
    "FrameError",
    "GrpcChannel",
    "GrpcServerChannel",
    "decode_frame",
    "encode_frame",
]

logger = logging.getLogger("cmd_ipc.grpc")

#: The gRPC service of the wire, and its one method.
SERVICE = "cmdipc.v1.Mesh"
METHOD = "Connect"
#: The method's path, as it travels in the ``:path`` header.
PATH = f"/{SERVICE}/{METHOD}"
#: Request metadata with which a client names itself; the server registry's channel to the
#: client gets this id.
ID_METADATA = "x-cmd-ipc-id"
#: Response metadata with which a server says it accepted the stream: its registry's id.
SERVER_METADATA = "x-cmd-ipc-server"
#: Default maximum size of one incoming gRPC message, in bytes (16 MiB).
DEFAULT_MAX_SIZE = 16 * 1024 * 1024
#: Default maximum of bytes queued for a peer that does not read (64 MiB).
DEFAULT_SEND_LIMIT = 64 * 1024 * 1024
#: Status codes after which a client does not reconnect: the server refused it for good.
FINAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)

#: Seconds a client waits for a stream without our response headers to be refused before
#: taking it as accepted (a server in another language need not send them).
_FOREIGN_GRACE = 0.25
#: What a channel id sent in the metadata may look like: visible ASCII, bounded.
_ID = re.compile(r"[\x21-\x7e]{1,256}")

# --------------------------------------------------------------------------- the frame

#: Field 1, wire type 2 (length-delimited): the tag of ``StringValue.value``.
_TAG = 0x0A
#: The head of every frame whose text is shorter than 128 bytes.
_SHORT_HEADS = tuple(bytes((_TAG, n)) for n in range(128))
#: A length varint longer than this (35 bits) is refused: no message is that large.
_MAX_VARINT = 5


class FrameError(ValueError):
    """A gRPC message that is not a ``google.protobuf.StringValue`` of UTF-8 text."""


def encode_frame(text: bytes) -> bytes:
    """One spec-v1 message (JSON text, UTF-8) as a ``google.protobuf.StringValue``.

    Example:
        >>> encode_frame(b'{"a":1}')
        b'\\n\\x07{"a":1}'
        >>> encode_frame(b"x" * 300)[:3]
        b'\\n\\xac\\x02'
    """
    n = len(text)
    if n < 128:
        # proto3 leaves out a field holding its default: "" is the empty message.
        return _SHORT_HEADS[n] + text if n else b""
    head = bytearray((_TAG,))
    while n >= 0x80:
        head.append((n & 0x7F) | 0x80)
        n >>= 7
    head.append(n)
    head += text
    return bytes(head)


def decode_frame(data: bytes) -> bytes:
    """The UTF-8 text of a ``google.protobuf.StringValue`` (the empty message is ``""``).

    Only the shape any protobuf encoder gives a ``StringValue`` is read: field 1 once, with
    nothing after it.

    Raises:
        FrameError: ``data`` is not that.

    Example:
        >>> decode_frame(b'\\n\\x07{"a":1}')
        b'{"a":1}'
        >>> decode_frame(b"\\x12\\x00")
        Traceback (most recent call last):
        ...
        cmd_ipc.channels.grpc.FrameError: not a google.protobuf.StringValue: tag 0x12, expected 0x0a
    """
    n = len(data)
    if n == 0:
        return b""
    if data[0] != _TAG:
        raise FrameError(f"not a google.protobuf.StringValue: tag {data[0]:#04x}, expected 0x0a")
    length = shift = 0
    i = 1
    while True:
        if i >= n:
            raise FrameError("truncated google.protobuf.StringValue: the length is cut short")
        byte = data[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if i > _MAX_VARINT:
            raise FrameError("invalid google.protobuf.StringValue: the length varint is too long")
    if length != n - i:
        raise FrameError(
            f"invalid google.protobuf.StringValue: it declares {length} bytes of text, "
            f"{n - i} follow"
        )
    text = data[i:]
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FrameError(f"the text of the google.protobuf.StringValue is not UTF-8: {e}") from None
    return text


# --------------------------------------------------------------------------- helpers


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{what} must be 1 to 256 visible ASCII characters, got {value!r}")
    return value


def _check_positive(value: float | None, what: str) -> float | None:
    if value is not None and not value > 0:
        raise ValueError(f"{what} must be a positive number of seconds or None, got {value!r}")
    return value


def _check_size(value: int | None, what: str) -> int | None:
    if value is not None and (not isinstance(value, int) or value <= 0):
        raise ValueError(f"{what} must be a positive number of bytes or None, got {value!r}")
    return value


def _describe_error(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _describe_status(code: grpc.StatusCode | None, details: str | None) -> str:
    name = "no status" if code is None else code.name
    return f"{name}: {details}" if details else name


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


# --------------------------------------------------------------------------- one stream


class _Stream:
    """One gRPC stream carried by a channel: its send queue and its reader and writer
    tasks. Subclasses say how to read, write and end it (the client's call, or the
    server's context)."""

    __slots__ = ("ended", "opened_at", "queue", "queued", "reader", "reported", "writer")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.queued = 0
        self.reader: asyncio.Task[None] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.reported = False
        self.ended = asyncio.Event()
        self.opened_at = asyncio.get_running_loop().time()

    async def read(self) -> object:
        """The next message (``bytes``), or :data:`grpc.aio.EOF` when the peer ended."""
        raise NotImplementedError

    async def write(self, data: bytes) -> None:
        raise NotImplementedError

    def end(self, code: grpc.StatusCode, details: str) -> None:
        """Ends the stream now, with what was queued left unsent."""
        raise NotImplementedError

    async def finish(self, code: grpc.StatusCode, details: str, timeout: float | None) -> None:
        """Ends the stream in order, once everything queued was written."""
        raise NotImplementedError

    async def eof_reason(self) -> str:
        """Why the stream ended, once the peer ended it (:data:`grpc.aio.EOF`)."""
        raise NotImplementedError

    async def release(self) -> None:
        """Frees what the stream held, once it ended."""


class _ClientStream(_Stream):
    __slots__ = ("call", "channel")

    def __init__(self, channel: aio.Channel, call: aio.StreamStreamCall[bytes, bytes]) -> None:
        super().__init__()
        self.channel = channel
        self.call = call

    async def read(self) -> object:
        return await self.call.read()

    async def write(self, data: bytes) -> None:
        await self.call.write(data)

    def end(self, code: grpc.StatusCode, details: str) -> None:
        # A client has no status to send: it cancels (the server sees CANCELLED).
        self.call.cancel()

    async def finish(self, code: grpc.StatusCode, details: str, timeout: float | None) -> None:
        try:
            await self.call.done_writing()
        except Exception:
            self.call.cancel()
            return
        # The server answers our end of writing by ending the stream (its status): the
        # reader sees it and reports the end.
        try:
            await asyncio.wait_for(self.ended.wait(), timeout)
        except asyncio.TimeoutError:
            self.call.cancel()

    async def eof_reason(self) -> str:
        call = self.call
        status = _describe_status(await call.code(), await call.details())
        return f"the server ended the stream: {status}"

    async def release(self) -> None:
        await self.channel.close()


class _ServerStream(_Stream):
    __slots__ = ("context",)

    def __init__(self, context: aio.ServicerContext[bytes, bytes]) -> None:
        super().__init__()
        self.context = context

    async def read(self) -> object:
        return await self.context.read()

    async def write(self, data: bytes) -> None:
        await self.context.write(data)

    def end(self, code: grpc.StatusCode, details: str) -> None:
        # The status is sent when the RPC's handler returns, which it does once the end
        # is reported (GrpcServerChannel.wait_closed).
        if not self.context.done():
            self.context.set_code(code)
            self.context.set_details(details)

    async def finish(self, code: grpc.StatusCode, details: str, timeout: float | None) -> None:
        self.end(code, details)

    async def eof_reason(self) -> str:
        return "the client ended its stream"


# --------------------------------------------------------------------------- both ends


class _GrpcBase(Channel):
    """What both ends share: frames as ``StringValue`` messages, ordering, close and loss
    reporting."""

    def __init__(self, id: str, *, close_timeout: float | None, send_limit: int) -> None:
        super().__init__(id, "json")
        if not isinstance(send_limit, int) or send_limit <= 0:
            raise ValueError(f"send_limit must be a positive number of bytes, got {send_limit!r}")
        self.close_timeout = _check_positive(close_timeout, "close_timeout")
        self.send_limit = send_limit
        self._stream: _Stream | None = None
        self._on_frame: OnFrame | None = None
        self._on_close: OnClose | None = None
        self._closed = False
        self._closing: asyncio.Future[None] | None = None

    @property
    def connected(self) -> bool:
        """True while a stream is open."""
        stream = self._stream
        return stream is not None and not stream.reported

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    # ------------------------------------------------------------------ one stream

    def _attach(self, stream: _Stream, on_frame: OnFrame, on_close: OnClose) -> None:
        self._on_frame, self._on_close = on_frame, on_close
        self._stream = stream
        stream.reader = asyncio.ensure_future(self._read(stream))
        stream.writer = asyncio.ensure_future(self._write(stream))

    def send(self, frame: bytes) -> None:
        stream = self._stream
        if self._closed or stream is None or stream.reported:
            return
        data = encode_frame(frame)
        stream.queued += len(data)
        if stream.queued > self.send_limit:
            self._abort(
                stream,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {self.send_limit} bytes are queued for sending: the peer does not "
                "read (send_limit)",
            )
            return
        stream.queue.put_nowait(data)

    async def _write(self, stream: _Stream) -> None:
        queue = stream.queue
        try:
            while True:
                data = await queue.get()
                if data is None:
                    return
                # gRPC takes one message per write, each awaited: the writes of a stream
                # never overlap, and a peer that does not read holds them back.
                await stream.write(data)
                stream.queued -= len(data)
        except asyncio.CancelledError:
            raise
        except aio.AioRpcError:
            pass  # the stream ended: the reader reports it, with its status
        except Exception as e:
            if not stream.reported:
                logger.debug("channel %r: sending failed", self.id, exc_info=True)
                self._abort(
                    stream, grpc.StatusCode.INTERNAL, f"sending failed: {_describe_error(e)}"
                )

    async def _read(self, stream: _Stream) -> None:
        reason: str | None = None
        try:
            while True:
                message = await stream.read()
                if message is aio.EOF:
                    reason = await stream.eof_reason()
                    return
                if self._closed or stream.reported:
                    continue  # closing: drain until the peer ends the stream
                if not isinstance(message, bytes):
                    raise TypeError(f"a {type(message).__name__} read from the stream")
                try:
                    frame = decode_frame(message)
                except FrameError as e:
                    reason = f"the peer sent an invalid message: {e}"
                    self._abort(stream, grpc.StatusCode.INVALID_ARGUMENT, reason)
                    return
                self._deliver(frame)
        except aio.AioRpcError as e:
            reason = f"the stream failed: {_describe_status(e.code(), e.details())}"
            self._status(e.code())
        except asyncio.CancelledError:
            reason = "the stream was cancelled"
            raise
        except Exception as e:
            logger.exception("channel %r: reading failed", self.id)
            reason = f"reading failed: {_describe_error(e)}"
            stream.end(grpc.StatusCode.INTERNAL, reason)
        finally:
            self._lost(stream, reason)

    def _status(self, code: grpc.StatusCode) -> None:
        """Hook: the status with which the peer ended the stream."""

    def _deliver(self, frame: bytes) -> None:
        on_frame = self._on_frame
        if on_frame is None:
            return
        try:
            on_frame(frame)
        except Exception:
            logger.exception("channel %r: the registry failed on a frame", self.id)

    def _abort(self, stream: _Stream, code: grpc.StatusCode, reason: str) -> None:
        """Ends a stream that cannot go on, with ``code``, and reports it."""
        stream.end(code, reason)
        self._lost(stream, f"{reason} ({code.name})")

    def _lost(self, stream: _Stream, reason: str | None) -> None:
        """Reports the end of ``stream`` once: the registry fails calls waiting on it."""
        if stream.reported:
            return
        stream.reported = True
        stream.ended.set()
        current = asyncio.current_task()
        for task in (stream.writer, stream.reader):
            if task is not None and task is not current:
                task.cancel()
        if self._stream is stream:
            self._stream = None
        if self._closed:
            reason = None
        self._stream_ended(stream, reason)
        on_close = self._on_close
        if on_close is not None:
            on_close(reason)

    def _stream_ended(self, stream: _Stream, reason: str | None) -> None:
        """Hook: a subclass logs the loss and prepares for what comes next."""

    # ------------------------------------------------------------------ close

    async def _close(self, code: grpc.StatusCode, details: str) -> None:
        await asyncio.shield(self._close_soon(code, details))

    def _close_soon(
        self, code: grpc.StatusCode, details: str, *, detach: bool = False
    ) -> asyncio.Future[None]:
        """Starts closing (once); with ``detach``, ends the stream and reports the close at
        once instead of after flushing what was queued."""
        if self._closing is None:
            self._closed = True
            stream = self._stream
            if detach and stream is not None:
                stream.end(code, details)
                self._lost(stream, None)
            self._closing = asyncio.ensure_future(self._shutdown(stream, code, details))
        return self._closing

    async def _shutdown(self, stream: _Stream | None, code: grpc.StatusCode, details: str) -> None:
        if stream is None:
            return
        writer, reader = stream.writer, stream.reader
        if writer is not None and not stream.reported:
            stream.queue.put_nowait(None)  # the writer stops once what was queued is written
            try:
                await asyncio.wait_for(asyncio.shield(writer), self.close_timeout)
            except asyncio.TimeoutError:
                writer.cancel()
        if not stream.reported:
            await stream.finish(code, details, self.close_timeout)
        self._lost(stream, None)
        tasks = [t for t in (writer, reader) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        await stream.release()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self.connected else "disconnected"
        return f"<{type(self).__name__} id={self.id!r} {state}>"


# --------------------------------------------------------------------------- the client


def _credentials(
    tls: bool | grpc.ChannelCredentials | None,
    root_certificates: bytes | None,
    private_key: bytes | None,
    certificate_chain: bytes | None,
) -> grpc.ChannelCredentials | None:
    if isinstance(tls, grpc.ChannelCredentials):
        if root_certificates or private_key or certificate_chain:
            raise ValueError("pass certificates or ChannelCredentials as tls=, not both")
        return tls
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("a client certificate needs both private_key and certificate_chain")
    wanted = root_certificates is not None or private_key is not None
    if tls is False and wanted:
        raise ValueError("certificates were given with tls=False")
    if not tls and not wanted:
        return None
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


class GrpcChannel(_GrpcBase):
    """The client end: connects a registry to a registry served over gRPC.

    Register it in the client's registry; typically it is that registry's
    ``router_channel``, which makes the client a member of the server's tree.
    :meth:`CommandRegistry.register_channel` opens the stream and returns once the server
    listed its commands. When the stream breaks, calls waiting on it fail with
    ``channel_disconnected`` at once; the channel opens a new stream with bounded
    exponential backoff and its registry attaches it again, registering the client's
    commands again.

    Args:
        id: The name under which the client's registry knows the server (the client
            registry's ``router_channel`` when the server is its parent).
        target: The server's address, ``host:port`` (any gRPC target: ``dns:///...``,
            ``unix:/path``...).
        token: Bearer token sent as ``authorization: Bearer <token>`` metadata.
        client_id: The id the server registry gives its channel to this client (sent as
            ``x-cmd-ipc-id``); default a random ``grpc-…`` id, kept across reconnects.
        metadata: Extra request metadata, sent when each stream opens.
        tls: ``True`` for TLS with the system's roots (or the ``root_certificates`` given),
            a prepared :class:`grpc.ChannelCredentials`, or ``None``/``False`` for plain
            HTTP/2. Giving certificates implies ``True``.
        root_certificates: PEM roots the server's certificate must chain to.
        private_key: PEM key of a client certificate (mutual TLS), with
            ``certificate_chain``.
        certificate_chain: PEM client certificate chain (mutual TLS), with ``private_key``.
        server_name: The name the server's certificate is checked against, when it differs
            from the target's host (``grpc.ssl_target_name_override``).
        max_size: Maximum size of one incoming gRPC message, in bytes (``None``: no limit);
            a larger one ends the stream with ``RESOURCE_EXHAUSTED``.
        keepalive_time: Seconds between HTTP/2 keepalive pings (``None`` disables them).
            The server must allow pings that often: :func:`cmd_ipc.server.grpc.serve_grpc`
            allows one every 10 s.
        keepalive_timeout: Seconds to wait for a ping's answer before dropping the
            connection.
        open_timeout: Seconds allowed for connecting and the server's accepting the stream.
        close_timeout: Seconds allowed for flushing and the server's end of the stream on
            :meth:`close`.
        reconnect: Reconnect after a lost stream (sets :attr:`reconnects`).
        max_retries: Failed connection attempts after which reconnecting gives up (``None``:
            never give up).
        backoff: ``(initial, maximum)`` delay in seconds before a reconnection attempt; the
            delay doubles after each attempt, up to the maximum, with random jitter.
        send_limit: Maximum bytes queued for a server that does not read; beyond it the
            stream is cancelled.
        options: Further gRPC channel arguments (``("grpc.default_authority", ...)``...),
            applied after ours.

    Raises:
        ValueError: An invalid id or option.

    Example:
        >>> ch = GrpcChannel("hub", "127.0.0.1:50051", client_id="edge")
        >>> (ch.id, ch.client_id, ch.encoding, ch.reconnects, ch.secure)
        ('hub', 'edge', 'json', True, False)
    """

    wait_for_commands = True

    def __init__(
        self,
        id: str,
        target: str,
        *,
        token: str | None = None,
        client_id: str | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        tls: bool | grpc.ChannelCredentials | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        server_name: str | None = None,
        max_size: int | None = DEFAULT_MAX_SIZE,
        keepalive_time: float | None = 30.0,
        keepalive_timeout: float = 20.0,
        open_timeout: float | None = 10.0,
        close_timeout: float | None = 5.0,
        reconnect: bool = True,
        max_retries: int | None = 20,
        backoff: tuple[float, float] = (0.1, 5.0),
        send_limit: int = DEFAULT_SEND_LIMIT,
        options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        super().__init__(id, close_timeout=close_timeout, send_limit=send_limit)
        if not isinstance(target, str) or not target:
            raise ValueError("target must be a non-empty gRPC target such as 'host:port'")
        if max_retries is not None and (not isinstance(max_retries, int) or max_retries < 0):
            raise ValueError(f"max_retries must be a non-negative int or None, got {max_retries}")
        initial, maximum = backoff
        if not 0 < initial <= maximum:
            raise ValueError("backoff must be (initial, maximum) with 0 < initial <= maximum")
        if token is not None and (not token or "\n" in token or "\r" in token):
            raise ValueError("token must be a non-empty string on one line, or None")
        self.target = target
        self.client_id = _check_id(
            client_id if client_id is not None else f"grpc-{random.getrandbits(48):012x}",
            "client_id",
        )
        self.reconnects = bool(reconnect)
        self.max_retries = max_retries
        self.backoff = (float(initial), float(maximum))
        self.max_size = _check_size(max_size, "max_size")
        self.keepalive_time = _check_positive(keepalive_time, "keepalive_time")
        keepalive_timeout = _check_positive(keepalive_timeout, "keepalive_timeout") or 20.0
        self.keepalive_timeout = keepalive_timeout
        self.open_timeout = _check_positive(open_timeout, "open_timeout")
        self._credentials = _credentials(tls, root_certificates, private_key, certificate_chain)
        md: list[tuple[str, str]] = [(k.lower(), v) for k, v in (metadata or ())]
        md.append((ID_METADATA, self.client_id))
        if token is not None:
            md.append(("authorization", f"Bearer {token}"))
        self._metadata = tuple(md)
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", -1 if max_size is None else max_size),
            # What we send is bounded by the peer's limit, which says so with its status.
            ("grpc.max_send_message_length", -1),
            # Every stream on a fresh connection, with no backoff state shared with other
            # channels to the same target: ours is the only reconnection backoff.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.enable_retries", 0),
        ]
        if self.keepalive_time is not None:
            opts += [
                ("grpc.keepalive_time_ms", _ms(self.keepalive_time)),
                ("grpc.keepalive_timeout_ms", _ms(keepalive_timeout)),
                ("grpc.keepalive_permit_without_calls", 1),
                # Keep pinging an idle stream (the default stops after two pings).
                ("grpc.http2.max_pings_without_data", 0),
            ]
        if server_name is not None:
            opts.append(("grpc.ssl_target_name_override", server_name))
        opts += list(options or ())
        self._options = opts
        #: A stream opened by :meth:`reconnect`, taken by the next :meth:`start`.
        self._pending: _ClientStream | None = None
        #: Set by :meth:`close` to cut a backoff sleep short.
        self._wakeup: asyncio.Event | None = None
        #: Consecutive short-lived streams: the next backoff delay grows with it.
        self._delay_step = 0
        #: The server refused this client for good (bad token, replaced): no reconnect.
        self._final = False
        #: Connections of lost streams being closed.
        self._releasing: set[asyncio.Future[None]] = set()

    @property
    def secure(self) -> bool:
        """True when the channel uses TLS."""
        return self._credentials is not None

    @property
    def call(self) -> aio.StreamStreamCall[bytes, bytes] | None:
        """The current stream's call (for its ``initial_metadata()``, ``peer()``...), or
        ``None`` between streams and after close."""
        stream = self._stream
        return stream.call if isinstance(stream, _ClientStream) else None

    async def start(self, on_frame: OnFrame, on_close: OnClose) -> None:
        """Opens a stream (or takes the one :meth:`reconnect` opened) and starts reading.

        Raises:
            ChannelDisconnectedError: The stream could not be opened (unreachable server,
                ``UNAUTHENTICATED``, timeout...); the cause is chained.
            RuntimeError: The channel is already running.
        """
        if self._closed:
            raise ChannelDisconnectedError(f"channel {self.id!r} was closed")
        if self._stream is not None:
            raise RuntimeError(f"channel {self.id!r} was already started")
        stream, self._pending = self._pending, None
        if stream is None:
            self._final = False
            stream = await self._connect()
            if self._closed:
                stream.call.cancel()
                await stream.release()
                raise ChannelDisconnectedError(f"channel {self.id!r} was closed")
        logger.info("channel %r connected to %s as %r", self.id, self.target, self.client_id)
        self._attach(stream, on_frame, on_close)

    async def _connect(self) -> _ClientStream:
        if self._credentials is None:
            channel = aio.insecure_channel(self.target, options=self._options)
        else:
            channel = aio.secure_channel(self.target, self._credentials, options=self._options)
        call: aio.StreamStreamCall[bytes, bytes] | None = None
        try:
            # No serializers: messages cross as the bytes encode_frame made.
            call = channel.stream_stream(PATH)(metadata=self._metadata)
            # The server sends its headers once it accepted the stream; a refusal ends the
            # call first (a trailers-only answer), and a server that cannot be reached
            # fails it at once (calls do not wait for the connection to be ready).
            headers = await asyncio.wait_for(call.initial_metadata(), self.open_timeout)
            if not call.done() and SERVER_METADATA not in (headers or {}):
                # No headers of ours: a refusal (whose status may come a moment after
                # the empty headers of its trailers-only answer), or a server in another
                # language that sent none; it has a moment to end the call.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(call.code()), _FOREIGN_GRACE)
            if call.done():
                code = await call.code()
                if code in FINAL_CODES:
                    self._final = True
                raise ChannelDisconnectedError(
                    f"channel {self.id!r}: {self.target} refused the stream: "
                    f"{_describe_status(code, await call.details())}"
                )
        except BaseException as e:
            if call is not None:
                call.cancel()
            await channel.close()
            if isinstance(e, ChannelDisconnectedError):
                raise
            if isinstance(e, asyncio.TimeoutError):
                raise ChannelDisconnectedError(
                    f"channel {self.id!r} could not connect to {self.target}: no answer "
                    f"within {self.open_timeout}s (open_timeout)"
                ) from e
            if isinstance(e, Exception):
                raise ChannelDisconnectedError(
                    f"channel {self.id!r} could not connect to {self.target}: {_describe_error(e)}"
                ) from e
            raise
        return _ClientStream(channel, call)

    def _status(self, code: grpc.StatusCode) -> None:
        if code in FINAL_CODES:
            self._final = True

    def _stream_ended(self, stream: _Stream, reason: str | None) -> None:
        if reason is None:
            logger.info("channel %r to %s closed", self.id, self.target)
            return
        # A stream that did not last resets nothing: a flapping server gets slower retries
        # rather than a tight loop.
        if asyncio.get_running_loop().time() - stream.opened_at >= self.backoff[1]:
            self._delay_step = 0
        logger.warning("channel %r to %s lost: %s", self.id, self.target, reason)
        # The connection goes with its stream (the next one gets a new connection).
        task = asyncio.ensure_future(stream.release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    def _next_delay(self) -> float:
        initial, maximum = self.backoff
        delay = min(maximum, initial * 2.0 ** min(self._delay_step, 32))
        self._delay_step += 1
        return delay * (0.5 + random.random() / 2)

    async def reconnect(self) -> bool:
        """Opens a new stream after a lost one, with bounded exponential backoff.

        Returns:
            True once a stream is open (the registry then calls :meth:`start`, which takes
            it); False when :attr:`max_retries` attempts failed, the channel was closed,
            reconnecting is disabled, or the server refused this client for good (one of
            :data:`FINAL_CODES`).
        """
        if not self.reconnects or self._closed:
            return False
        if self._final:
            logger.warning("channel %r: the server refused this client; not reconnecting", self.id)
            return False
        if self._pending is not None:
            return True
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        failures = 0
        while self.max_retries is None or failures < self.max_retries:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._next_delay())
            if self._closed:
                return False
            try:
                stream = await self._connect()
            except ChannelDisconnectedError as e:
                if self._final:
                    logger.warning("channel %r: not reconnecting: %s", self.id, e)
                    return False
                failures += 1
                logger.info("channel %r: reconnection attempt %d failed: %s", self.id, failures, e)
                continue
            if self._closed:
                stream.call.cancel()
                await stream.release()
                return False
            self._pending = stream
            logger.info("channel %r reconnected to %s", self.id, self.target)
            return True
        logger.warning(
            "channel %r gave up reconnecting to %s after %d failed attempts",
            self.id,
            self.target,
            failures,
        )
        return False

    async def close(self) -> None:
        """Closes the channel: flushes what was sent, ends the stream and waits for the
        server's end of it (each bounded by ``close_timeout``), then closes the
        connection. Idempotent; ``on_close(None)`` has run when this returns."""
        await self._close(grpc.StatusCode.OK, "")

    async def _shutdown(self, stream: _Stream | None, code: grpc.StatusCode, details: str) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.call.cancel()
            await pending.release()
        await super()._shutdown(stream, code, details)
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]} target={self.target!r}>"


# --------------------------------------------------------------------------- the server end


class GrpcServerChannel(_GrpcBase):
    """The server end of one accepted stream, made by
    :class:`cmd_ipc.server.grpc.GrpcHandler`.

    Its id is the client's ``x-cmd-ipc-id`` metadata (or ``grpc-<n>``). It does not
    reconnect: the client does, and arrives as a new stream.

    With an ``exposure`` that restricts what the server shows (the ``expose=`` of
    :func:`~cmd_ipc.server.grpc.serve_grpc`), every frame goes through a
    :class:`~cmd_ipc._expose.PeerFilter`: hidden commands are never listed to the client,
    a call of one is answered ``not_found`` here, and the client's registration of a
    hidden id is answered as for a free one. The frames of such a channel are decoded to do
    so, every one; without it, nothing here decodes them.
    """

    def __init__(
        self,
        id: str,
        context: aio.ServicerContext[bytes, bytes],
        *,
        close_timeout: float | None = 5.0,
        send_limit: int = DEFAULT_SEND_LIMIT,
        exposure: Exposure | None = None,
    ) -> None:
        super().__init__(id, close_timeout=close_timeout, send_limit=send_limit)
        self._context = context
        self._started = False
        self._filter = (
            PeerFilter(exposure) if exposure is not None and exposure.restricted else None
        )

    @property
    def context(self) -> aio.ServicerContext[bytes, bytes]:
        """The RPC's servicer context (for ``peer()``, ``auth_context()``,
        ``invocation_metadata()``...)."""
        return self._context

    async def start(self, on_frame: OnFrame, on_close: OnClose) -> None:
        if self._started:
            raise RuntimeError(f"channel {self.id!r} was already started")
        self._started = True
        self._attach(_ServerStream(self._context), on_frame, on_close)

    async def close(self) -> None:
        """Ends the stream with ``UNAVAILABLE`` once what was sent is flushed: the client
        reconnects later, if it does. Idempotent; ``on_close(None)`` has run when this
        returns."""
        await self._close(grpc.StatusCode.UNAVAILABLE, "closed by the server")

    def send_with_head(
        self, frame: bytes, kind: str, message_id: str, reference: str | None
    ) -> None:
        peer_filter = self._filter
        if peer_filter is not None:
            frame = peer_filter.outgoing(frame, kind, reference)
        self.send(frame)

    def _deliver(self, frame: bytes) -> None:
        peer_filter = self._filter
        if peer_filter is not None:
            answer = peer_filter.incoming(frame)
            if answer is not None:
                # Answered here, as the registry answers a command it does not know.
                self.send(answer)
                return
        super()._deliver(frame)

    def _lost_now(self, reason: str) -> None:
        """Reports the end of the stream, if it is not reported yet (its RPC was cancelled)."""
        stream = self._stream
        if stream is not None:
            self._lost(stream, reason)

    async def wait_closed(self) -> None:
        """Returns once the stream ended (it must have been started)."""
        stream = self._stream
        if stream is not None:
            await stream.ended.wait()

    def _stream_ended(self, stream: _Stream, reason: str | None) -> None:
        level = logging.INFO if reason is None or "ended its stream" in reason else logging.WARNING
        logger.log(
            level,
            "stream %r from %s ended: %s",
            self.id,
            self._context.peer(),
            reason or "closed locally",
        )
