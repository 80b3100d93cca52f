"""Child processes of ``cmd-ipc bench``: their environment and their end."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

__all__ = ["child_env", "reap"]


def reap(proc: subprocess.Popen[Any], timeout: float) -> None:
    """Waits for a child to end by itself, then kills it."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def child_env() -> dict[str, str]:
    """This environment, with a ``PYTHONPATH`` under which a child imports this cmd_ipc."""
    env = dict(os.environ)
    # cmd_ipc/bench/children.py -> the directory holding cmd_ipc.
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [pkg_root, *(p for p in sys.path if p), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return env
