"""HTTP for cmd-ipc, by its former path: kept so that existing imports work.

The client channel lives in :mod:`cmd_ipc.channels.http`, the aiohttp server in
:mod:`cmd_ipc.server.http`; import from there in new code.
"""

from cmd_ipc.channels.http import DEFAULT_MAX_RESPONSE, HeadersSource, HTTPChannel
from cmd_ipc.server.http import DEFAULT_MAX_BODY, HTTPServer, add_routes, create_app, serve

__all__ = [
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_RESPONSE",
    "HTTPChannel",
    "HTTPServer",
    "HeadersSource",
    "add_routes",
    "create_app",
    "serve",
]
