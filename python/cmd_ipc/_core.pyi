"""The native core of cmd-ipc (Rust, via PyO3).

Everything here is low level: applications use :class:`cmd_ipc.CommandRegistry`, which drives
a :class:`Node` and carries out its actions.

Actions are tuples whose first item is an ``ACTION_*`` constant (a small int, defined once in
Rust):

* ``(ACTION_SEND, channel_id, frame, type, id, reference)``: send ``frame`` (bytes, in the
  channel's encoding) on a channel written in Python; ``type`` and ``id`` are the message's,
  ``reference`` what it is about (a response's ``thid``, the command of an execute or
  register request, the event id of an event; ``None`` for a list request), so the channel
  never decodes the frame again.
* ``(ACTION_RUN, job, handler_id, command_id, request, encoding)``: run a local handler with
  the still-encoded ``request`` (``None`` when absent), then report with ``complete_job_ok``
  or ``complete_job_err``.
* ``(ACTION_RESULT, call, value, encoding)``: the local call ``call`` succeeded.
* ``(ACTION_ERROR, call, code, message)``: the local call ``call`` failed with a spec code.
* ``(ACTION_REGISTERED, call, code, message)``: a local registration finished (``code`` is
  ``None`` on success).
* ``(ACTION_EVENT, event_id, payload, encoding)``: deliver an event to local listeners.
* ``(ACTION_WANT_WRITE, channel_id)``: a native pipe channel has unsent bytes; call
  ``flush_native`` when its socket is writable.
* ``(ACTION_LISTED, channel_id)``: the channel's peer answered with its command list (its
  commands are routable now).
* ``(ACTION_CLOSED, channel_id, reason, fd)``: a native channel closed and was detached; its
  socket ``fd`` stays open (shut down) until ``Node.release_native(fd)``, called once the loop
  stopped watching it.
* ``(ACTION_DROPPED, channel_id, kind, reason)``: a message was dropped (counted in the
  stats); ``kind`` is a string (``"invalid"``, ``"spoofed"``, ``"unknown_thid"``,
  ``"duplicate_event"``, ``"undeliverable"``, ``"unencodable"``, ``"rejected"``,
  ``"outbox_full"`` (once per episode of a full outbox), ``"over_limit"``).
* ``(ACTION_FAST_FAILED, job, handler_id, request, exception)``: a handler called directly
  by ``poll_native`` raised; finish the job in Python.
* ``(ACTION_FAST_AWAIT, job, handler_id, request, awaitable)``: it returned an awaitable
  (see :func:`needs_await`); await it and finish the job in Python.
* ``(ACTION_FAST_UNENCODABLE, job, handler_id, request, exception)``: its result could not be
  packed; finish the job in Python.

Blocking calls (``Node.call_sync`` / ``call_many_sync``) return a triple whose first item is
an ``OUTCOME_*`` constant.
"""

from typing import Any, Final, final

__all__ = [
    "ACTION_CLOSED",
    "ACTION_DROPPED",
    "ACTION_ERROR",
    "ACTION_EVENT",
    "ACTION_FAST_AWAIT",
    "ACTION_FAST_FAILED",
    "ACTION_FAST_UNENCODABLE",
    "ACTION_LISTED",
    "ACTION_REGISTERED",
    "ACTION_RESULT",
    "ACTION_RUN",
    "ACTION_SEND",
    "ACTION_WANT_WRITE",
    "EXECUTE_ERROR_CODES",
    "OUTCOME_DONE",
    "OUTCOME_ENCODE",
    "OUTCOME_ERROR",
    "OUTCOME_FALLBACK",
    "OUTCOME_RESULT",
    "OUTCOME_VALUE",
    "Node",
    "__version__",
    "clock_gaps",
    "create_segment",
    "decode_plain",
    "encode_plain",
    "inspect_message",
    "is_private",
    "needs_await",
    "new_id",
    "transcode",
    "with_command_id",
]

__version__: str

ACTION_SEND: Final[int]
"""``(ACTION_SEND, channel_id, frame, type, id, reference)``: send ``frame`` on a channel
written in Python (see the module docstring for ``reference``)."""
ACTION_RUN: Final[int]
"""``(ACTION_RUN, job, handler_id, command_id, request, encoding)``: run a local handler."""
ACTION_RESULT: Final[int]
"""``(ACTION_RESULT, call, value, encoding)``: a local call succeeded."""
ACTION_ERROR: Final[int]
"""``(ACTION_ERROR, call, code, message)``: a local call failed."""
ACTION_REGISTERED: Final[int]
"""``(ACTION_REGISTERED, call, code, message)``: a local registration finished."""
ACTION_EVENT: Final[int]
"""``(ACTION_EVENT, event_id, payload, encoding)``: deliver an event locally."""
ACTION_WANT_WRITE: Final[int]
"""``(ACTION_WANT_WRITE, channel_id)``: flush a native pipe channel once writable."""
ACTION_LISTED: Final[int]
"""``(ACTION_LISTED, channel_id)``: the peer's command list arrived."""
ACTION_CLOSED: Final[int]
"""``(ACTION_CLOSED, channel_id, reason, fd)``: a native channel closed."""
ACTION_DROPPED: Final[int]
"""``(ACTION_DROPPED, channel_id, kind, reason)``: a message was dropped."""
ACTION_FAST_FAILED: Final[int]
"""``(ACTION_FAST_FAILED, job, handler_id, request, exception)``: a direct call raised."""
ACTION_FAST_AWAIT: Final[int]
"""``(ACTION_FAST_AWAIT, job, handler_id, request, awaitable)``: a direct call must be
awaited."""
ACTION_FAST_UNENCODABLE: Final[int]
"""``(ACTION_FAST_UNENCODABLE, job, handler_id, request, exception)``: a direct call's
result could not be packed."""

OUTCOME_VALUE: Final[int]
"""``(OUTCOME_VALUE, value, None)``: the result, decoded in Rust."""
OUTCOME_RESULT: Final[int]
"""``(OUTCOME_RESULT, data, encoding)``: the result, to decode in Python."""
OUTCOME_ERROR: Final[int]
"""``(OUTCOME_ERROR, code, message)``: the call failed with a spec code."""
OUTCOME_ENCODE: Final[int]
"""``(OUTCOME_ENCODE, None, None)``: encode the request(s) in Python and call again."""
OUTCOME_FALLBACK: Final[int]
"""``(OUTCOME_FALLBACK, None, None)``: not behind a native channel; use the event loop."""
OUTCOME_DONE: Final[int]
"""``(OUTCOME_DONE, values, others)``: a batch of ``call_many_sync`` finished."""

EXECUTE_ERROR_CODES: Final[frozenset[str]]
"""The spec error codes an ``execute.command.response`` may carry (not
``duplicate_command``)."""

_Action = tuple[Any, ...]

@final
class Node:
    """A registry's native half: the sans-I/O router plus the native channels, whose traffic
    (including forwarding between them) is carried out in Rust. Safe to call from several
    threads.

    Times are seconds on the driver's monotonic clock (``loop.time()``).
    """

    def __new__(
        cls,
        id: str,
        router_channel: str | None = None,
        *,
        request_ttl: float = 30.0,
        event_ttl: float = 5.0,
        max_pending: int = 100000,
        max_dedup: int = 100000,
        max_message_size: int = 67108864,
        max_depth: int = 64,
        spin_us: int = 50,
        max_pending_per_channel: int | None = None,
        max_commands_per_channel: int = 10000,
        max_command_size: int = 262144,
        max_outbox: int = 67108864,
        slow_consumer_timeout: float = 10.0,
    ) -> Node: ...
    @property
    def wake_fd(self) -> int:
        """Readable when another thread queued actions (take them with ``take_queued``)."""
    def add_native_channel(
        self,
        channel: str,
        sock_fd: int,
        encoding: str,
        shm_fd: int | None = None,
        side: int = 0,
    ) -> list[_Action]:
        """Attaches a native channel over duplicates of the given descriptors."""
    def native_fd(self, channel: str) -> int | None:
        """The socket descriptor to watch for a native channel."""
    def poll_native(
        self, channel: str, spin_us: int = 0, budget: int = 64, follow_us: int = 0
    ) -> tuple[list[_Action], bool, bool, bool]:
        """Reads and routes a native channel (GIL released): ``(actions, again,
        want_write, busy)``; poll again after the actions when ``again``; when ``busy`` a
        blocking caller reads it: stop watching it for a moment. ``spin_us``: spin for a
        first frame; ``follow_us``: once a frame was read, spin that long for the next."""
    def set_fast_handler(self, handler: int, fn_: Any | None) -> None:
        """Lets the read loop call ``fn_(**request)`` directly for a plain sync handler;
        ``None`` removes it. Unusual outcomes come back as ``(ACTION_FAST_FAILED |
        ACTION_FAST_AWAIT | ACTION_FAST_UNENCODABLE, job, handler, request, value)``
        actions."""
    def set_fast_codec(self, unpack: Any, pack: Any) -> None:
        """The msgpack ``unpack(bytes)`` and ``pack(obj)`` callables for direct dispatch."""
    def clear_handlers(self) -> None:
        """Drops every fast handler and the fast codec pair (on close), so that nothing here
        keeps a handler, or the registry it closes over, alive."""
    def native_busy(self, channel: str) -> bool:
        """Whether a blocking caller is reading the native channel now."""
    def flush_native(self, channel: str) -> bool:
        """Writes pending output; returns whether some remains."""
    def close_native(self, channel: str) -> list[_Action]:
        """Closes a native channel."""
    def release_native(self, fd: int) -> None:
        """Lets go of the descriptor of a native channel that closed (given by its
        ``ACTION_CLOSED``), once the event loop stopped watching it."""
    def close_all_native(self) -> list[_Action]:
        """Closes every native channel."""
    def take_queued(self) -> list[_Action]:
        """Actions queued by other threads."""
    def call_sync(
        self,
        command_id: str,
        request: object,
        ttl: float | None,
        encoded: bool = False,
    ) -> tuple[int, Any, Any]:
        """A blocking call over a native channel (GIL released). ``request``: ``None``, a
        ``dict`` (encoded in Rust when it holds plain values) or, with ``encoded``, msgpack
        ``bytes`` (anything else gives ``OUTCOME_ENCODE``). Returns
        ``(OUTCOME_VALUE, result, None)``, ``(OUTCOME_RESULT, data, encoding)`` (decode in
        Python), ``(OUTCOME_ERROR, code, message)``, ``(OUTCOME_ENCODE, None, None)`` (encode
        the request in Python and call again with bytes) or ``(OUTCOME_FALLBACK, None,
        None)`` (the command is not behind a native channel). On the main thread the wait
        runs Python's signal handlers while it is parked: what they raise (Ctrl-C:
        ``KeyboardInterrupt``) ends it, and the call is forgotten (its late reply dropped)."""
    def call_many_sync(
        self,
        command_id: str,
        requests: list[Any],
        ttl: float | None,
        window: int,
        encoded: bool = False,
    ) -> tuple[int, Any, Any]:
        """Blocking calls of one command, one per request (each as for :meth:`call_sync`),
        pipelined with up to ``window`` in flight (GIL released). Returns ``(OUTCOME_DONE,
        values, others)``: ``values`` holds the results decoded in Rust, ``others`` lists
        ``(index, OUTCOME_RESULT, data, encoding)`` to decode in Python and ``(index,
        OUTCOME_ERROR, code, message)`` for failures; or ``(OUTCOME_ENCODE, None, None)`` /
        ``(OUTCOME_FALLBACK, None, None)`` as for :meth:`call_sync`. Interrupted as
        :meth:`call_sync` is (the calls in flight forgotten, the results in dropped)."""
    def add_channel(self, channel: str, encoding: str) -> list[_Action]:
        """Attaches a channel (``"json"`` or ``"msgpack"``); queues a list request on it."""
    def close_channel(self, channel: str) -> list[_Action]:
        """Detaches a channel, dropping its commands and failing what waited on it."""
    def has_channel(self, channel: str) -> bool:
        """Whether a channel of this id is attached."""
    def handle_frame(self, channel: str, frame: bytes, now: float) -> list[_Action]:
        """Decodes and handles one frame from ``channel``; invalid frames become
        ``ACTION_DROPPED`` actions (and an ``invalid_request`` answer when possible)."""
    def execute(
        self,
        command_id: str,
        request: bytes | None,
        encoding: str,
        ttl: float | None,
        now: float,
    ) -> tuple[int, list[_Action]]:
        """Starts a local call; returns its token and the actions."""
    def cancel_call(self, call: int) -> None:
        """Forgets a local call whose caller stopped waiting."""
    def complete_job_ok(self, job: int, result: bytes | None, encoding: str) -> list[_Action]:
        """Reports a handler's result (``None`` for no result)."""
    def complete_job_err(self, job: int, code: str, message: str) -> list[_Action]:
        """Reports a handler's failure with a spec error code."""
    def register_local(
        self,
        command_id: str,
        handler: int,
        now: float,
        description: str | None = None,
        schema_request: bytes | None = None,
        schema_response: bytes | None = None,
    ) -> tuple[int, list[_Action]]:
        """Registers a local command (schemas as JSON text); returns its token."""
    def unregister_local(self, command_id: str) -> bool:
        """Removes a local command; returns whether it existed."""
    def emit_event(
        self, event_id: str, payload: bytes | None, encoding: str, now: float
    ) -> tuple[str, list[_Action]]:
        """Emits an event; returns the message id used."""
    def reannounce(self, now: float) -> tuple[int, list[_Action]]:
        """Registers this subtree's public commands again with a router channel that came
        back; returns how many were sent."""
    def tick(self, now: float) -> list[_Action]:
        """Fires every deadline at or before ``now``, and closes the native channels whose
        outbox stayed full for ``slow_consumer_timeout`` (reason ``[slow_consumer] ...``)."""
    def next_deadline(self) -> float | None:
        """The next time ``tick`` has work, if any."""
    def list_commands(
        self,
    ) -> list[tuple[str, str | None, bytes | None, bytes | None]]:
        """``(id, description, schema_request_json, schema_response_json)`` of every
        command this registry can route to."""
    def set_pool(self, channel: str, pool: str | None) -> None:
        """Declares ``channel`` a member of pool ``pool`` (``None``: of no pool): members of
        one pool may all register the same command and share its calls."""
    def route_of(self, command_id: str) -> str | None:
        """``"local"``, the channel a call would take (for a pool: the member the next call
        goes to), or ``None``."""
    def stats(self) -> dict[str, Any]:
        """Per-channel message counts and table sizes."""

def inspect_message(
    data: bytes | bytearray,
    encoding: str,
    *,
    max_message_size: int = 67108864,
    max_depth: int = 64,
) -> tuple[str, str, str | None]:
    """Checks that ``data`` is one valid message in ``encoding`` (with limits); returns its
    ``(type, id, thid)`` (``thid`` is ``None`` for requests and events).

    Raises:
        cmd_ipc.errors.ProtocolError: The input is malformed, not a spec-v1 message, too
            large or too deep.
    """

def with_command_id(
    data: bytes | bytearray,
    encoding: str,
    command_id: str,
    *,
    max_message_size: int = 67108864,
    max_depth: int = 64,
) -> bytes:
    """``data``, one valid execute request in ``encoding`` (with limits), with its command
    id replaced by ``command_id`` and encoded again; any other message comes back unchanged.

    Raises:
        cmd_ipc.errors.ProtocolError: The input is malformed, not a spec-v1 message, too
            large or too deep.
    """

def transcode(
    data: bytes | bytearray,
    source: str,
    target: str,
    *,
    max_message_size: int = 67108864,
    max_depth: int = 64,
) -> bytes:
    """Decodes one message in ``source`` encoding (with limits) and encodes it in ``target``.

    Raises:
        cmd_ipc.errors.ProtocolError: The input is malformed, not a spec-v1 message, too
            large or too deep.
    """

def create_segment(ring_capacity: int = 1048576) -> int:
    """Creates a shared-memory segment (a memfd) with two rings, sealed against resizing;
    returns its descriptor."""

def new_id() -> str:
    """A fresh UUIDv4 string."""

def encode_plain(value: object) -> bytes | None:
    """msgpack of a plain value (``None``, ``bool``, 64-bit ``int``, ``float``, ``str``,
    ``bytes``, ``list``, ``tuple``, ``dict`` of exactly these types), as
    ``msgpack.Packer(use_bin_type=True)`` makes it; ``None`` for any other value."""

def decode_plain(data: bytes, default: Any) -> Any:
    """The value of msgpack ``data`` holding plain values only (as
    ``msgpack.unpackb(raw=False, strict_map_key=False)`` gives it); ``default`` for anything
    else (ext types, invalid UTF-8, trailing bytes...)."""

def clock_gaps(seconds: float, threshold_us: float) -> tuple[int, float]:
    """Reads the monotonic clock in a tight loop for ``seconds`` (GIL released); returns how
    many times two readings were more than ``threshold_us`` apart, and the longest gap in
    µs: the pauses the machine imposes on the thread."""

def is_private(command_id: str) -> bool:
    """Whether a command or event id is private (starts with ``_``): never advertised,
    escalated or broadcast, and ``not_found`` when called from another registry. The
    router's own rule."""

def needs_await(obj: object) -> bool:
    """Whether a handler's result must be awaited: it is not a plain value (``None``,
    ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``list``, ``tuple``, ``dict``, or a
    subclass) and has ``__await__``. The test the direct-dispatch path applies itself."""
