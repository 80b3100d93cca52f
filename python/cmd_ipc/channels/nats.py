"""NATS mesh: the root registries of many machines joined through a NATS server.

A machine's root registry takes a :class:`NatsChannel` as its ``router_channel``. Towards
its registry the channel behaves like a parent registry would: it acknowledges the
registrations the root escalates, answers the root's command list with the commands the
other machines serve, carries calls of commands the machine does not have to whichever
machine serves them, and carries events both ways. Nothing below the root changes: workers
and sub-workers escalate to their root as usual, and whatever the root cannot resolve goes
to the mesh.

Subjects (``<ns>`` is the channel's ``namespace``; machines of one namespace form one mesh):

* ``cmdipc.<ns>.cmd.<id>`` -- a command: every machine that serves it subscribes in the queue
  group ``cmdipc``, so NATS gives each request to one of them (load balancing). A call is a
  NATS request whose payload is the unchanged spec-v1 ``execute.command.request`` JSON; the
  reply is the spec-v1 ``execute.command.response`` JSON.
* ``cmdipc.<ns>.evt.<eventId>`` -- events: the spec-v1 ``event`` JSON, published once by the
  machine where the event entered the mesh and received once by every other machine (the
  connection is made with ``no_echo``, and each registry still deduplicates by message id).
  Private ids (``_...``) are never published.
* ``$SRV.PING|INFO|STATS[.cmdipc-<ns>[.<instance>]]`` -- every channel answers the ADR-32
  services API (as :mod:`nats.micro` services do): its ``INFO`` lists one endpoint per command
  it serves, with the spec-v1 command definition (description and schemas) in the endpoint's
  metadata, so ``nats micro info cmdipc-<ns>`` shows the mesh.
* ``cmdipc.<ns>.sys.changed`` -- a channel publishes its ``INFO`` document here whenever the
  set of commands it serves changes (and with ``"cmd_ipc.state": "down"`` when it closes).

Ids are put into subjects with :func:`encode_id`: an id made of dot-separated tokens of
``[A-Za-z0-9_-]`` is used as it is (``calc.add`` -> ``cmdipc.<ns>.cmd.calc.add``, so NATS
permissions and wildcards apply per segment); any other id becomes one token, ``=`` followed
by the unpadded base64url of its UTF-8 (``"calc add"`` -> ``=Y2FsYyBhZGQ``). Plain ids never
start with ``=``, so :func:`decode_id` inverts it exactly.

How the registry's messages map onto NATS:

* ``register.command.request`` (the root escalates a command of its tree) -- the channel
  subscribes to the command's subject in the queue group, flushes (the server knows the
  subscription before anyone hears of it), announces the change, and acknowledges ``ok``;
  ``duplicate_command`` when the ownership rules refuse (below). A registration of an id the
  channel already serves is acknowledged at once (a restarted worker, a re-announce). spec-v1
  has no other registration error: one that fails otherwise while connected (JetStream
  missing in exclusive mode) is refused ``duplicate_command`` too, with the reason logged at
  ERROR; one that fails while the connection is lost is not acknowledged (the registry fails
  it ``channel_disconnected`` as it learns of the loss, and registers again after it).
* ``list.commands.request`` -- answered with every command the *other* machines serve (from
  discovery); later changes are sent as further ``list.commands.response`` messages.
* ``execute.command.request`` -- published as a NATS request; no responders -> ``not_found``
  at once; a request larger than the server's ``max_payload`` -> ``invalid_request`` without
  sending it; not connected -> ``channel_disconnected``. A call with no reply in time fails
  with ``timeout`` from the registry's own deadline (its ``request_ttl`` or ``timeout=``),
  even when that is longer than the channel's ``request_ttl``.
* ``event`` -- published (dropped with a warning when larger than ``max_payload``).

Ownership (``mode``):

* ``"replicas"`` (default) -- any number of machines may serve one id, like a pool; NATS
  balances the requests among them. A replica is refused (``duplicate_command``) while
  another machine holds the id in ``exclusive`` mode.
* ``"exclusive"`` -- the first machine claims the id in the JetStream key-value bucket
  ``cmdipc-<ns>-claims`` (an atomic create; the bucket's TTL is ``claim_ttl`` and the owner
  refreshes its claim every third of it); a second claimant, or any machine while others
  already serve the id, gets ``duplicate_command``. A claim of a machine that died expires
  after ``claim_ttl``. Conflicts between the two modes are judged on discovery (eventually
  consistent, within the change notification's delay); two exclusive claimants are judged
  atomically by JetStream.

When a command leaves the machine's tree (its worker died and was not restarted), the channel
notices on its next scan of the tree (every ``discovery_interval``), or at once when a
request for it is answered ``not_found`` by its own registry: it stops serving the id and,
since ``not_found`` means that no handler ran, hands that request to another machine serving
it (its caller gets ``not_found`` if there is none).

Connection: nats-py reconnects by itself (``max_reconnect_attempts``, ``-1``: forever). A lost
connection is reported to the registry as a close, so every call waiting on the mesh fails
with ``channel_disconnected`` at once and new calls fail fast; once nats-py is connected again
the registry attaches the channel again, which lists the mesh again and re-registers the
tree's commands; the subscriptions (restored by nats-py) and the exclusive claims are kept (a
server that lost its JetStream data gets the bucket and the claims again). Requests that
arrive between the reconnection and the re-attachment are held (at most ``backlog``) and
handled then; requests being served when the connection dropped are answered once it is
back. :meth:`NatsChannel.close` refuses what the drain did not answer with
``channel_disconnected``. Auth and TLS options are passed to :func:`nats.connect`.

Limits: calls waiting for a reply and requests being served are each bounded by
``max_pending``; bytes queued for a connection that cannot take them by ``send_limit``; every
wait has a timeout. Logging goes to the ``cmd_ipc.nats`` logger.

Example:
    Two machines, each a root with its own workers::

        root = CommandRegistry("machine-a", router_channel="mesh")
        await root.register_channel(NatsChannel("mesh", "nats://nats.example:4222"))
        await root.spawn_worker("calc", "app.workers:calc")   # calc.* is served on NATS
        await root.execute_command("image.resize", {"w": 8})  # served by another machine
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import json
import logging
import os
import re
import socket
import ssl as _ssl
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cmd_ipc import _core
from cmd_ipc._optional import require
from cmd_ipc.channels._nats_server import NatsServer, server_binary
from cmd_ipc.channels.base import Channel, OnClose, OnFrame
from cmd_ipc.errors import ChannelDisconnectedError, ProtocolError

require("nats", "nats", "NatsChannel")

import nats.errors  # noqa: E402
import nats.js.errors  # noqa: E402
from nats.aio.client import Client  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402
from nats.aio.subscription import Subscription  # noqa: E402
from nats.aio.transport import TcpTransport  # noqa: E402
from nats.js.kv import KeyValue  # noqa: E402
from nats.micro.service import (  # noqa: E402
    EndpointInfo,
    EndpointStats,
    ServiceInfo,
    ServicePing,
    ServiceStats,
)
from nats.nuid import NUID  # noqa: E402
from nats.protocol.command import pub_cmd  # noqa: E402

__all__ = [
    "QUEUE_GROUP",
    "Mode",
    "NatsChannel",
    "NatsServer",
    "decode_id",
    "encode_id",
    "server_binary",
]

logger = logging.getLogger("cmd_ipc.nats")

#: Ownership modes.
Mode = Literal["replicas", "exclusive"]
#: The queue group every machine serving a command subscribes in.
QUEUE_GROUP = "cmdipc"
#: The longest subject a command or event id may make (NATS control lines are bounded).
MAX_SUBJECT = 1024
#: Bytes in a socket's write buffer under which a message is written at once rather than
#: queued for nats-py's flusher task.
_DIRECT_LIMIT = 64 * 1024
#: ADR-32 version of the service (the cmd-ipc version).
_VERSION = _core.__version__

_PLAIN = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_B64 = re.compile(r"[A-Za-z0-9_-]*")
_ENDPOINT_CHARS = re.compile(r"[^A-Za-z0-9_-]")
#: The fraction of ``discovery_window`` a scan of ``$SRV.INFO`` waits for more answers
#: after the last one, once every machine it knows of answered.
_STALL = 0.25
#: Seconds between checks of wait_connected when no state change woke it.
_STATE_POLL = 1.0
#: Errors nats-py reports while a connection is lost or being made again.
_CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    nats.errors.NoServersError,
    nats.errors.UnexpectedEOF,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionClosedError,
)
#: What JetStream answers once the claims bucket is gone (a server that restarted without
#: its store): the stream is not found, or nothing answers for it.
_BUCKET_GONE = (
    nats.js.errors.NotFoundError,
    nats.js.errors.BucketNotFoundError,
    nats.js.errors.NoStreamResponseError,
    nats.errors.NoRespondersError,
)
#: The NATS status header, and the status of a request nobody subscribes to.
_STATUS = "Status"
_NO_RESPONDERS = "503"


def encode_id(command_id: str) -> str:
    """The subject form of a command or event id (see the module docstring).

    Example:
        >>> encode_id("calc.add"), encode_id("calc add"), decode_id(encode_id("ça.va"))
        ('calc.add', '=Y2FsYyBhZGQ', 'ça.va')
    """
    if _PLAIN.fullmatch(command_id):
        return command_id
    return "=" + base64.urlsafe_b64encode(command_id.encode()).rstrip(b"=").decode()


def decode_id(token: str) -> str:
    """The id whose subject form (:func:`encode_id`) is ``token``.

    Raises:
        ValueError: ``token`` is not a form :func:`encode_id` makes.
    """
    if token.startswith("="):
        raw = token[1:]
        if not _B64.fullmatch(raw) or len(raw) % 4 == 1:
            raise ValueError(f"not an encoded id: {token!r}")
        try:
            value = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"not an encoded id: {token!r}") from None
        if encode_id(value) != token:
            raise ValueError(f"not the canonical form of an id: {token!r}")
        return value
    if _PLAIN.fullmatch(token):
        return token
    raise ValueError(f"not an encoded id: {token!r}")


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _endpoint_name(token: str) -> str:
    """An ADR-32 endpoint name (``[A-Za-z0-9_-]+``) for a subject token (not unique: the
    definition in the endpoint's metadata names the command)."""
    return _ENDPOINT_CHARS.sub("_", token) or "_"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _exec_error(thid: str, code: str, message: str) -> bytes:
    return _dumps(
        {
            "id": _core.new_id(),
            "type": "execute.command.response",
            "thid": thid,
            "response": {"ok": False, "error": {"code": code, "message": message}},
        }
    )


def _id_of(data: bytes) -> str:
    """The ``id`` of a request the decoder refused, if it can be read (a ``thid`` must not
    be empty: ``"?"`` otherwise)."""
    try:
        value = json.loads(data).get("id")
    except (ValueError, AttributeError, RecursionError):
        return "?"
    return value if isinstance(value, str) and value else "?"


def _is_not_found(frame: bytes) -> bool:
    try:
        response = json.loads(frame)["response"]
        return response["ok"] is False and response["error"]["code"] == "not_found"
    except (ValueError, KeyError, TypeError):
        return False


class _Client(Client):
    """nats-py's client, with a publish that does not await (the registry sends from
    synchronous code)."""

    def publish_nowait(self, subject: str, payload: bytes, reply: str = "") -> bool:
        """Queues a ``PUB`` for the flusher task exactly as :meth:`Client.publish` does when
        it would not wait; returns False (nothing queued) when it would: not connected, the
        pending buffer full, or no flusher running. The caller then awaits ``publish``."""
        if self._status != Client.CONNECTED:
            return False
        queue, flusher = self._flush_queue, self._flusher_task
        if queue is None or flusher is None or flusher.done():
            return False
        if len(payload) > self._max_payload:
            return False
        cmd = pub_cmd(subject, reply, payload)
        writer = None if self._pending else self._writer()
        if writer is not None and writer.transport.get_write_buffer_size() < _DIRECT_LIMIT:
            # Nothing waits for the flusher: write now, saving its loop turn (the order is
            # kept: what the flusher took last is in the socket's buffer already).
            writer.write(cmd)
        else:
            size = self._pending_data_size + len(cmd)
            if 0 < self._max_pending_size < size:
                return False
            self._pending.append(cmd)
            self._pending_data_size = size
            if queue.empty():  # kick the flusher, as Client._flush_pending does
                queue.put_nowait(asyncio.get_running_loop().create_future())
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += len(payload)
        return True

    def _writer(self) -> asyncio.StreamWriter | None:
        """The stream of a plain TCP or TLS connection (None for WebSocket ones)."""
        transport = self._transport
        if not isinstance(transport, TcpTransport):
            return None
        writer = transport._io_writer
        if writer is None or writer.transport.is_closing():
            return None
        return writer


class _Inline(asyncio.Future[Msg]):
    """Given to :meth:`Client.subscribe` as its ``future``: nats-py hands every message of a
    subscription that has one to ``future.set_result`` in its reader task, with no queue and
    no task switch, which this turns into a call of ``fn(msg)``. (A subscription with a
    callback would go through a queue and a task per subscription: one more loop turn per
    message.) ``fn`` must not raise: an exception would stop nats-py's reader."""

    def __init__(self, fn: Callable[[Msg], None]) -> None:
        super().__init__()
        self._fn = fn

    def set_result(self, result: Msg, /) -> None:
        try:
            self._fn(result)
        except Exception:
            logger.exception("handling a NATS message on %s failed", result.subject)

    def cancelled(self) -> bool:
        return False


@dataclass(eq=False)
class _Served:
    """A command this machine serves on NATS."""

    id: str
    definition: dict[str, Any]
    subject: str
    sub: Subscription | None = None
    #: When the registry learned of the acknowledgement (a counter; unset: not yet).
    generation: float = float("inf")
    #: Revision of this machine's claim in the claims bucket (exclusive mode).
    claim: int | None = None
    requests: int = 0


@dataclass(eq=False)
class _Peer:
    """Another machine of the mesh, as discovery knows it."""

    name: str
    #: Command id -> (definition, mode).
    commands: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    missed: int = 0


class _OutCall:
    __slots__ = ("command_id", "deadline", "message_id")

    def __init__(self, message_id: str, command_id: str, deadline: float) -> None:
        self.message_id = message_id
        self.command_id = command_id
        self.deadline = deadline


class _InCall:
    __slots__ = ("answer", "command_id", "data", "deadline", "reply", "subject")

    def __init__(
        self, reply: str, subject: str, data: bytes, command_id: str, deadline: float
    ) -> None:
        self.reply = reply
        self.subject = subject
        self.data = data
        self.command_id = command_id
        self.deadline = deadline
        #: The reply, made while the connection was lost (published once it is back).
        self.answer: bytes | None = None


def _check_positive(value: float, what: str) -> float:
    if not value > 0:
        raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


class NatsChannel(Channel):
    """A machine's root joined to a NATS mesh (see the module docstring for the design).

    Register it in the machine's root registry, whose ``router_channel`` names it.
    :meth:`CommandRegistry.register_channel` connects, learns the mesh's commands, and
    returns once they are listed (``list_commands()`` shows them).

    Args:
        id: The channel id (the root's ``router_channel``).
        servers: NATS URL(s) (``nats://host:4222``, ``tls://...``; user and password may be in
            the URL).
        namespace: Name of the mesh (``[A-Za-z0-9_-]``, at most 64): machines with the same
            namespace on one NATS account share commands and events.
        mode: ``"replicas"`` or ``"exclusive"`` ownership of the commands this machine serves.
        name: This machine's name in discovery and ADR-32 metadata (default
            ``<hostname>:<pid>``); also the NATS connection name.
        token: Auth token.
        user: User name (with ``password``).
        password: Password.
        creds: Path of a ``.creds`` file (JWT and NKey seed), for decentralised auth.
        nkeys_seed: Path of an NKey seed file.
        tls: TLS context (``tls://`` URLs use the default context without it).
        tls_hostname: Host name to verify the server's certificate against.
        open_timeout: Seconds allowed for the first connection (including discovery).
        reconnect: Let nats-py reconnect after a lost connection (sets :attr:`reconnects`).
        reconnect_time_wait: Seconds between reconnection attempts to one server.
        max_reconnect_attempts: Attempts per server before giving up (``-1``: never).
        ping_interval: Seconds between pings of the server (a dead server is noticed after
            two unanswered ones).
        request_ttl: Seconds a served request is remembered while its reply is made (a
            later reply is not published), and a call out while waiting for its reply. A
            call's reply that comes later still goes to the registry, which gives it to the
            caller if the caller still waits: the caller's own timeout (``timeout=``, or the
            registry's ``request_ttl``) decides when it gets ``timeout``, not this.
        claim_ttl: Seconds an exclusive claim lives without refresh (the claims bucket's TTL
            when this machine creates it).
        discovery_interval: Seconds between full scans of the mesh (machines that stopped
            answering are forgotten after two) and of this machine's own tree.
        discovery_window: Seconds a scan waits for answers.
        max_pending: Maximum calls waiting for replies, and requests being served.
        send_limit: Maximum bytes queued while the connection's own buffer is full.
        backlog: Maximum messages held between a reconnection and the re-attachment.
        drain_timeout: Seconds :meth:`close` waits for requests being served to be answered.
        connect_options: Further keyword arguments for :func:`nats.connect` (``inbox_prefix``,
            ``pending_size``, ``user_jwt_cb``, ``signature_cb``...); the callbacks and
            ``no_echo`` are the channel's own.

    Raises:
        ValueError: An invalid namespace, mode or option.

    Example:
        >>> ch = NatsChannel("mesh", "nats://127.0.0.1:4222", namespace="shop", name="a")
        >>> (ch.id, ch.namespace, ch.mode, ch.encoding, ch.reconnects)
        ('mesh', 'shop', 'replicas', 'json', True)
        >>> ch.command_subject("calc.add")
        'cmdipc.shop.cmd.calc.add'
    """

    wait_for_commands = True

    def __init__(
        self,
        id: str,
        servers: str | Iterable[str] = "nats://127.0.0.1:4222",
        *,
        namespace: str = "default",
        mode: Mode = "replicas",
        name: str | None = None,
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        creds: str | None = None,
        nkeys_seed: str | None = None,
        tls: _ssl.SSLContext | None = None,
        tls_hostname: str | None = None,
        open_timeout: float = 5.0,
        reconnect: bool = True,
        reconnect_time_wait: float = 2.0,
        max_reconnect_attempts: int = -1,
        ping_interval: float = 20.0,
        request_ttl: float = 60.0,
        claim_ttl: float = 15.0,
        discovery_interval: float = 5.0,
        discovery_window: float = 0.25,
        max_pending: int = 100_000,
        send_limit: int = 64 * 1024 * 1024,
        backlog: int = 1024,
        drain_timeout: float = 2.0,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(id, "json")
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"namespace must be 1 to 64 of [A-Za-z0-9_-], got {namespace!r}")
        if mode not in ("replicas", "exclusive"):
            raise ValueError(f"mode must be 'replicas' or 'exclusive', got {mode!r}")
        for value, what in ((max_pending, "max_pending"), (send_limit, "send_limit")):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{what} must be a positive int, got {value!r}")
        if not isinstance(backlog, int) or backlog < 0:
            raise ValueError(f"backlog must be a non-negative int, got {backlog!r}")
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        if not self.servers:
            raise ValueError("servers must name at least one NATS URL")
        self.namespace = namespace
        self.mode: Mode = mode
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.reconnects = bool(reconnect)
        self.open_timeout = _check_positive(open_timeout, "open_timeout")
        self.request_ttl = _check_positive(request_ttl, "request_ttl")
        self.claim_ttl = _check_positive(claim_ttl, "claim_ttl")
        self.discovery_interval = _check_positive(discovery_interval, "discovery_interval")
        self.discovery_window = _check_positive(discovery_window, "discovery_window")
        self.drain_timeout = _check_positive(drain_timeout, "drain_timeout")
        self.max_pending = max_pending
        self.send_limit = send_limit
        self.backlog = backlog
        self._connect_options: dict[str, Any] = {
            "name": self.name,
            "allow_reconnect": self.reconnects,
            "reconnect_time_wait": _check_positive(reconnect_time_wait, "reconnect_time_wait"),
            "max_reconnect_attempts": int(max_reconnect_attempts),
            "ping_interval": _check_positive(ping_interval, "ping_interval"),
            "connect_timeout": self.open_timeout,
            **(connect_options or {}),
        }
        auth = {
            "token": token,
            "user": user,
            "password": password,
            "user_credentials": creds,
            "nkeys_seed": nkeys_seed,
            "tls": tls,
            "tls_hostname": tls_hostname,
        }
        self._connect_options.update({k: v for k, v in auth.items() if v is not None})
        #: This channel's ADR-32 instance id (kept across reconnects).
        self.instance_id = NUID().next().decode()
        self.service_name = f"cmdipc-{namespace}"
        self._prefix = f"cmdipc.{namespace}."
        self._changed_subject = f"{self._prefix}sys.changed"
        self._bucket = f"cmdipc-{namespace}-claims"

        self._nc: _Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_frame: OnFrame | None = None
        self._on_close: OnClose | None = None
        #: Between start() and the report of a close: frames go to the registry.
        self._attached = False
        self._closed = False
        self._reported = False
        #: Bumped at each attach: a frame scheduled for an earlier attachment is dropped.
        self._epoch = 0
        self._up = asyncio.Event()
        self._gone = asyncio.Event()
        #: Set while attached.
        self._attached_event = asyncio.Event()
        #: Futures of wait_connected, resolved at each change of the connection's state.
        self._state_waiters: list[asyncio.Future[None]] = []
        self._started_at = datetime.datetime.now(datetime.timezone.utc)

        self._inbox = ""
        self._seq = 0
        self._out: dict[str, _OutCall] = {}
        self._in: dict[str, _InCall] = {}
        self._in_empty: asyncio.Event | None = None
        self._scans: dict[str, Callable[[Msg], None]] = {}
        self._subjects: dict[str, str | None] = {}
        self._served: dict[str, _Served] = {}
        self._generation = 0
        self._peers: dict[str, _Peer] = {}
        self._pushed: list[dict[str, Any]] | None = None
        self._list_thid: str | None = None
        self._held: deque[tuple[_Served | None, Msg]] = deque()
        self._queue: deque[tuple[str, bytes, str]] = deque()
        self._queued = 0
        self._writer: asyncio.Task[None] | None = None
        self._registrations: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._relisting: asyncio.Future[set[str]] | None = None
        self._relist_id: str | None = None
        self._announce_due = False
        #: The last INFO document made was over max_payload (warned once until it fits).
        self._info_too_large = False
        self._kv: KeyValue | None = None
        self._claim_refresh = self.claim_ttl / 3
        self._waiters: list[tuple[frozenset[str], asyncio.Future[None]]] = []
        self._stats = dict.fromkeys(
            (
                "calls_out",
                "calls_in",
                "events_out",
                "events_in",
                "no_responders",
                "too_large",
                "held",
                "reconnects",
            ),
            0,
        )

    # ------------------------------------------------------------------ introspection

    def command_subject(self, command_id: str) -> str:
        """The subject ``command_id`` is served on in this channel's namespace."""
        return f"{self._prefix}cmd.{encode_id(command_id)}"

    def event_subject(self, event_id: str) -> str:
        """The subject events ``event_id`` are published on."""
        return f"{self._prefix}evt.{encode_id(event_id)}"

    @property
    def client(self) -> Client | None:
        """The nats-py connection (for ``rtt()``, ``stats``...), once started."""
        return self._nc

    @property
    def connected(self) -> bool:
        """True while connected to a NATS server and attached to the registry."""
        nc = self._nc
        return self._attached and nc is not None and nc.is_connected

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def max_payload(self) -> int | None:
        """The server's ``max_payload`` (bytes), once connected."""
        nc = self._nc
        return None if nc is None else nc.max_payload

    def served(self) -> list[str]:
        """The ids this machine serves on NATS, sorted."""
        return sorted(self._served)

    def mesh_commands(self) -> dict[str, list[str]]:
        """The commands the other machines serve: ``{command id: [machine names]}``."""
        out: dict[str, list[str]] = {}
        for peer in self._peers.values():
            for cid in peer.commands:
                out.setdefault(cid, []).append(peer.name)
        return {cid: sorted(names) for cid, names in sorted(out.items())}

    def stats(self) -> dict[str, int]:
        """Counters: ``calls_out``, ``calls_in``, ``events_out``, ``events_in``,
        ``no_responders``, ``too_large`` (messages refused for ``max_payload``), ``held``
        (requests held for a re-attachment), ``reconnects``, and the sizes ``pending_out``
        and ``pending_in``."""
        return {**self._stats, "pending_out": len(self._out), "pending_in": len(self._in)}

    async def wait_available(self, *command_ids: str, timeout: float = 10.0) -> None:
        """Waits until another machine of the mesh serves every one of ``command_ids``.

        Raises:
            TimeoutError: Not within ``timeout`` seconds.
        """
        wanted = frozenset(command_ids)
        if wanted <= self._peer_ids():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (wanted, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            missing = sorted(wanted - self._peer_ids())
            raise TimeoutError(f"not served on the mesh within {timeout}s: {missing}") from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Waits until the channel is connected and attached to its registry (after a
        reconnection: once the registry attached it again).

        Raises:
            TimeoutError: Not within ``timeout`` seconds.
            ChannelDisconnectedError: The channel was closed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Until connected, gone or the deadline: right after a server restart the channel
        # may still be attached while nats-py knows the connection is lost (or not yet).
        while True:
            if self._closed or self._gone.is_set():
                raise ChannelDisconnectedError(f"channel {self.id!r} was closed")
            if self.connected:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"channel {self.id!r} not connected within {timeout}s")
            changed = loop.create_future()
            self._state_waiters.append(changed)
            try:
                # Woken by every change of the connection or the attachment; the cap is a
                # backstop for a change nats-py makes without a callback.
                await asyncio.wait({changed}, timeout=min(remaining, _STATE_POLL))
            finally:
                with contextlib.suppress(ValueError):
                    self._state_waiters.remove(changed)

    def _peer_ids(self) -> set[str]:
        return {cid for peer in self._peers.values() for cid in peer.commands}

    def _state_changed(self) -> None:
        """Wakes wait_connected: the connection or the attachment changed."""
        waiters, self._state_waiters = self._state_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, on_frame: OnFrame, on_close: OnClose) -> None:
        """Connects (the first time), subscribes, scans the mesh, and starts delivering.

        Raises:
            ChannelDisconnectedError: The connection failed (refused, auth, timeout...);
                the cause is chained.
            RuntimeError: The channel is already attached.
        """
        if self._closed:
            raise ChannelDisconnectedError(f"channel {self.id!r} was closed")
        if self._attached:
            raise RuntimeError(f"channel {self.id!r} was already started")
        self._loop = asyncio.get_running_loop()
        if self._nc is None:
            await self._open()
        self._on_frame, self._on_close = on_frame, on_close
        self._reported = False
        self._epoch += 1
        self._attached = True
        self._attached_event.set()
        self._state_changed()
        held, self._held = self._held, deque()
        for served, msg in held:
            if served is None:
                self._on_event(msg)
            else:
                self._on_request(served, msg, replayed=True)
        # Replies to requests served across the lost connection, made meanwhile.
        self._flush_replies()

    async def _open(self) -> None:
        nc = _Client()
        options = {
            **self._connect_options,
            "servers": self.servers,
            "no_echo": True,
            "error_cb": self._error_cb,
            "disconnected_cb": self._disconnected_cb,
            "reconnected_cb": self._reconnected_cb,
            "closed_cb": self._closed_cb,
        }
        try:
            # nats-py retries a refused first connection for as long as it may reconnect.
            await asyncio.wait_for(nc.connect(**options), self.open_timeout)
            self._nc = nc
            self._up.set()
            self._inbox = f"{nc._inbox_prefix.decode()}.{NUID().next().decode()}."
            await self._subscribe(nc)
            await asyncio.wait_for(nc.flush(), self.open_timeout)
            self._apply_scan(await self._scan())
        except BaseException as e:
            self._nc = None
            self._up.clear()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), self.drain_timeout)
            if isinstance(e, Exception):
                raise ChannelDisconnectedError(
                    f"channel {self.id!r} could not connect to {', '.join(self.servers)}: "
                    f"{str(e) or type(e).__name__}"
                ) from e
            raise
        logger.info(
            "channel %r: %s joined mesh %r on %s as %s",
            self.id,
            self.name,
            self.namespace,
            nc.connected_url.netloc if nc.connected_url else self.servers[0],
            self.instance_id,
        )
        self._spawn(self._housekeeping())
        self._spawn(self._registrar())

    async def _subscribe(self, nc: _Client) -> None:
        await nc.subscribe(self._inbox + "*", future=_Inline(self._on_reply))
        await nc.subscribe(f"{self._prefix}evt.>", future=_Inline(self._on_event))
        await nc.subscribe(self._changed_subject, future=_Inline(self._on_changed))
        for verb, make in (("PING", self._ping), ("INFO", self._info), ("STATS", self._info_stats)):
            handler = functools.partial(self._control, make)
            for subject in (
                f"$SRV.{verb}",
                f"$SRV.{verb}.{self.service_name}",
                f"$SRV.{verb}.{self.service_name}.{self.instance_id}",
            ):
                await nc.subscribe(subject, future=_Inline(handler))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reconnect(self) -> bool:
        """Waits until nats-py is connected again; False once it gave up or the channel
        was closed (then it stays closed)."""
        nc = self._nc
        if not self.reconnects or self._closed or nc is None or nc.is_closed:
            return False
        up = asyncio.ensure_future(self._up.wait())
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait({up, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
            gone.cancel()
        return self._up.is_set() and not self._closed and not self._gone.is_set()

    async def close(self) -> None:
        """Stops serving (the other replicas take the requests), answers what is being
        served (at most ``drain_timeout``), tells the mesh, releases exclusive claims, and
        closes the connection. Idempotent; ``on_close(None)`` has run when it returns."""
        if self._closed:
            self._report(None)
            return
        self._closed = True
        self._gone.set()
        self._state_changed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        nc = self._nc
        if nc is not None and nc.is_connected:
            with contextlib.suppress(Exception):
                await self._wind_down(nc)
        self._attached = False
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), self.drain_timeout)
        self._out.clear()
        self._in.clear()
        self._report(None)

    async def _wind_down(self, nc: _Client) -> None:
        served = list(self._served.values())
        for s in served:
            if s.sub is not None:
                with contextlib.suppress(Exception):
                    await s.sub.unsubscribe()
        held, self._held = self._held, deque()
        for entry, msg in held:
            if entry is not None:
                self._refuse(msg, "channel_disconnected", f"machine {self.name!r} is closing")
        if self._in:
            self._in_empty = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._in_empty.wait(), self.drain_timeout)
        # What was not answered within drain_timeout: its callers learn it now, rather than
        # waiting for their timeout.
        left, self._in = self._in, {}
        for rid, call in left.items():
            self._publish(
                call.reply,
                _exec_error(
                    rid,
                    "channel_disconnected",
                    f"machine {self.name!r} closed before {call.command_id!r} answered "
                    f"(drain_timeout={self.drain_timeout}s)",
                ),
            )
        self._served.clear()
        self._publish(self._changed_subject, self._info_document(state="down"))
        kv = self._kv
        if kv is not None:
            releases = [self._release(kv, s) for s in served if s.claim is not None]
            if releases:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        asyncio.gather(*releases, return_exceptions=True), self.drain_timeout
                    )
        await asyncio.wait_for(nc.flush(), self.drain_timeout)

    def _report(self, reason: str | None) -> None:
        """Reports the end of the current attachment once."""
        self._attached = False
        self._attached_event.clear()
        self._state_changed()
        if not self._reported and self._on_close is not None:
            self._reported = True
            self._on_close(reason)

    def _lost(self, reason: str) -> None:
        """The connection is gone: the calls waiting on it fail (the registry fails them
        when it learns of the close). The requests being served stay: their handlers still
        run, and their replies are published once the connection is back (those that
        outlive ``request_ttl`` are forgotten by the sweep)."""
        if not self._attached:
            return
        logger.warning("channel %r: %s", self.id, reason)
        self._out.clear()
        if self._relisting is not None and not self._relisting.done():
            self._relisting.cancel()
        self._report(reason)

    # ------------------------------------------------------------------ nats-py callbacks

    async def _error_cb(self, e: Exception) -> None:
        if isinstance(e, _CONNECTION_ERRORS):
            # Reported as the lost connection (or a failed attempt) already.
            logger.debug("channel %r: %s", self.id, e or type(e).__name__)
        else:
            logger.warning("channel %r: NATS error: %s", self.id, e or type(e).__name__)

    async def _disconnected_cb(self) -> None:
        self._up.clear()
        self._state_changed()
        if not self._closed:
            self._lost("the connection to NATS was lost")

    async def _reconnected_cb(self) -> None:
        self._stats["reconnects"] += 1
        nc = self._nc
        where = nc.connected_url.netloc if nc is not None and nc.connected_url else "?"
        logger.info("channel %r reconnected to %s", self.id, where)
        self._up.set()
        self._state_changed()
        self._flush_replies()
        self._spawn(self._after_reconnect())

    async def _closed_cb(self) -> None:
        self._up.clear()
        self._gone.set()
        self._state_changed()
        if not self._closed:
            self._lost("the connection to NATS was closed")

    async def _after_reconnect(self) -> None:
        """Claims kept (a server that restarted, or a claim that expired meanwhile, is
        claimed again), the mesh scanned again, this machine announced."""
        try:
            await self._refresh_claims()
            self._apply_scan(await self._scan())
        except Exception as e:
            logger.warning("channel %r: after reconnecting: %s", self.id, e)
        self._announce_soon()

    # ------------------------------------------------------------------ frames from the registry

    def send(self, frame: bytes) -> None:
        """Sends one frame, reading its head itself (the registry calls
        :meth:`send_with_head`)."""
        try:
            msg = json.loads(frame)
            kind = msg["type"]
            ref = msg.get("thid") or msg.get("commandId") or msg.get("eventId")
            if kind == "register.command.request":
                ref = msg["command"]["id"]
            self.send_with_head(frame, kind, msg["id"], ref)
        except (ValueError, KeyError, TypeError):
            logger.warning("channel %r: not a spec-v1 message, dropped", self.id)

    def send_with_head(
        self, frame: bytes, kind: str, message_id: str, reference: str | None
    ) -> None:
        if kind == "execute.command.request":
            self._call(frame, message_id, reference or "")
        elif kind == "execute.command.response":
            self._answer(frame, reference or "")
        elif kind == "event":
            self._event(frame, reference or "")
        elif kind == "register.command.request":
            self._register(frame, message_id)
        elif kind == "list.commands.request":
            self._list_thid = message_id
            self._soon(self._list_response(message_id))
        elif kind == "list.commands.response":
            fut = self._relisting
            if fut is not None and reference == self._relist_id and not fut.done():
                try:
                    fut.set_result({c["id"] for c in json.loads(frame)["commands"]})
                except (ValueError, KeyError, TypeError) as e:
                    fut.set_exception(e)
        # register.command.response: this channel never sends its registry registrations.

    def _soon(self, frame: bytes) -> None:
        """Delivers a frame made here on the next loop turn (never inside ``send``, which
        runs while the registry carries out its actions)."""
        loop = self._loop
        if loop is not None:
            loop.call_soon(self._deliver_at, self._epoch, frame)

    def _deliver_at(self, epoch: int, frame: bytes) -> None:
        if epoch == self._epoch:
            self._deliver(frame)

    def _deliver(self, frame: bytes) -> None:
        on_frame = self._on_frame
        if self._attached and on_frame is not None:
            try:
                on_frame(frame)
            except Exception:
                logger.exception("channel %r: the registry failed on a frame", self.id)

    # ------------------------------------------------------------------ calls out

    def _subject_of(self, command_id: str) -> str | None:
        subject = self._subjects.get(command_id, "")
        if subject == "":
            subject = self.command_subject(command_id)
            if len(subject.encode()) > MAX_SUBJECT:
                subject = None
            if len(self._subjects) >= 10_000:
                self._subjects.clear()
            self._subjects[command_id] = subject
        return subject

    def _call(self, frame: bytes, message_id: str, command_id: str) -> None:
        nc = self._nc
        if not self._attached or nc is None or not nc.is_connected:
            self._soon(
                _exec_error(
                    message_id,
                    "channel_disconnected",
                    f"channel {self.id!r} is not connected to NATS",
                )
            )
            return
        subject = self._subject_of(command_id)
        if subject is None or _core.is_private(command_id):
            why = "is private" if subject else f"makes a NATS subject over {MAX_SUBJECT} bytes"
            self._soon(_exec_error(message_id, "not_found", f"command {command_id!r} {why}"))
            return
        limit = nc.max_payload
        if len(frame) > limit:
            self._stats["too_large"] += 1
            self._soon(
                _exec_error(
                    message_id,
                    "invalid_request",
                    f"the request for {command_id!r} is {len(frame)} bytes, more than the NATS "
                    f"server's max_payload of {limit} bytes (raise max_payload in the server "
                    "configuration, or send less)",
                )
            )
            return
        out = self._out
        if len(out) >= self.max_pending:
            self._soon(
                _exec_error(
                    message_id,
                    "internal_error",
                    f"channel {self.id!r} has {len(out)} calls waiting for NATS replies "
                    "(max_pending); retry later",
                )
            )
            return
        self._seq += 1
        token = str(self._seq)
        assert self._loop is not None
        out[token] = _OutCall(message_id, command_id, self._loop.time() + self.request_ttl)
        self._stats["calls_out"] += 1
        if not self._publish(subject, frame, self._inbox + token):
            del out[token]
            self._soon(
                _exec_error(
                    message_id,
                    "channel_disconnected",
                    f"channel {self.id!r} could not send to NATS (not connected, or more than "
                    f"send_limit={self.send_limit} bytes queued)",
                )
            )

    def _on_reply(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox) :]
        call = self._out.pop(token, None)
        if call is None:
            scan = self._scans.get(token)
            if scan is not None:
                scan(msg)
            elif token.isdigit() and msg.data and not msg.headers:
                # A reply that came after request_ttl: the registry knows whether its caller
                # still waits (a longer ``timeout=``) and drops it otherwise.
                self._deliver(msg.data)
            return
        headers = msg.headers
        if headers and headers.get(_STATUS) == _NO_RESPONDERS:
            self._stats["no_responders"] += 1
            frame = _exec_error(
                call.message_id,
                "not_found",
                f"no machine of mesh {self.namespace!r} serves {call.command_id!r} "
                "(no responders on NATS)",
            )
        elif not msg.data:
            frame = _exec_error(call.message_id, "internal_error", "an empty reply from NATS")
        else:
            frame = msg.data
        self._deliver(frame)

    # ------------------------------------------------------------------ requests served

    def _on_request(self, served: _Served, msg: Msg, *, replayed: bool = False) -> None:
        if not replayed:  # a held request was counted when it came
            served.requests += 1
        reply = msg.reply
        if not reply:
            return
        if not self._attached:
            self._hold(served, msg)
            return
        data = msg.data
        try:
            kind, rid, _ = _core.inspect_message(data, "json")
        except ProtocolError as e:
            logger.warning("channel %r: a request on %s was refused: %s", self.id, msg.subject, e)
            self._publish(
                reply,
                _exec_error(_id_of(data), "invalid_request", f"not a spec-v1 message: {e}"),
            )
            return
        if kind != "execute.command.request":
            self._publish(
                reply,
                _exec_error(rid, "invalid_request", f"a {kind} is not an execute.command.request"),
            )
            return
        calls = self._in
        if rid in calls:
            self._publish(reply, _exec_error(rid, "invalid_request", "duplicate request id"))
            return
        if len(calls) >= self.max_pending:
            self._publish(
                reply,
                _exec_error(
                    rid,
                    "internal_error",
                    f"machine {self.name!r} is serving {len(calls)} requests (max_pending); "
                    "retry later",
                ),
            )
            return
        assert self._loop is not None
        calls[rid] = _InCall(
            reply, msg.subject, data, served.id, self._loop.time() + self.request_ttl
        )
        self._stats["calls_in"] += 1
        self._deliver(data)

    def _hold(self, served: _Served | None, msg: Msg) -> None:
        """A message between a reconnection and the re-attachment: kept for it."""
        if len(self._held) < self.backlog:
            self._stats["held"] += 1
            self._held.append((served, msg))
        elif served is not None:
            self._refuse(msg, "channel_disconnected", f"machine {self.name!r} is reconnecting")

    def _refuse(self, msg: Msg, code: str, message: str) -> None:
        with contextlib.suppress(ProtocolError):
            _, rid, _ = _core.inspect_message(msg.data, "json")
            self._publish(msg.reply, _exec_error(rid, code, message))

    def _answer(self, frame: bytes, thid: str) -> None:
        call = self._in.get(thid)
        if call is None or call.answer is not None:
            return
        nc = self._nc
        if nc is not None and not nc.is_connected and not nc.is_closed:
            # A brief loss of the connection: the reply waits for it (bounded by the sweep).
            call.answer = frame
            return
        del self._in[thid]
        if not self._in and self._in_empty is not None:
            self._in_empty.set()
        if nc is None:
            return
        if len(frame) > nc.max_payload:
            self._stats["too_large"] += 1
            frame = _exec_error(
                thid,
                "internal_error",
                f"the response of {call.command_id!r} is {len(frame)} bytes, more than the "
                f"NATS server's max_payload of {nc.max_payload} bytes",
            )
        elif b'"not_found"' in frame and call.command_id in self._served and _is_not_found(frame):
            # This machine may have lost the command: check before answering.
            self._spawn(self._recheck(call, frame))
            return
        self._publish(call.reply, frame)

    def _flush_replies(self) -> None:
        """Publishes the replies made while the connection was lost."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return
        for thid in [rid for rid, call in self._in.items() if call.answer is not None]:
            call = self._in[thid]
            answer, call.answer = call.answer, None
            assert answer is not None
            self._answer(answer, thid)

    async def _recheck(self, call: _InCall, frame: bytes) -> None:
        generation = self._generation
        local = await self._relist()
        served = self._served.get(call.command_id)
        if (
            local is not None
            and call.command_id not in local
            and served is not None
            and served.generation <= generation
        ):
            await self._unserve(served, "it left this machine's tree")
            # not_found: no handler ran, so the request may go to another machine (and its
            # caller gets not_found from NATS if none serves the command).
            self._publish(call.subject, call.data, call.reply)
            return
        self._publish(call.reply, frame)

    async def _relist(self) -> set[str] | None:
        """The public commands of this machine's tree, as its root lists them (None when
        the root does not answer)."""
        if self._relisting is None or self._relisting.done():
            assert self._loop is not None
            self._relisting = self._loop.create_future()
            self._relist_id = _core.new_id()
            self._deliver(_dumps({"id": self._relist_id, "type": "list.commands.request"}))
        fut = self._relisting
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.open_timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError, ValueError, KeyError, TypeError):
            if self._closed:
                raise
            return None

    # ------------------------------------------------------------------ events

    def _event(self, frame: bytes, event_id: str) -> None:
        nc = self._nc
        if _core.is_private(event_id) or nc is None:
            return
        subject = self.event_subject(event_id)
        if len(subject.encode()) > MAX_SUBJECT:
            logger.warning("channel %r: event id too long for a NATS subject: dropped", self.id)
            return
        if len(frame) > nc.max_payload:
            self._stats["too_large"] += 1
            logger.warning(
                "channel %r: event %r (%d bytes) is larger than the NATS server's max_payload "
                "of %d bytes: not published",
                self.id,
                event_id,
                len(frame),
                nc.max_payload,
            )
            return
        self._stats["events_out"] += 1
        self._publish(subject, frame)

    def _on_event(self, msg: Msg) -> None:
        if not self._attached:
            self._hold(None, msg)
            return
        self._stats["events_in"] += 1
        self._deliver(msg.data)

    # ------------------------------------------------------------------ publishing

    def _publish(self, subject: str, payload: bytes, reply: str = "") -> bool:
        """Publishes without waiting; what cannot be queued at once goes to a writer task,
        in order. False when the message was dropped (not connected, or ``send_limit``)."""
        nc = self._nc
        if nc is None:
            return False
        if not self._queue and nc.publish_nowait(subject, payload, reply):
            return True
        if not nc.is_connected or self._queued + len(payload) > self.send_limit:
            return False
        self._queue.append((subject, payload, reply))
        self._queued += len(payload)
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write(nc))
        return True

    async def _write(self, nc: _Client) -> None:
        try:
            while self._queue:
                subject, payload, reply = self._queue.popleft()
                self._queued -= len(payload)
                try:
                    await nc.publish(subject, payload, reply=reply)
                except Exception as e:
                    # Too large is a message lost for good; a lost connection is reported
                    # as such already.
                    level = (
                        logging.WARNING
                        if isinstance(e, nats.errors.MaxPayloadError)
                        else logging.DEBUG
                    )
                    logger.log(
                        level, "channel %r: publishing on %s failed: %s", self.id, subject, e
                    )
        finally:
            self._writer = None

    # ------------------------------------------------------------------ registrations

    def _register(self, frame: bytes, message_id: str) -> None:
        try:
            definition = json.loads(frame)["command"]
            definition["id"].encode()
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        self._registrations.put_nowait((message_id, definition))

    async def _registrar(self) -> None:
        """Serves the registrations one at a time, in order."""
        while True:
            message_id, definition = await self._registrations.get()
            try:
                served = await self._serve(definition)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not self._is_up():
                    # Not acknowledged: the registry fails the registration with
                    # channel_disconnected when it learns of the lost connection, and
                    # registers the tree's commands again once the channel is back.
                    logger.info(
                        "channel %r: could not serve %r while disconnected: %s",
                        self.id,
                        definition["id"],
                        _describe(e),
                    )
                    continue
                # spec-v1 has one registration error: the registry is told
                # duplicate_command, and the reason (JetStream missing...) is logged here.
                logger.error(
                    "channel %r: could not serve %r (refused as duplicate_command): %s",
                    self.id,
                    definition["id"],
                    _describe(e),
                )
                served = None
            ok = served is not None
            frame = _dumps(
                {
                    "id": _core.new_id(),
                    "type": "register.command.response",
                    "thid": message_id,
                    "response": {"ok": True} if ok else {"ok": False, "error": "duplicate_command"},
                }
            )
            assert self._loop is not None
            self._loop.call_soon(self._acknowledge, self._epoch, frame, served)

    def _is_up(self) -> bool:
        """Connected to NATS (not between a loss and the reconnection)."""
        nc = self._nc
        return nc is not None and nc.is_connected and not self._closed

    def _acknowledge(self, epoch: int, frame: bytes, served: _Served | None) -> None:
        if epoch != self._epoch:
            return
        self._deliver(frame)
        if served is not None and served.generation == float("inf"):
            self._generation += 1
            served.generation = self._generation

    async def _serve(self, definition: dict[str, Any]) -> _Served | None:
        """Starts serving a command of this machine's tree; None when ownership refuses.

        Raises:
            Exception: Serving failed otherwise (the connection was lost, JetStream cannot
                be reached in exclusive mode): not an ownership refusal.
        """
        cid: str = definition["id"]
        served = self._served.get(cid)
        if served is not None:
            if served.definition != definition:
                served.definition = definition
                self._announce_soon()
            return served
        subject = self._subject_of(cid)
        if subject is None:
            logger.warning(
                "channel %r: %r makes a NATS subject over %d bytes: it stays on this machine",
                self.id,
                cid,
                MAX_SUBJECT,
            )
            return _Served(cid, definition, "")
        owner = self._conflict(cid)
        if owner is not None:
            logger.info(
                "channel %r: %r is already served by %s (%s mode here): duplicate_command",
                self.id,
                cid,
                owner,
                self.mode,
            )
            return None
        served = _Served(cid, definition, subject)
        if self.mode == "exclusive":
            served.claim = await self._claim(cid)
            if served.claim is None:
                return None
            if self._conflict(cid) is not None:  # another machine began to serve it meanwhile
                if self._kv is not None:
                    await self._release(self._kv, served)
                return None
        nc = self._nc
        try:
            if nc is None:
                raise ChannelDisconnectedError(f"channel {self.id!r} is not connected")
            served.sub = await nc.subscribe(
                subject,
                queue=QUEUE_GROUP,
                future=_Inline(functools.partial(self._on_request, served)),
            )
        except Exception:
            if self._kv is not None and served.claim is not None:
                await self._release(self._kv, served)
            raise
        self._served[cid] = served
        with contextlib.suppress(Exception):
            # The server knows the subscription before anyone hears of the command.
            await asyncio.wait_for(nc.flush(), self.open_timeout)
        logger.info("channel %r: serving %r on %s", self.id, cid, subject)
        self._announce_soon()
        self._mesh_changed()
        return served

    def _conflict(self, cid: str) -> str | None:
        """The machine whose serving of ``cid`` forbids this one to serve it, if any."""
        for peer in self._peers.values():
            entry = peer.commands.get(cid)
            if entry is not None and (entry[1] == "exclusive" or self.mode == "exclusive"):
                return f"{peer.name} ({entry[1]})"
        return None

    async def _unserve(self, served: _Served, why: str) -> None:
        if self._served.get(served.id) is not served:
            return
        del self._served[served.id]
        logger.info("channel %r: no longer serving %r: %s", self.id, served.id, why)
        if served.sub is not None:
            with contextlib.suppress(Exception):
                await served.sub.unsubscribe()
        kv = self._kv
        if kv is not None and served.claim is not None:
            await self._release(kv, served)
        self._announce_soon()
        self._mesh_changed()

    # ------------------------------------------------------------------ exclusive claims

    async def _claims(self) -> KeyValue:
        if self._kv is not None:
            return self._kv
        nc = self._nc
        if nc is None:
            raise ChannelDisconnectedError(f"channel {self.id!r} is not connected")
        js = nc.jetstream(timeout=self.open_timeout)
        try:
            kv = await js.key_value(self._bucket)
        except nats.js.errors.BucketNotFoundError:
            try:
                kv = await js.create_key_value(bucket=self._bucket, ttl=self.claim_ttl, history=1)
            except nats.js.errors.APIError:
                kv = await js.key_value(self._bucket)  # another machine made it meanwhile
        ttl = (await kv.status()).ttl or self.claim_ttl
        self._claim_refresh = min(self.claim_ttl, ttl) / 3
        self._kv = kv
        return kv

    def _claim_value(self) -> bytes:
        return _dumps({"instance": self.instance_id, "name": self.name})

    async def _claim(self, cid: str) -> int | None:
        """Claims ``cid`` (or takes back this machine's own claim); the revision, or None
        when another machine holds it.

        Raises:
            RuntimeError: JetStream cannot be reached (the reason is in the message).
        """
        try:
            try:
                return await self._try_claim(cid)
            except _BUCKET_GONE:
                # The server lost its JetStream data (a restart without its store): the
                # bucket is made again.
                self._kv = None
                return await self._try_claim(cid)
        except Exception as e:
            raise RuntimeError(
                f"cannot claim {cid!r} in {self._bucket} (exclusive mode needs JetStream): "
                f"{_describe(e)}"
            ) from e

    async def _try_claim(self, cid: str) -> int | None:
        key = encode_id(cid)
        kv = await self._claims()
        try:
            return await kv.create(key, self._claim_value())
        except nats.js.errors.KeyWrongLastSequenceError:
            entry = await kv.get(key)
            holder = json.loads(entry.value or b"{}")
            if holder.get("instance") == self.instance_id and entry.revision is not None:
                return await kv.update(key, self._claim_value(), last=entry.revision)
            logger.info(
                "channel %r: %r is claimed by %s: duplicate_command",
                self.id,
                cid,
                holder.get("name", "another machine"),
            )
            return None

    async def _refresh_claims(self) -> None:
        for served in list(self._served.values()):
            if served.claim is None:
                continue
            kv = self._kv
            if kv is not None:
                try:
                    served.claim = await kv.update(
                        encode_id(served.id), self._claim_value(), last=served.claim
                    )
                    continue
                except nats.js.errors.KeyWrongLastSequenceError:
                    pass  # expired, or the key was lost: claim again
                except _BUCKET_GONE:
                    # The server restarted without its JetStream data: bucket and claim are
                    # made again.
                    logger.warning(
                        "channel %r: the claims bucket %s is gone: claiming %r again",
                        self.id,
                        self._bucket,
                        served.id,
                    )
                    self._kv = None
                except Exception as e:
                    logger.warning(
                        "channel %r: refreshing the claim of %r: %s", self.id, served.id, e
                    )
                    continue
            try:
                claim = await self._claim(served.id)
            except RuntimeError as e:
                logger.warning("channel %r: %s (tried again later)", self.id, e)
                continue
            if claim is None:
                logger.error("channel %r: lost the exclusive claim of %r", self.id, served.id)
                served.claim = None
                await self._unserve(served, "its exclusive claim was lost")
            else:
                served.claim = claim

    async def _release(self, kv: KeyValue, served: _Served) -> None:
        with contextlib.suppress(Exception):
            await kv.delete(encode_id(served.id), last=served.claim)
        served.claim = None

    # ------------------------------------------------------------------ discovery

    def _info_document(self, state: str = "up", *, lean: int = 0) -> bytes:
        """This machine's ADR-32 ``INFO`` (``lean``: 1 drops the schemas, 2 the
        descriptions too, when the document would exceed ``max_payload``)."""
        endpoints = []
        for s in self._served.values():
            if not s.subject:
                continue
            definition = s.definition
            if lean:
                definition = {
                    k: v
                    for k, v in definition.items()
                    if k == "id" or (k == "description" and lean < 2)
                }
            metadata = {"cmd_ipc.command": json.dumps(definition), "cmd_ipc.mode": self.mode}
            name = _endpoint_name(s.subject[len(self._prefix) + 4 :])
            endpoints.append(EndpointInfo(name, s.subject, QUEUE_GROUP, metadata))
        info = ServiceInfo(
            name=self.service_name,
            id=self.instance_id,
            version=_VERSION,
            description="a cmd-ipc machine (root registry) of the mesh",
            endpoints=endpoints,
            metadata=self._metadata(state),
        )
        doc = _dumps(info.to_dict())
        nc = self._nc
        if nc is not None and len(doc) > nc.max_payload:
            if lean < 2:
                return self._info_document(state, lean=lean + 1)
            if not self._info_too_large:
                # Not published (nor answered): the other machines do not see this one's
                # commands until it serves fewer or the server allows more.
                logger.warning(
                    "channel %r: the INFO document of %d commands is %d bytes even without "
                    "schemas and descriptions, more than the NATS server's max_payload of %d "
                    "bytes: the mesh cannot discover this machine's commands (raise "
                    "max_payload in the server configuration)",
                    self.id,
                    len(endpoints),
                    len(doc),
                    nc.max_payload,
                )
            self._info_too_large = True
        else:
            self._info_too_large = False
        return doc

    def _metadata(self, state: str = "up") -> dict[str, str]:
        return {
            "cmd_ipc.namespace": self.namespace,
            "cmd_ipc.name": self.name,
            "cmd_ipc.state": state,
        }

    def _info(self) -> bytes:
        return self._info_document()

    def _ping(self) -> bytes:
        ping = ServicePing(
            id=self.instance_id, name=self.service_name, version=_VERSION, metadata=self._metadata()
        )
        return _dumps(ping.to_dict())

    def _info_stats(self) -> bytes:
        stats = ServiceStats(
            id=self.instance_id,
            name=self.service_name,
            version=_VERSION,
            started=self._started_at,
            endpoints=[
                EndpointStats(
                    name=_endpoint_name(s.subject[len(self._prefix) + 4 :]),
                    subject=s.subject,
                    queue_group=QUEUE_GROUP,
                    num_requests=s.requests,
                    num_errors=0,
                    processing_time=0,
                    average_processing_time=0,
                )
                for s in self._served.values()
                if s.subject
            ],
            metadata=self._metadata(),
        )
        return _dumps(stats.to_dict())

    def _control(self, make: Callable[[], bytes], msg: Msg) -> None:
        if msg.reply:
            self._publish(msg.reply, make())

    def _announce_soon(self) -> None:
        if not self._announce_due and self._loop is not None:
            self._announce_due = True
            self._loop.call_soon(self._announce)

    def _announce(self) -> None:
        self._announce_due = False
        if not self._closed:
            self._publish(self._changed_subject, self._info_document())

    async def _scan(self) -> dict[str, dict[str, Any]]:
        """Asks every machine of the namespace for its ``INFO`` (``$SRV.INFO.cmdipc-<ns>``)
        and collects the answers for ``discovery_window`` seconds: less only once every
        machine it knows of answered and no other answer came for a fraction of the window
        (or at once when nobody answers). So a machine it knows of is missed only by a scan
        that waited the whole window for it, however slow the answers (a loaded machine)."""
        nc = self._nc
        loop = asyncio.get_running_loop()
        if nc is None or not nc.is_connected:
            return {}
        self._seq += 1
        token = f"s{self._seq}"
        got: dict[str, dict[str, Any]] = {}
        done: asyncio.Future[None] = loop.create_future()
        # Resolved once every machine known before the scan answered (never for the first
        # scan, which knows of none: it takes the whole window).
        settled: asyncio.Future[None] = loop.create_future()
        last = [loop.time()]
        known = set(self._peers)
        stall = self.discovery_window * _STALL

        def on_answer(msg: Msg) -> None:
            if msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
                if not done.done():
                    done.set_result(None)
                return
            info = self._parse_info(msg.data)
            if info is not None:
                got[info["id"]] = info
                last[0] = loop.time()
                if known and known <= got.keys() and not settled.done():
                    settled.set_result(None)

        self._scans[token] = on_answer
        try:
            self._publish(f"$SRV.INFO.{self.service_name}", b"", self._inbox + token)
            deadline = loop.time() + self.discovery_window
            while not done.done():
                now = loop.time()
                if settled.done():
                    # Every known machine answered: more answers (a machine that joined)
                    # are waited for until none came for `stall`.
                    end = min(deadline, last[0] + stall)
                    if now >= end:
                        break
                    await asyncio.wait({done}, timeout=end - now)
                else:
                    if now >= deadline:
                        break
                    await asyncio.wait({done, settled}, timeout=deadline - now)
        finally:
            del self._scans[token]
        return got

    def _parse_info(self, data: bytes) -> dict[str, Any] | None:
        try:
            info = json.loads(data)
            if info["id"] == self.instance_id or info["name"] != self.service_name:
                return None
            if info.get("metadata", {}).get("cmd_ipc.namespace") != self.namespace:
                return None
            return dict(info)
        except (ValueError, KeyError, TypeError):
            logger.debug("channel %r: an unreadable INFO document was ignored", self.id)
            return None

    @staticmethod
    def _peer(info: dict[str, Any]) -> _Peer:
        meta = info.get("metadata") or {}
        peer = _Peer(str(meta.get("cmd_ipc.name") or info["id"]))
        for ep in info.get("endpoints") or ():
            try:
                em = ep.get("metadata") or {}
                definition = json.loads(em["cmd_ipc.command"])
                cid = definition["id"]
                if isinstance(cid, str) and cid and not _core.is_private(cid):
                    peer.commands[cid] = (definition, str(em.get("cmd_ipc.mode", "replicas")))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        return peer

    def _apply_scan(self, infos: dict[str, dict[str, Any]]) -> None:
        for iid, info in infos.items():
            self._peers[iid] = self._peer(info)
        for iid in [i for i in self._peers if i not in infos]:
            peer = self._peers[iid]
            peer.missed += 1
            if peer.missed >= 2:
                logger.info("channel %r: %s left the mesh (no answer)", self.id, peer.name)
                del self._peers[iid]
        self._mesh_changed()

    def _on_changed(self, msg: Msg) -> None:
        info = self._parse_info(msg.data)
        if info is None:
            return
        if (info.get("metadata") or {}).get("cmd_ipc.state") == "down":
            peer = self._peers.pop(info["id"], None)
            if peer is not None:
                logger.info("channel %r: %s left the mesh", self.id, peer.name)
        else:
            self._peers[info["id"]] = self._peer(info)
        self._mesh_changed()

    def _mesh_list(self) -> list[dict[str, Any]]:
        """The definitions of the commands other machines serve and this one does not."""
        merged: dict[str, dict[str, Any]] = {}
        for iid in sorted(self._peers):
            for cid, (definition, _) in self._peers[iid].commands.items():
                if cid not in self._served:
                    merged.setdefault(cid, definition)
        return [merged[cid] for cid in sorted(merged)]

    def _list_response(self, thid: str) -> bytes:
        commands = self._mesh_list()
        self._pushed = commands
        return _dumps(
            {
                "id": _core.new_id(),
                "type": "list.commands.response",
                "thid": thid,
                "commands": commands,
            }
        )

    def _mesh_changed(self) -> None:
        if self._waiters:
            available = self._peer_ids()
            for wanted, fut in self._waiters:
                if wanted <= available and not fut.done():
                    fut.set_result(None)
        if self._attached and self._list_thid is not None and self._mesh_list() != self._pushed:
            # The registry takes a list response at any time: the mesh's commands, as now.
            self._soon(self._list_response(self._list_thid))

    # ------------------------------------------------------------------ housekeeping

    async def _housekeeping(self) -> None:
        """One loop for every periodic duty: forgetting replies that never came, refreshing
        exclusive claims, scanning the mesh and this machine's tree."""
        loop = asyncio.get_running_loop()
        next_scan = loop.time() + self.discovery_interval
        next_claims = loop.time() + self._claim_refresh
        while True:
            await asyncio.sleep(min(1.0, self.discovery_interval, self._claim_refresh))
            now = loop.time()
            self._sweep(now)
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue
            try:
                if now >= next_claims:
                    next_claims = now + self._claim_refresh
                    await self._refresh_claims()
                if now >= next_scan:
                    next_scan = now + self.discovery_interval
                    self._apply_scan(await self._scan())
                    if self._attached:
                        await self._prune()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.warning("channel %r: housekeeping: %s", self.id, e)

    def _sweep(self, now: float) -> None:
        for table in (self._out, self._in):
            expired = []
            for key, entry in table.items():  # in arrival order: the oldest first
                if entry.deadline > now:
                    break
                expired.append(key)
            for key in expired:
                del table[key]

    async def _prune(self) -> None:
        """Stops serving what left this machine's tree (a worker that died for good)."""
        generation = self._generation
        local = await self._relist()
        if local is None:
            return
        for served in list(self._served.values()):
            if served.id not in local and served.generation <= generation:
                await self._unserve(served, "it left this machine's tree")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self.connected else "disconnected"
        return (
            f"<NatsChannel id={self.id!r} namespace={self.namespace!r} name={self.name!r} {state}>"
        )
