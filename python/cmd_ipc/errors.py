"""The exceptions of cmd-ipc: one tree, rooted at :class:`CmdIpcError`.

Every failure of a command call is a :class:`CommandError` carrying the stable spec code in
``.code``, raised the same way whether the failure happened in this process or in a registry
several hops away::

    CmdIpcError (Exception)                         .code
    ├── CommandError                                (see below)
    │   ├── NotFoundError                           "not_found"
    │   ├── InvalidRequestError                     "invalid_request"
    │   ├── InternalError                           "internal_error"
    │   ├── CommandTimeoutError (also TimeoutError) "timeout"
    │   ├── ChannelDisconnectedError
    │   │                  (also ConnectionError)   "channel_disconnected"
    │   └── DuplicateCommandError                   "duplicate_command"
    ├── ProtocolError (also ValueError)             "message_too_large", "message_too_deep",
    │                                               "malformed_message", "invalid_message",
    │                                               "unencodable_value"
    └── WorkerError (also RuntimeError)

A handler that raises an ordinary exception makes its caller see :class:`InternalError` with
the exception's type and message; the traceback is logged (logger ``cmd_ipc``) in the process
where the handler ran and never crosses the wire. A handler may raise a :class:`CommandError`
subclass itself to answer with that code (for example :class:`InvalidRequestError`).

Frames that break the protocol or its limits raise :class:`ProtocolError` (a ``ValueError``,
raised by the Rust core: ``args == (code, message)``) where they are checked locally; from a
peer they are dropped, logged and counted instead. A worker process that cannot be started
raises :class:`WorkerError`.

Example:
    >>> try:
    ...     raise NotFoundError("command 'x' is not registered")
    ... except CommandError as e:
    ...     print(e.code)
    not_found
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ChannelDisconnectedError",
    "CmdIpcError",
    "CommandError",
    "CommandTimeoutError",
    "DuplicateCommandError",
    "InternalError",
    "InvalidRequestError",
    "NotFoundError",
    "ProtocolError",
    "WorkerError",
    "error_from_code",
]


class CmdIpcError(Exception):
    """Base class of every exception cmd-ipc raises on purpose."""


class CommandError(CmdIpcError):
    """Base class of every command failure.

    Attributes:
        code: The stable spec error code (``"not_found"``, ``"timeout"``...).
        message: The human-readable message, as received from the registry that failed.
    """

    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}" if self.message else f"[{self.code}]"


class NotFoundError(CommandError):
    """No registry reachable from the caller has the command."""

    code = "not_found"


class InvalidRequestError(CommandError):
    """The request was rejected before the handler ran (wrong fields, too large, too deep)."""

    code = "invalid_request"


class InternalError(CommandError):
    """The handler raised, or a registry on the path failed."""

    code = "internal_error"


class CommandTimeoutError(CommandError, TimeoutError):
    """No response arrived within the request TTL (or the call's ``timeout``)."""

    code = "timeout"


class ChannelDisconnectedError(CommandError, ConnectionError):
    """A channel the call depended on closed before the response arrived."""

    code = "channel_disconnected"


class DuplicateCommandError(CommandError):
    """The command id is already owned by another handler somewhere in the tree."""

    code = "duplicate_command"


class ProtocolError(CmdIpcError, ValueError):
    """A frame or value that breaks the protocol or its limits (raised by the Rust core).

    ``args`` are ``(code, message)``.

    Attributes:
        code: A stable code: ``"message_too_large"``, ``"message_too_deep"``,
            ``"malformed_message"``, ``"invalid_message"`` or ``"unencodable_value"``.
        message: The human-readable explanation.

    Example:
        >>> from cmd_ipc import _core
        >>> try:
        ...     _core.transcode(b"[", "json", "json")
        ... except ProtocolError as e:
        ...     print(e.code)
        malformed_message
    """

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}" if self.message else f"[{self.code}]"


class WorkerError(CmdIpcError, RuntimeError):
    """A worker could not be started (its target failed, or the process died early)."""


_BY_CODE: dict[str, type[CommandError]] = {
    cls.code: cls
    for cls in (
        NotFoundError,
        InvalidRequestError,
        InternalError,
        CommandTimeoutError,
        ChannelDisconnectedError,
        DuplicateCommandError,
    )
}


def error_from_code(code: str, message: str) -> CommandError:
    """Builds the exception for a spec error code (unknown codes become ``InternalError``).

    Args:
        code: A spec error code such as ``"not_found"``.
        message: The error message.

    Returns:
        An instance of the matching :class:`CommandError` subclass.
    """
    cls = _BY_CODE.get(code)
    if cls is None:
        return InternalError(f"{message} (unknown error code {code!r})")
    return cls(message)
