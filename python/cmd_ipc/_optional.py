"""Imports of optional dependencies with an error that says what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Imports ``module`` or raises an ImportError naming the extra that provides it.

    Args:
        module: The module to import (``"aiohttp"``).
        extra: The cmd-ipc extra that installs it (``"http"``).
        feature: What needs it, for the message (``"HTTPChannel"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{feature} needs the {module!r} package: pip install 'cmd-ipc[{extra}]'"
        ) from e
