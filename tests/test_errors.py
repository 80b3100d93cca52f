"""The one exception tree: rooted at CmdIpcError, every class public in cmd_ipc.errors."""

from __future__ import annotations

import inspect

import cmd_ipc
import pytest
from cmd_ipc import _core, errors


def test_every_exception_lives_in_cmd_ipc_errors_under_one_root() -> None:
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, BaseException)
    ]
    assert {c.__name__ for c in classes} >= {
        "CmdIpcError",
        "CommandError",
        "ProtocolError",
        "WorkerError",
        "NotFoundError",
    }
    for cls in classes:
        assert cls.__module__ == "cmd_ipc.errors", cls
        assert issubclass(cls, errors.CmdIpcError), cls
        assert getattr(cmd_ipc, cls.__name__) is cls, f"cmd_ipc does not export {cls.__name__}"


def test_rust_raises_the_python_protocol_error() -> None:
    with pytest.raises(errors.ProtocolError) as info:
        _core.transcode(b"{", "json", "msgpack")
    assert type(info.value) is errors.ProtocolError
    assert isinstance(info.value, ValueError)
    assert info.value.code == info.value.args[0]
    assert not hasattr(_core, "ProtocolError")


def test_worker_error_is_the_same_class_everywhere() -> None:
    from cmd_ipc import workers

    assert workers.WorkerError is errors.WorkerError is cmd_ipc.WorkerError
