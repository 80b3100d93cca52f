"""Imports of optional dependencies with an error that says what to install.

cmd-ipc is installed from a checkout (it is not on PyPI yet), so the message gives both
forms: the extra by name (``cmd-ipc[http]``) and the command for a checkout
(``pip install '.[http]'``, with ``-e`` for an editable install).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependency", "install_hint", "require"]


def install_hint(extra: str) -> str:
    """How to install the cmd-ipc extra ``extra``, from a checkout or an index."""
    return (
        f"install the cmd-ipc[{extra}] extra: pip install '.[{extra}]' in a checkout of "
        f"cmd-ipc (pip install -e '.[{extra}]' for an editable install; "
        f"pip install 'cmd-ipc[{extra}]' from a package index)"
    )


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message says which extra installs it.

    Attributes:
        module: The missing module (``"aiohttp"``).
        extra: The cmd-ipc extra that installs it (``"http"``).
        feature: What needed it.
    """

    def __init__(self, module: str, extra: str, feature: str) -> None:
        super().__init__(f"{feature} needs the {module!r} package: {install_hint(extra)}")
        self.module = module
        self.extra = extra
        self.feature = feature


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Imports ``module`` or raises :class:`MissingDependency` naming the extra that
    provides it.

    Args:
        module: The module to import (``"aiohttp"``).
        extra: The cmd-ipc extra that installs it (``"http"``).
        feature: What needs it, for the message (``"HTTPChannel"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(module, extra, feature) from e
