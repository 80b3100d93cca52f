"""Child processes that a terminal's Ctrl-C does not reach.

Ctrl-C in a terminal sends SIGINT to every process of the foreground process group: the
parent and all of its children at once. Children that cmd-ipc starts (workers, the children
of ``cmd-ipc bench``) would each die with a ``KeyboardInterrupt`` traceback while their
parent is still stopping them in order. Started in a process group of their own, they only
hear from their parent: it stops them (a worker also exits when its parent dies, on
end-of-file of its channel), so an interrupted program ends quietly.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["OWN_PROCESS_GROUP"]

#: Keyword arguments of :class:`subprocess.Popen` that start the child in a new process
#: group (``setpgid(0, 0)`` in the child, done in C: safe with threads, unlike
#: ``preexec_fn``). Python 3.10 has no ``process_group``: a new session does it there.
OWN_PROCESS_GROUP: dict[str, Any] = (
    {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
)
